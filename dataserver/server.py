"""The server: its state, the event loop and shutdown. Decisions live in the scheduler; start-up
is in :mod:`dataserver.startup`, what faces the workers in :mod:`dataserver.supervise`, what
faces consumers in :mod:`dataserver.consumers` (mixins of :class:`Server`).

Shutdown (:meth:`Server.close`, idempotent, also on SIGINT/SIGTERM): stop answering consumers,
ask workers to stop, escalate to SIGTERM then SIGKILL after deadlines, close the sockets,
unlink every segment and the lock, remove the runtime directory and the socket file.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq

from dataserver import shm
from dataserver._proc import pid_alive
from dataserver.caps import MEMORY_READS_PER_PASS
from dataserver.config import ServerConfig
from dataserver.consumers import DATASET, ConsumerSide
from dataserver.errors import DataServerError, SharedMemoryError
from dataserver.fifo import Inbox, Outbox
from dataserver.logs import setup_logging
from dataserver.monitor import Monitor
from dataserver.procmem import segment_prefix
from dataserver.protocol import (
    Stop,
    StreamEnd,
    Tasks,
    encode,
)
from dataserver.scheduler import Scheduler
from dataserver.source import SequenceSource
from dataserver.startup import SLOT_HEADROOM, StartUp

__all__ = ["DATASET", "Server"]

log = logging.getLogger("dataserver")
HOUSEKEEPING_INTERVAL_S = 0.5
OVERSIZE_WARN_INTERVAL_S = 30.0


class Server(StartUp, ConsumerSide):
    """One dataserver. ``run()`` blocks until a signal or ``close()``; the CLI and
    ``DataServer`` both drive it."""

    def __init__(self, config: ServerConfig,
                 sources: SequenceSource | dict[str, SequenceSource]) -> None:
        self.config = config
        self.sources = sources if isinstance(sources, dict) else {DATASET: sources}
        self.server_id = f"{os.getpid():x}-{secrets.token_hex(4)}"
        self.shm_dir = shm.shm_dir()
        self.state = "new"
        self.stopping = False
        self.exit_code = 0
        self.ring: shm.Segment | None = None
        self.ring_name = ""
        self.prefetch = 0
        self.ring_id = ""
        self.lock: shm.ServerLock | None = None
        self.rundir: Path | None = None
        self.ipc_path: Path | None = None
        self.ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self.clients: zmq.Socket[bytes] | None = None
        self.workers_sock: zmq.Socket[bytes] | None = None
        self.pool: Any = None  # Pool, or RayPool with --backend ray
        self.sched: Scheduler | None = None
        self.seqs: list[Any] = []
        self.start_failures = 0
        self.fatal: str | None = None
        self.last_start_error: str | None = None
        self._sentinels: dict[int, int] = {}  # fd -> incarnation
        self.poller = zmq.Poller()
        self.monitor = Monitor(segment_prefix(self.shm_dir, self.server_id))
        self._in_flight_frames: deque[tuple[Any, bytes, list[list[Any]], list[shm.Segment]]] = (
            deque())
        self.exporter: Any = None  # dataserver.metrics.MetricsExporter with --metrics
        self.authenticator: Any = None  # zmq ThreadAuthenticator with --curve-keys
        self._retire_since: dict[int, float] = {}
        self._retire_asked: dict[int, float] = {}
        self.mem_history: dict[int, deque[tuple[int, int]]] = {}  # wid -> (done, memory)
        self.growing: set[int] = set()
        self._wake_r = self._wake_w = -1
        # DataServer's server process: readable (end of file) once the process that started
        # it is gone, however it died; the server then stops as on SIGTERM
        self.owner_fd = -1
        self._on_signal: Callable[[int, Any], None] | None = None
        self._secret = secrets.token_hex(16)  # workers prove with it that we started them
        self._authed: set[int] = set()  # incarnations that did
        self.answers: Inbox | None = None
        self._task_boxes: dict[int, Outbox] = {}  # incarnation -> write end of its task FIFO
        self.up: Inbox | None = None  # short messages from local consumers (OpenPipes)
        self._pipes: dict[bytes, tuple[int, Inbox, Outbox]] = {}  # cid -> token, down FIFO
        self._by_token: dict[int, bytes] = {}
        self._next_token = 0
        self._worker_copy = True  # recv worker frames as bytes (False: big payloads come)
        self._last_housekeeping = 0.0
        self._last_oversize_warn = 0.0
        self._warned_oversize = 0
        self.started_at = time.monotonic()

    @property
    def name(self) -> str:
        """The SPECs served, for messages: ``mypkg:Train`` or ``train=mypkg:Train, val=...``."""
        if list(self.sources) == [DATASET]:
            return self.sources[DATASET].name
        return ", ".join(f"{k}={v.name}" for k, v in self.sources.items())

    def _advance_shared_epoch(self, ds: int, epoch: int) -> None:
        """Thread workers share one Sequence: call its on_epoch_end once per epoch, between."""
        assert self.sched is not None
        for _ in range(epoch - self.sched.datasets[ds].epoch_running):
            hook = getattr(self.seqs[ds], "on_epoch_end", None)
            if hook is None:
                return
            try:
                hook()
            except Exception:
                log.exception("on_epoch_end raised before epoch %d; serving on", epoch)

    # --- the loop ---------------------------------------------------------------------------

    def serve_forever(self) -> None:
        while not self.stopping:
            self._step(int(HOUSEKEEPING_INTERVAL_S * 1000))
            if self.fatal:
                log.error("%s", self.fatal)
                self.exit_code = 1
                break

    def _step(self, timeout_ms: int) -> None:
        assert self.clients is not None and self.workers_sock is not None
        events = dict(self.poller.poll(timeout_ms))
        self._reap_frames()  # before answering anything: status must not count sent frames
        if self.answers is not None and self.answers.fd in events:
            self._on_answers()
        if self.workers_sock in events:
            self._drain(self.workers_sock, self._on_worker_frames, self._worker_copy)
        self._from_consumers(events)
        for fd, inc in list(self._sentinels.items()):
            if fd in events:
                self._on_worker_exit(inc)
        if self._wake_r in events:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 512)
        if self.owner_fd >= 0 and self.owner_fd in events:
            self.poller.unregister(self.owner_fd)  # it stays readable
            self.owner_fd = -1
            log.warning("the process that started this server exited; shutting down")
            self.stopping = True
        now = time.monotonic()
        if now - self._last_housekeeping >= HOUSEKEEPING_INTERVAL_S:
            self._last_housekeeping = now
            self._housekeeping(now)
        self._flush()

    def _from_consumers(self, events: dict[Any, int]) -> None:
        """Consumers' requests in the order each sent them. A consumer writes its FIFO until
        something must go by socket, then only the socket (client._channel). So: take the
        socket's messages first, then read the FIFO (also when poll() did not see it ready: a
        record may have landed since), and handle the FIFO's records first: they were written
        before those."""
        assert self.clients is not None
        if self.clients not in events:  # most passes: nothing by socket, nothing to order
            if self.up is not None and self.up.fd in events:
                self._on_up()
            return
        client_frames: list[list[Any]] = []
        self._drain(self.clients, client_frames.append)
        if self.up is not None:
            self._on_up()
        for frames in client_frames:
            self._on_client_frames(frames)

    def _drain(self, sock: zmq.Socket[bytes], handle: Callable[[list[Any]], None],
               copy: bool = True) -> None:
        # recv until zmq.Again: one raise per drain is cheaper than asking ZMQ_EVENTS before
        # every message (3.7 us each, measured)
        for _ in range(10000):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=copy)
            except zmq.Again:
                return
            handle(frames)

    def _flush(self) -> None:
        sched = self.sched
        assert sched is not None and self.clients is not None
        sched.dispatch()
        for wid, items in sched.out_tasks.items():
            self._send_worker(wid, Tasks(items))
        sched.out_tasks.clear()
        # failures first: one settles a position that comes before the batches it lets go to
        # a frames consumer (which would otherwise learn of it only after their bytes)
        for cid, failed in sched.out_failed:
            self._send_client(cid, encode(failed))
        sched.out_failed.clear()
        for cid, ready in sched.out_ready.items():
            c = sched.consumers.get(cid)
            if c is not None and c.frames:
                self._send_frames(cid, ready)
            else:
                self._send_ready(cid, ready)
        sched.out_ready.clear()
        for cid in sched.out_ended:
            # by socket, never the FIFO: an announcement that went by socket before it (too
            # long, or the FIFO full) must not be overtaken; what went by FIFO is read first
            self._send_client_socket(cid, encode(StreamEnd()))
        sched.out_ended.clear()
        for name in sched.to_unlink:
            shm.unlink(self.shm_dir / name)
        sched.to_unlink.clear()

    # --- housekeeping -----------------------------------------------------------------------

    def _housekeeping(self, now: float) -> None:
        sched = self.sched
        assert sched is not None and self.pool is not None
        for c in list(sched.consumers.values()):
            if c.same_host and not pid_alive(c.pid):
                why = f"(pid {c.pid}) exited"
            elif not c.same_host and now - c.seen > self.config.consumer_timeout:
                why = f"sent no heartbeat for {self.config.consumer_timeout:g} s"
            else:
                continue
            held = sum(c.leases.values())
            sched.remove_consumer(c.cid)
            self._close_pipes(c.cid)
            # a consumer that said Bye kept its views until exit: expected, not a warning
            (log.info if c.gone else log.warning)("consumer %s %s; reclaimed %d leases",
                                                  c.name, why, held)
        timeout = self.config.batch_timeout
        if timeout is not None and self.state == "running":
            for wid, e in sched.overdue(now, timeout):
                h = self.pool.handles.get(wid)
                what = f"worker {sched.workers[wid].index} exceeded --batch-timeout " \
                       f"{timeout:g} s on batch {e.index}"
                if h is not None and h.killable:
                    log.warning("%s; killing it", what)
                    self.pool.kill(wid)  # its sentinel fires; _on_worker_exit replaces it
                else:
                    self._replace(wid, what + " (thread abandoned)", quarantine=True)
        if self.config.worker_type == "thread" and self.state == "running":
            for inc, h in list(self.pool.handles.items()):
                if not h.alive() and inc in sched.workers:
                    self._replace(inc, f"worker thread {h.spec.worker} ended unexpectedly")
        self._maybe_warn_oversize(now)
        if self.state == "running":
            self._check_caps(now)
        if self.exporter is not None and self.state == "running":
            self.exporter.update(self.monitor.snapshot(self, fresh=MEMORY_READS_PER_PASS))

    def _maybe_warn_oversize(self, now: float) -> None:
        sched = self.sched
        assert sched is not None
        n = sched.stats["oversize"]
        quiet = now - self._last_oversize_warn > OVERSIZE_WARN_INTERVAL_S
        if n > self._warned_oversize and (not self._warned_oversize or quiet):
            fit = -(-int(sched.largest_oversize * SLOT_HEADROOM) // 1024)
            log.warning(
                "%d batches did not fit in %s slots and traveled in one-off segments (slower); "
                "--slot-bytes %dKiB would fit the largest so far", n,
                shm.format_bytes(sched.slot_bytes), fit)
            self._warned_oversize = n
            self._last_oversize_warn = now

    # --- run and shutdown -------------------------------------------------------------------

    def run(self, on_ready: Callable[[str], None] | None = None) -> int:
        """Start, announce readiness, serve until a signal or a fatal error; always clean up."""
        restore = self._install_signals()
        try:
            self.start()
            if on_ready is not None:
                on_ready(self.config.endpoint)
            log.info("ready at %s: %s (%s), %d %s workers", self.config.endpoint,
                     self.name, ", ".join(f"{d.name}: {d.length} batches"
                                          for d in self.sched.datasets),  # type: ignore[union-attr]
                     self.config.workers, self.config.worker_type)
            self.serve_forever()
            return self.exit_code
        finally:
            self.close()
            restore()

    def _install_signals(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

        def on_signal(signum: int, _frame: Any) -> None:
            if not self.stopping:
                log.info("%s received; shutting down", signal.Signals(signum).name)
            self.stopping = True

        self._on_signal = on_signal  # re-installed after Ray's init replaced it
        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        old_fd = signal.set_wakeup_fd(self._wake_w)

        def restore() -> None:
            signal.set_wakeup_fd(old_fd)
            for s, h in old.items():
                signal.signal(s, h)
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake_r = self._wake_w = -1

        return restore

    def close(self) -> None:
        """Stop everything and remove every file this server made. Safe to call twice."""
        if self.state == "closed":
            return
        self.state = "closed"
        self.stopping = True
        if self.exporter is not None:
            self.exporter.close()
        if self.clients is not None:
            self.clients.close(0)
        if self.ipc_path is not None:
            shm.unlink(self.ipc_path)
        if self.pool is not None:
            connected = {w.wid for w in self.sched.workers.values() if w.ready} if self.sched \
                else set()
            self.pool.stop_all(lambda inc: self._send_worker(inc, Stop()), connected)
            self.pool.close()
        if self.workers_sock is not None:
            self.workers_sock.close(0)
        if self.answers is not None:
            self.answers.close()
        for box in self._task_boxes.values():
            box.close()
        self._task_boxes.clear()
        for cid in list(self._pipes):
            self._close_pipes(cid)
        if self.up is not None:
            self.up.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        if self.ctx is not None:
            self.ctx.destroy(linger=0)
        if self.ring is not None:
            self.ring.close()
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.shm_dir):
                if shm.owned_by(self.server_id, entry.name):
                    shm.unlink(Path(entry.path))
                    removed += 1
        if self.lock is not None:
            self.lock.release()
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)
        # a server that failed to start made none: do not claim to have removed a ring
        log.info("stopped; removed %d file(s) of server %s from %s", removed, self.server_id,
                 self.shm_dir)


def run_in_child(config: ServerConfig, source: SequenceSource | dict[str, SequenceSource],
                 conn: Any, level: str) -> None:
    """Entry point of the server process that ``DataServer`` starts."""

    setup_logging(level, config.log_format)
    server = Server(config, source)
    owner = multiprocessing.parent_process()
    if owner is not None and owner.sentinel is not None:  # stop with the DataServer's process
        server.owner_fd = owner.sentinel

    def ready(endpoint: str) -> None:
        conn.send_bytes(msgpack.packb({"ready": endpoint, "pid": os.getpid()}))

    try:
        code = server.run(ready)
    except (DataServerError, SharedMemoryError) as exc:
        with contextlib.suppress(OSError):
            conn.send_bytes(msgpack.packb({"error": str(exc), "type": type(exc).__name__}))
        code = 2
    except BaseException as exc:
        with contextlib.suppress(OSError):
            conn.send_bytes(msgpack.packb({"error": f"{type(exc).__name__}: {exc}",
                                           "type": "DataServerError"}))
        raise
    if code:
        raise SystemExit(code)
