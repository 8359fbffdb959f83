"""Faults: dead workers, hung workers, a dead server, signals, bad endpoints and SPECs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import seqs
from dataserver import shm
from dataserver._proc import pid_alive
from dataserver.client import RemoteSequence, ServerUnavailable
from helpers import wait_for, worker_pids

pytestmark = pytest.mark.timeout(120)
HERE = Path(__file__).parent


@pytest.mark.parametrize("transport", ["shm", "frames"])
def test_sigkill_random_workers_repeatedly_loses_nothing(serve: Any, transport: str) -> None:
    server = serve(seqs.Indexed(120, delay=0.01), workers=2, max_retries=5)
    killed = 0
    with RemoteSequence(server.endpoint, transport=transport) as seq:
        got = []
        for _x, y in seq:
            got.append(int(y[0]))
            if len(got) % 25 == 10:
                pids = worker_pids(server.endpoint)
                os.kill(pids[len(got) % len(pids)], signal.SIGKILL)
                killed += 1
    assert killed == 5
    assert got == list(range(120))


def test_hung_worker_is_replaced_after_batch_timeout(serve: Any, tmp_path: Path) -> None:
    marker = tmp_path / "hung"
    server = serve(seqs.Hangs(20, 6, str(marker)), workers=2, batch_timeout=1.0)
    with RemoteSequence(server.endpoint) as seq:
        got = [int(y[0]) for _x, y in seq]
    assert got == list(range(20)) and marker.exists()


def test_stopped_worker_is_replaced_after_batch_timeout(serve: Any) -> None:
    server = serve(seqs.Indexed(30, delay=0.02), workers=2, batch_timeout=1.0)
    with RemoteSequence(server.endpoint) as seq:
        got = []
        for _x, y in seq:
            got.append(int(y[0]))
            if len(got) == 5:
                os.kill(worker_pids(server.endpoint)[0], signal.SIGSTOP)
    assert got == list(range(30))


def test_server_sigkill_is_seen_within_timeout_and_swept_by_the_next_start(
        serve: Any, isolated: dict[str, Path]) -> None:
    server = serve(seqs.Indexed(50, delay=0.05), workers=2)
    with RemoteSequence(server.endpoint, timeout=5) as seq:
        it = iter(seq)
        next(it)
        workers = worker_pids(server.endpoint)
        os.kill(server.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(ServerUnavailable, match="exited"):
            for _ in it:
                pass
        assert time.monotonic() - t0 < 5
    # its workers (and the fork server they came from) die with it
    wait_for(lambda: not any(pid_alive(p) for p in workers), "the workers to die with the server")
    server.close()
    assert any(n.endswith("-ring") for n in os.listdir(isolated["shm"])), "nothing to sweep?"
    assert Path(server.endpoint[len("ipc://"):]).exists()
    # the next server on the same endpoint sweeps the dead one's segments and socket
    again = serve(seqs.Indexed(5), endpoint=server.endpoint)
    names = os.listdir(isolated["shm"])
    assert not [n for n in names if server_id_of(n) != server_id_of(names[0])], names
    with RemoteSequence(again.endpoint) as seq:
        assert [int(y[0]) for _x, y in seq] == list(range(5))


def test_a_server_killed_while_the_consumer_waits_for_fifo_room_is_reported(
        serve: Any, isolated: dict[str, Path]) -> None:
    """A consumer waits for room in a full FIFO rather than bypass it (order): that wait
    must end when the server dies, not at the timeout, and say so."""
    from dataserver.fifo import Outbox
    from dataserver.status import fetch_status

    server = serve(seqs.Indexed(50), workers=2)
    up = shm.runtime_root() / fetch_status(server.endpoint)["server"]["id"] / "up.fifo"
    with RemoteSequence(server.endpoint, timeout=20) as seq:
        workers = worker_pids(server.endpoint)
        os.kill(server.pid, signal.SIGSTOP)
        stranger = Outbox(str(up), 12345)
        while stranger.send(b"z" * 1000):
            pass
        stranger.close()
        killer = threading.Timer(0.3, os.kill, (server.pid, signal.SIGKILL))
        killer.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(ServerUnavailable, match="exited"):
                list(seq)
        finally:
            killer.join()
        assert time.monotonic() - t0 < 10, "waited for the timeout, not for the server"
    wait_for(lambda: not any(pid_alive(p) for p in workers), "the workers to die with the server")
    server.close()
    serve(seqs.Indexed(5), endpoint=server.endpoint)  # sweeps the dead one's files


OWNER = """
import sys, time
import seqs
from dataserver import DataServer
server = DataServer(seqs.Indexed(50), workers=2, endpoint=sys.argv[1]).start()
print(server.pid, flush=True)
time.sleep(600)
"""


def test_a_dataserver_stops_when_the_process_that_started_it_is_killed(
        isolated: dict[str, Path]) -> None:
    """DataServer's server process watches the process that started it: SIGKILL that one (no
    atexit, no close) and the server still stops, removing its ring, socket and workers."""
    endpoint = f"ipc://{isolated['runtime']}/owned.sock"
    owner = subprocess.Popen([sys.executable, "-c", OWNER, endpoint], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(HERE)})
    try:
        assert owner.stdout is not None
        server = int(owner.stdout.readline())
        pids = wait_for(lambda: len(found := worker_pids(endpoint)) == 2 and found,
                        "two workers")
        workers = list(pids)
        owner.kill()
        owner.wait(10)
        wait_for(lambda: not any(pid_alive(p) for p in [server, *workers]),
                 "the server and its workers to stop")
        assert not os.listdir(isolated["shm"]), "the server removed its segments"
        assert not Path(endpoint[len("ipc://"):]).exists(), "and its socket"
    finally:
        owner.kill()
        owner.wait(10)
        if owner.stdout is not None:
            owner.stdout.close()


def server_id_of(name: str) -> str:
    return name[len(shm.PREFIX):].split("-ring")[0].split(".lock")[0].split("-big")[0]


def test_cleanup_command_removes_a_dead_servers_leftovers(
        serve: Any, isolated: dict[str, Path]) -> None:
    server = serve(seqs.Indexed(10), workers=1)
    os.kill(server.pid, signal.SIGKILL)
    server.close()
    assert os.listdir(isolated["shm"])
    out = subprocess.run([sys.executable, "-m", "dataserver", "cleanup"], capture_output=True,
                         text=True, timeout=60, check=True)
    # ring, probe batch, lock, runtime directory, socket file
    assert "removed 5 leftovers" in out.stdout, out.stdout
    assert not os.listdir(isolated["shm"])
    assert not Path(server.endpoint[len("ipc://"):]).exists()


def test_client_without_server_raises_server_unavailable(isolated: dict[str, Path]) -> None:
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailable, match="no dataserver answered"):
        RemoteSequence(f"ipc://{isolated['runtime']}/nobody.sock", timeout=1)
    assert time.monotonic() - t0 < 5


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dataserver", "serve", *args], cwd=HERE, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )


def wait_ready(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("dataserver: ready at "), (line, proc.stderr and proc.stderr.read())
    return line.split(" at ", 1)[1].strip()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_signal_during_busy_epoch_is_an_orderly_exit(
        isolated: dict[str, Path], signum: int) -> None:
    endpoint = f"ipc://{isolated['runtime']}/cli.sock"
    proc = start_cli("seqs:Indexed", "--arg", "n=400", "--arg", "delay=0.02", "--workers", "2",
                     "--endpoint", endpoint)
    try:
        assert wait_ready(proc) == endpoint
        with RemoteSequence(endpoint, timeout=5) as seq:
            it = iter(seq)
            for _ in range(10):
                next(it)
            proc.send_signal(signum)
            with pytest.raises(ServerUnavailable):
                for _ in it:
                    pass
        assert proc.wait(30) == 0
        assert "shutting down" in (proc.stderr.read() if proc.stderr else "")
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dataserver", "serve", *args], cwd=HERE,
                          capture_output=True, text=True, timeout=90)


def test_cli_endpoint_taken(serve: Any) -> None:
    server = serve(seqs.Indexed(4), workers=1)
    out = run_cli("seqs:Indexed", "--workers", "1", "--endpoint", server.endpoint)
    assert out.returncode == 2
    assert "is taken: another server listens there" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["nosuch.module:Seq"], "cannot import 'nosuch.module'"),
    (["seqs"], "must be module:name"),
    (["seqs:Empty"], "len() is 0"),
    (["seqs:Indexed", "--arg", "n"], "write key=value"),
    (["seqs:Indexed", "--endpoint", "ipc:///nonexistent-dir/x.sock"], "does not exist"),
    (["seqs:Indexed", "--endpoint", "tcp://8.8.8.8:5555"], "without authentication"),
])
def test_cli_bad_input_is_one_clear_line(isolated: dict[str, Path], args: list[str],
                                         message: str) -> None:
    out = run_cli(*args, "--workers", "1")
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], out.stderr
    assert "Traceback" not in out.stderr


def test_stopped_server_is_unavailable_after_the_timeout(serve: Any) -> None:
    server = serve(seqs.Indexed(40, delay=0.02), workers=1)
    with RemoteSequence(server.endpoint, timeout=2) as seq:
        it = iter(seq)
        next(it)
        os.kill(server.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(ServerUnavailable, match="did not answer for 2 s"):
                for _ in it:
                    pass
            assert 1.5 < time.monotonic() - t0 < 6
        finally:
            os.kill(server.pid, signal.SIGCONT)


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_other_start_methods(serve: Any, method: str) -> None:
    from dataserver.status import fetch_status
    from dataserver.worker import POLL_INTERVAL_S

    server = serve(seqs.Indexed(30), start_method=method)
    with RemoteSequence(server.endpoint) as seq:
        assert [int(y[0]) for _x, y in seq] == list(range(30))
    # idle workers stay up (they check their parent every POLL_INTERVAL_S)
    time.sleep(3 * POLL_INTERVAL_S)
    assert "restarts" not in fetch_status(server.endpoint)["counters"]


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_the_fork_server_imports_the_sequence_module_for_every_worker(serve: Any,
                                                                      method: str) -> None:
    server = serve(spec="seqs:WhereImported", start_method=method)
    with RemoteSequence(server.endpoint) as seq:
        rows = [[int(v) for v in y] for _x, y in seq]
    assert [r[0] for r in rows] == list(range(10))
    importers = {r[1] for r in rows}
    makers = {r[2] for r in rows}
    if method == "forkserver":  # one import, in the fork server, shared by the workers
        assert len(importers) == 1 and importers.isdisjoint(makers | {server.pid})
    else:  # each worker imported it itself
        assert all(r[1] == r[2] for r in rows)


def test_a_module_the_fork_server_cannot_import_is_left_to_the_worker(tmp_path: Path) -> None:
    (tmp_path / "explodes.py").write_text("raise RuntimeError('not here')\n")
    (tmp_path / "fine.py").write_text("VALUE = 1\n")
    code = ("import sys, dataserver._preload; "
            "print('fine' in sys.modules, 'explodes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path,
                         env={**os.environ, "DATASERVER_PRELOAD": "nosuch.mod,explodes,fine",
                              "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0 and out.stdout.split() == ["True", "False"], out


def test_demo_command_runs_and_checks_order(isolated: dict[str, Path]) -> None:
    out = subprocess.run([sys.executable, "-m", "dataserver", "demo", "--batches", "40"],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    assert "80 in" in out.stdout and "in order, each exactly once" in out.stdout
    assert "batches/s" in out.stdout and "GB/s" in out.stdout and "USS" in out.stdout


def test_cli_warns_once_about_oversize_batches(isolated: dict[str, Path]) -> None:
    endpoint = f"ipc://{isolated['runtime']}/big.sock"
    proc = start_cli("seqs:Sized", "--arg", "big_at=[3]", "--workers", "1", "--endpoint",
                     endpoint)
    try:
        wait_ready(proc)
        with RemoteSequence(endpoint) as seq:
            assert [int(y[0]) for _x, y in seq] == list(range(12))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        err = proc.stderr.read() if proc.stderr else ""
        assert "1 batches did not fit in" in err and "--slot-bytes 1281KiB would fit" in err, err
    finally:
        proc.kill()
        proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()


def test_memory_error_in_getitem_is_an_error_at_its_index(serve: Any) -> None:
    from dataserver.client import RemoteError

    server = serve(seqs.RaisesMemoryError(5), slot_bytes=4096)
    with RemoteSequence(server.endpoint) as seq:
        it = iter(seq)
        assert int(next(it)[1][0]) == 0 and int(next(it)[1][0]) == 1
        with pytest.raises(RemoteError, match="MemoryError: cannot allocate 80 GiB"):
            next(it)
        assert [int(y[0]) for _x, y in it] == [3, 4]
