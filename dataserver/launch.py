"""``dataserver launch SPEC... [serve options] -- COMMAND...``: a server beside one trainer.

1. Start ``python -m dataserver serve SPEC... [options]`` on ``--endpoint`` or a fresh socket in
   the owner-only runtime directory, in a session of its own (a Ctrl-C in the terminal is the
   trainer's to handle), with SIGTERM as its parent-death signal. Its log goes to our stderr.
2. Wait for ``dataserver: ready at E`` (``--ready-timeout``); a server that exits first ends
   launch with exit 2 and one line: its exit status and its error.
3. Run COMMAND with ``DATASERVER_ENDPOINT=E``; forward SIGINT and SIGTERM to it, except a SIGINT
   the terminal already sent to the trainer's process group (Ctrl-C).
4. When it exits: SIGTERM to the server, SIGKILL after ``STOP_GRACE_S``, and remove whatever a
   server that did not exit cleanly left (segments, runtime directory, socket file).
5. Exit with the trainer's code (128 + N if signal N killed it). If the server died while the
   trainer ran (which then sees ``ServerUnavailable``), say so in one last line and exit non-zero.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import IO

from dataserver import shm

__all__ = ["READY_TIMEOUT_S", "launch"]

READY_LINE = "dataserver: ready at "
#: Default --ready-timeout: above the server's own 120 s limit for starting its workers.
READY_TIMEOUT_S = 300.0
#: SIGTERM to SIGKILL for the server: it joins and, if need be, kills its workers within ~8 s.
STOP_GRACE_S = 30.0
POLL_INTERVAL_S = 0.1
#: How long to wait for the last lines of a server's output once it has exited.
READER_JOIN_TIMEOUT_S = 5.0
EXIT_STARTUP_FAILED = 2
EXIT_NO_TRAINER = 127
FORWARDED = (signal.SIGINT, signal.SIGTERM)
#: The one-line error of ``serve`` (and of its argument parser), held back from the echoed log
#: because launch repeats it in its own line.
_SERVER_ERROR_RE = re.compile(r"^dataserver(?: serve)?: error: (?P<message>.*)$")


def _say(message: str) -> None:
    print(f"dataserver launch: {message}", file=sys.stderr, flush=True)


def _status(code: int) -> str:
    """``exited with code 2`` / ``was killed by SIGKILL`` from a Popen return code."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def _die_with_launch() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when launch dies (Linux), else None.
    Used for the server only, started before launch has any thread."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return preexec


class _Server:
    """The server process; its stdout watched for the ready line, its log echoed to our stderr,
    its last line naming an error kept for the report."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, errors="replace", bufsize=1, start_new_session=True,
            preexec_fn=_die_with_launch(),
        )
        self.ready = threading.Event()
        self.endpoint = ""
        self.error = ""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self._on_stdout),
                             name="dataserver-launch-stdout", daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self._on_stderr),
                             name="dataserver-launch-stderr", daemon=True),
        ]
        for thread in self._readers:
            thread.start()

    @staticmethod
    def _read(stream: IO[str], on_line: Callable[[str], None]) -> None:
        with stream:
            for line in stream:
                on_line(line.rstrip("\n"))

    def _on_stdout(self, line: str) -> None:
        if line.startswith(READY_LINE) and not self.ready.is_set():
            self.endpoint = line[len(READY_LINE):].strip()
            self.ready.set()
        elif line:
            print(line, file=sys.stderr, flush=True)

    def _on_stderr(self, line: str) -> None:
        m = _SERVER_ERROR_RE.match(line)
        if m:
            self.error = m.group("message")
            return
        if "error" in line.lower():
            self.error = line.strip()
        print(line, file=sys.stderr, flush=True)

    def join_output(self) -> None:
        """Wait (bounded) for the last lines of an exited server."""
        for thread in self._readers:
            thread.join(READER_JOIN_TIMEOUT_S)

    def describe(self, when: str) -> str:
        """``the server (pid N) was killed by SIGKILL <when>: <its error line>``."""
        code = self.proc.returncode
        assert code is not None
        self.join_output()
        reason = f": {self.error}" if self.error else ""
        return f"the server (pid {self.proc.pid}) {_status(code)} {when}{reason}"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_GRACE_S; reap it and its output."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _say(f"the server (pid {self.proc.pid}) did not stop within {STOP_GRACE_S:.0f} s "
                     "of SIGTERM; killing it")
                self.proc.kill()
                self.proc.wait()
        self.join_output()


class _Signals:
    """While entered, SIGINT and SIGTERM are recorded for the main loop instead of acting."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self._old: dict[int, Callable[[int, FrameType | None], object] | int | None] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._record) for s in FORWARDED}
        return self

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.pending.append(signum)

    def take(self) -> list[int]:
        taken, self.pending = self.pending, []
        return taken

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._old.items():
            if handler is not None:
                signal.signal(signum, handler)


def _terminal_sent_sigint() -> bool:
    """Whether a SIGINT most likely came from Ctrl-C: launch (and so the trainer, in its process
    group) is the terminal's foreground job, and the terminal signals the whole group."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if stream.isatty():
                return os.tcgetpgrp(stream.fileno()) == os.getpgrp()
    return False


#: What ends launch: its exit code and the line to say last ("" for none).
Outcome = tuple[int, str]


def _wait_ready(server: _Server, timeout_s: float, signals: _Signals) -> Outcome | None:
    """None once the server is ready, else why launch ends."""
    deadline = time.monotonic() + timeout_s
    while not server.ready.wait(POLL_INTERVAL_S):
        taken = signals.take()
        if taken:
            name = signal.Signals(taken[0]).name
            return 128 + taken[0], f"{name} before the server was ready; stopped it"
        if server.proc.poll() is not None:
            return EXIT_STARTUP_FAILED, f"error: {server.describe('before it was ready')}"
        if time.monotonic() > deadline:
            return EXIT_STARTUP_FAILED, (
                f"error: the server (pid {server.proc.pid}) was not ready within {timeout_s:g} s;"
                " raise --ready-timeout if its Sequence is slow to load")
    return None


def _run_trainer(server: _Server, command: Sequence[str], signals: _Signals) -> Outcome:
    """Run the trainer to its end, forwarding signals."""
    env = dict(os.environ, DATASERVER_ENDPOINT=server.endpoint)
    try:
        trainer = subprocess.Popen(list(command), env=env)
    except OSError as exc:
        return EXIT_NO_TRAINER, f"error: cannot run the trainer {command[0]!r}: {exc.strerror}"
    died_while_running = False
    while True:
        for signum in signals.take():
            if signum != signal.SIGINT or not _terminal_sent_sigint():
                trainer.send_signal(signum)
        try:
            code = trainer.wait(POLL_INTERVAL_S)
            break
        except subprocess.TimeoutExpired:
            died_while_running = died_while_running or server.proc.poll() is not None
    died_while_running = died_while_running or server.proc.poll() is not None
    exit_code = code if code >= 0 else 128 - code
    if died_while_running:
        return exit_code or 1, (f"error: {server.describe('while the trainer ran')} "
                                f"(the trainer {_status(code)})")
    return exit_code, f"the trainer {_status(code)}" if code else ""


def _remove_leftovers(server: _Server, socket_path: Path | None) -> None:
    """What a server that did not exit cleanly left, and the socket file launch chose."""
    if server.proc.returncode != 0:
        shm.sweep()  # segments and runtime directories of dead servers, dead socket files
    if socket_path is not None and not shm.socket_listening(str(socket_path)):
        shm.unlink(socket_path)


def launch(serve_args: Sequence[str], command: Sequence[str], *, endpoint: str = "",
           ready_timeout_s: float = READY_TIMEOUT_S) -> int:
    """Run ``dataserver serve *serve_args`` and, once it is ready, ``command`` beside it; return
    the exit code for launch (see the module docstring). ``endpoint`` is the ``--endpoint``
    already in ``serve_args``, or "" to serve on a fresh socket in the runtime directory."""
    if not command:
        raise ValueError("launch needs a trainer command")
    argv = [sys.executable, "-m", "dataserver", "serve", *serve_args]
    socket_path: Path | None = None
    if not endpoint:
        socket_path = shm.private_dir(shm.runtime_root()) / f"launch-{os.getpid()}.sock"
        argv += ["--endpoint", f"ipc://{socket_path}"]
    with _Signals() as signals:
        server = _Server(argv)
        try:
            outcome = _wait_ready(server, ready_timeout_s, signals)
            if outcome is None:
                _say(f"server ready at {server.endpoint}; running {shlex.join(command)}")
                outcome = _run_trainer(server, command, signals)
        finally:
            server.stop()
            _remove_leftovers(server, socket_path)
    code, last_words = outcome
    if last_words:
        _say(last_words)  # after the server's own last lines
    return code
