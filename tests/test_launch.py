"""``dataserver launch``: a server beside tests/trainer.py, end to end.

Exit codes passed through, signals forwarded, a failing trainer or server reported in one line,
and (the autouse ``isolated`` fixture) nothing left running, in /dev/shm or in the runtime
directory."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dataserver.cli import build_parser

HERE = Path(__file__).parent
SPEC = ["seqs:Indexed", "--arg", "n=40", "--workers", "1"]
LINE_TIMEOUT_S = 60.0


def launch_argv(*serve: str, trainer: tuple[str, ...] = ("0",)) -> list[str]:
    return [sys.executable, "-m", "dataserver", "launch", *serve, "--",
            sys.executable, "trainer.py", *trainer]


def run_launch(*serve: str, trainer: tuple[str, ...] = ("0",)) -> subprocess.CompletedProcess[str]:
    return subprocess.run(launch_argv(*serve, trainer=trainer), cwd=HERE, text=True,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=90)


def start_launch(*serve: str, trainer: tuple[str, ...]) -> subprocess.Popen[str]:
    # a session of its own: no controlling terminal, so a SIGINT is always forwarded (launch
    # leaves a terminal's Ctrl-C, which reaches the trainer by itself, alone)
    return subprocess.Popen(launch_argv(*serve, trainer=trainer), cwd=HERE, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def read_until(proc: subprocess.Popen[str], wanted: str) -> list[str]:
    """stdout lines up to the first one starting with ``wanted`` (pytest-timeout ends a hang)."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + LINE_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith(wanted):
            return lines
    raise AssertionError(f"no line {wanted!r} in {lines}; stderr: "
                         f"{proc.stderr.read() if proc.stderr else ''}")


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, out, err


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("code", [0, 3])
def test_trainer_exit_code_is_passed_through(isolated: dict[str, Path], code: int) -> None:
    out = run_launch(*SPEC, trainer=(str(code),))
    assert out.returncode == code, out.stderr
    assert "trainer: read 40 batches in order" in out.stdout, out.stdout
    # launch's fresh socket is in the (test's private) runtime directory
    assert f"trainer: endpoint ipc://{isolated['runtime']}/launch-" in out.stdout
    assert "server ready at ipc://" in out.stderr
    if code:
        assert last_line(out.stderr) == "dataserver launch: the trainer exited with code 3"
    assert "Traceback" not in out.stderr


@pytest.mark.timeout(120)
def test_given_endpoint_and_named_datasets_are_passed_to_the_server(
        isolated: dict[str, Path]) -> None:
    endpoint = f"ipc://{isolated['runtime']}/given.sock"
    out = run_launch("default=seqs:Indexed", "other=seqs:Indexed", "--arg", "n=40",
                     "--worker-type", "thread", "--workers", "1", "--endpoint", endpoint,
                     "--ready-timeout", "60")
    assert out.returncode == 0, out.stderr
    assert f"trainer: endpoint {endpoint}" in out.stdout
    assert "trainer: read 40 batches in order" in out.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_launch_is_forwarded_to_the_trainer(isolated: dict[str, Path],
                                                      signum: int) -> None:
    proc = start_launch(*SPEC, trainer=("5", "--wait"))
    read_until(proc, "trainer: waiting")
    proc.send_signal(signum)
    code, out, err = finish(proc)
    assert f"trainer: got {signal.Signals(signum).name}" in out, (out, err)
    assert code == 5, err
    assert "SIGTERM received; shutting down" in err  # the server was stopped in order
    assert "Traceback" not in err


@pytest.mark.timeout(120)
def test_server_killed_mid_run_is_reported_in_one_line(isolated: dict[str, Path]) -> None:
    proc = start_launch(*SPEC, "--arg", "n=2000", trainer=("0", "--slow"))
    read_until(proc, "trainer: reading")
    servers = [p for p in psutil.Process(proc.pid).children()
               if "serve" in p.cmdline()]
    assert len(servers) == 1, servers
    servers[0].kill()
    code, out, err = finish(proc)
    assert "trainer: ServerUnavailable: " in out and "exited" in out, (out, err)
    assert code == 1
    line = last_line(err)
    assert line.startswith(f"dataserver launch: error: the server (pid {servers[0].pid}) was "
                           "killed by SIGKILL while the trainer ran"), err
    assert line.endswith("(the trainer exited with code 1)"), line
    # the killed server's ring, lock and socket file are gone: the isolated fixture checks


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("spec", "message"), [
    ("nosuch.module:Seq", "cannot import 'nosuch.module'"),
    ("seqs:Empty", "len() is 0"),
])
def test_bad_spec_is_the_servers_one_line_error(isolated: dict[str, Path], spec: str,
                                                message: str) -> None:
    out = run_launch(spec, "--workers", "1")
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, out.stderr
    assert errors[0].startswith("dataserver launch: error: the server (pid ")
    assert "exited with code 2 before it was ready: " in errors[0] and message in errors[0]
    assert "trainer:" not in out.stdout  # the trainer never ran
    assert "Traceback" not in out.stderr


@pytest.mark.timeout(120)
def test_server_not_ready_in_time(isolated: dict[str, Path], tmp_path: Path) -> None:
    # batch 0 hangs, so the slots are never sized and the server never gets ready
    out = run_launch("seqs:Hangs", "--arg", "n=4", "--arg", "hang_at=0",
                     "--arg", f"marker={tmp_path / 'hung'}", "--workers", "1",
                     "--ready-timeout", "3")
    assert out.returncode == 2
    assert "was not ready within 3 s; raise --ready-timeout" in last_line(out.stderr), out.stderr
    assert "trainer:" not in out.stdout


@pytest.mark.timeout(120)
def test_trainer_that_cannot_run(isolated: dict[str, Path]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dataserver", "launch", *SPEC, "--", "/nonexistent/train"],
        cwd=HERE, text=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=90)
    assert out.returncode == 127
    assert last_line(out.stderr).startswith(
        "dataserver launch: error: cannot run the trainer '/nonexistent/train'"), out.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv", [["seqs:Indexed"], ["seqs:Indexed", "--"],
                                  ["seqs:Indexed", "--workers", "x", "--", "python"]])
def test_usage_errors(isolated: dict[str, Path], argv: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "dataserver", "launch", *argv], cwd=HERE,
                         text=True, capture_output=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("usage: dataserver launch SPEC..."), out.stderr
    assert "dataserver launch: error: " in out.stderr


def test_launch_takes_every_serve_option() -> None:
    parser = build_parser()
    argv = ["seqs:Indexed", "--workers", "3", "--slot-bytes", "1MiB", "--no-shuffle",
            "--arg", "n=4", "--insecure", "--log-level", "DEBUG"]
    serve = vars(parser.parse_args(["serve", *argv]))
    launch = vars(parser.parse_args(["launch", *argv, "--ready-timeout", "7"]))
    assert launch.pop("ready_timeout") == 7.0 and launch.pop("usage_error")
    serve.pop("command"), launch.pop("command")
    assert launch == serve
