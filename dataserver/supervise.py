"""The server's side facing its workers: starting them (local or Ray), their messages and
answers (socket and FIFO), their exits and replacements, and stacks (caps and memory growth
are in :mod:`dataserver.caps`).

A mixin of :class:`dataserver.server.Server`, which owns the state these methods use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import zmq

from dataserver import shm
from dataserver._proc import pid_namespace
from dataserver.caps import Caps
from dataserver.config import ServerConfig
from dataserver.errors import ProtocolError, SharedMemoryError
from dataserver.fifo import Inbox, Outbox
from dataserver.protocol import (
    FRAMES_SPLIT,
    MAX_CONSUMER_MESSAGE_BYTES,
    Done,
    Exhausted,
    Made,
    Message,
    Raised,
    StartFailed,
    Tasks,
    UseRing,
    WorkerMemory,
    WorkerReady,
    decode,
    encode,
)
from dataserver.scheduler import Scheduler, WorkerState
from dataserver.worker import WorkerSpec, stack_file

if TYPE_CHECKING:
    from dataserver.server import Server

__all__ = ["WorkerSide"]

log = logging.getLogger("dataserver")
MAX_START_FAILURES = 3
STACKS_TIMEOUT_S = 1.0
#: Tasks per FIFO record: an item is at most 46 bytes of msgpack, so 64 fit in PIPE_BUF.
TASKS_PER_RECORD = 64
_NO_WORKER = WorkerState(-1, -1)


class WorkerSide(Caps):
    # the Server's state these methods use (set in Server.__init__), beyond Caps'
    config: ServerConfig
    server_id: str
    shm_dir: Path
    state: str
    stopping: bool
    ring: shm.Segment | None
    ring_name: str
    rundir: Path | None
    workers_sock: zmq.Socket[bytes] | None
    pool: Any
    sched: Scheduler | None
    start_failures: int
    fatal: str | None
    last_start_error: str | None
    poller: zmq.Poller
    answers: Inbox | None
    _task_boxes: dict[int, Outbox]
    _sentinels: dict[int, int]
    _on_signal: Callable[[int, Any], None] | None
    _secret: str
    _authed: set[int]
    _worker_copy: bool
    _warned_oversize: int

    def _ray_pool(self, template: WorkerSpec) -> Any:
        """Start or join Ray; actors that cannot share our memory reach us over TCP."""
        from dataserver.ray_backend import RayPool

        assert self.workers_sock is not None
        pool = RayPool(template, self.config.ray_address)
        if self._on_signal is not None:  # Ray installed its own (crash-report) handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._on_signal)
        tcp = ""
        if self.config.ray_transport != "shm":
            self.workers_sock.bind(f"tcp://{pool.node_ip()}:*")
            tcp = self.workers_sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._worker_copy = False
            log.info("ray workers on other hosts reach this server at %s", tcp)
        pool.template = replace(
            template, tcp_address=tcp, transport=self.config.ray_transport,
            paths=tuple(p for p in sys.path if p and os.path.isdir(p)), pidns=pid_namespace())
        return pool

    def _start_worker(self, index: int) -> None:
        assert self.pool is not None and self.sched is not None
        # a replacement skips the items its predecessor made from its generator
        h = self.pool.start(index, tuple(d.made[index] for d in self.sched.datasets))
        self.sched.add_worker(WorkerState(h.spec.incarnation, index, pid=h.pid or os.getpid()))
        if h.sentinel is not None:
            self._sentinels[h.sentinel] = h.spec.incarnation
            self.poller.register(h.sentinel, zmq.POLLIN)

    def _send_worker(self, wid: int, msg: Message) -> None:
        """Tasks and UseRing by the worker's FIFO where it has one; whatever that cannot take
        (a full FIFO) goes by socket, and so does everything after it (the worker handles what
        its FIFO holds before what its socket brought, so the order holds)."""
        assert self.workers_sock is not None
        box = self._task_boxes.get(wid)
        if box is not None and isinstance(msg, Tasks | UseRing):
            if isinstance(msg, UseRing):
                if box.send(encode(msg)):
                    return
            else:
                items = msg.items
                while items and box.send(encode(Tasks(items[:TASKS_PER_RECORD]))):
                    items = items[TASKS_PER_RECORD:]
                if not items:
                    return
                msg = Tasks(items)
            log.debug("worker %d: its task FIFO is full; by socket from now on", wid)
            box.close()
            del self._task_boxes[wid]
        self.workers_sock.send_multipart([f"w{wid}".encode(), encode(msg)])

    def _on_worker_frames(self, frames: list[Any]) -> None:
        """One multipart message from a worker: messages, each ``Made`` followed by its batch.
        Trust nothing: the endpoint may be TCP (Ray workers on other hosts)."""
        if not self._worker_copy:  # zmq.Frame objects; only big Made payloads stay frames
            frames = [f if len(f) > 65536 else f.bytes for f in frames]
        ident = frames[0]
        try:
            wid = int(ident[1:]) if ident[:1] == b"w" else -1
            i = 1
            while i < len(frames):
                msg = decode(frames[i], MAX_CONSUMER_MESSAGE_BYTES)
                i += 1
                if wid not in self._authed:
                    if not isinstance(msg, WorkerReady | StartFailed) or msg.worker != wid \
                            or not secrets.compare_digest(msg.secret, self._secret):
                        raise ProtocolError("it did not present this server's worker secret")
                    self._authed.add(wid)
                if isinstance(msg, Made):
                    if i >= len(frames):
                        raise ProtocolError("Made without its batch frame")
                    end = i + 1  # one frame, or those adding up to nbytes (FRAMES_SPLIT)
                    if msg.nbytes > FRAMES_SPLIT:
                        got = len(frames[i])
                        while got < msg.nbytes and end < len(frames):
                            got += len(frames[end])
                            end += 1
                    self._on_made(wid, msg, frames[i:end])
                    i = end
                else:
                    self._on_worker_message(wid, msg)
        except (ProtocolError, ValueError) as exc:
            log.warning("dropped a message from worker socket peer %r: %s", bytes(ident)[:32],
                        exc)

    def _on_answers(self) -> None:
        """Answers from the FIFO (dataserver.fifo): only Done, Raised and Exhausted, only
        from workers that presented the secret."""
        assert self.answers is not None
        for wid, data in self.answers.read():
            try:
                msg = decode(data, MAX_CONSUMER_MESSAGE_BYTES)
                if wid not in self._authed or not isinstance(msg, Done | Raised | Exhausted):
                    raise ProtocolError(f"{type(msg).__name__} from worker {wid} is not an answer "
                                        "it may send there")
                self._on_worker_message(wid, msg)
            except ProtocolError as exc:
                log.warning("dropped a record from the answer FIFO: %s", exc)

    def _on_made(self, wid: int, msg: Made, payload: list[Any]) -> None:
        """A worker that cannot see the ring sent batch ``bid`` (in the frames ``payload``):
        place it in its slot, or in a one-off segment when it does not fit (the server owns and
        unlinks those anyway)."""
        parts = [np.frombuffer(f.buffer if isinstance(f, zmq.Frame) else f, np.uint8)
                 for f in payload]
        nbytes = sum(part.nbytes for part in parts)
        if nbytes != msg.nbytes:
            raise ProtocolError(f"Made says {msg.nbytes} bytes, its frames have {nbytes}")
        sched = self.sched
        assert sched is not None
        e = sched.by_bid.get(msg.bid)
        if e is None or e.bid not in sched.workers.get(wid, _NO_WORKER).inflight:
            return  # a late answer for a batch given to another worker

        def place(region: np.ndarray[Any, Any]) -> None:
            at = 0
            for part in parts:
                region[at : at + part.nbytes] = part
                at += part.nbytes

        segment = ""
        if e.slot >= 0 and msg.nbytes <= sched.slot_bytes and self.ring is not None:
            place(np.frombuffer(self.ring.mm, np.uint8, msg.nbytes, e.slot * sched.slot_bytes))
        else:
            try:
                segment = shm.write_one_off(self.shm_dir, self.server_id, msg.bid, msg.nbytes,
                                            place)
            except SharedMemoryError as exc:  # as a local worker reports it: the batch failed
                self._on_worker_message(wid, Raised(msg.bid, "SharedMemoryError", str(exc), ""))
                return
        self._on_worker_message(wid, Done(msg.bid, segment, msg.nbytes, msg.layout, msg.busy_s))

    def _on_worker_message(self, wid: int, msg: Message) -> None:
        sched = self.sched
        assert sched is not None
        if isinstance(msg, Done):
            sched.done(wid, msg.bid, msg.segment, msg.nbytes, msg.layout, msg.busy_s)
            cap = self.config.max_worker_tasks
            w = sched.workers.get(wid)
            if cap and w is not None and w.done >= cap and not w.retiring:
                sched.stats["task_cap_restarts"] += 1
                self._retire(w, f"made {w.done} batches (--max-worker-tasks {cap})",
                             time.monotonic())
            if msg.segment and not self._warned_oversize:
                cast("Server", self)._maybe_warn_oversize(time.monotonic())
        elif isinstance(msg, Exhausted):
            sched.exhausted(wid, msg.bid)
        elif isinstance(msg, Raised):
            sched.raised(wid, msg.bid, msg.type_name, msg.message, msg.traceback)
        elif isinstance(msg, WorkerMemory):
            w = sched.workers.get(wid)
            if w is not None:
                w.memory = {k: (v if v >= 0 else None) for k, v in
                            (("rss", msg.rss), ("uss", msg.uss), ("pss", msg.pss),
                             ("swap", msg.swap))}
        elif isinstance(msg, WorkerReady):
            w = sched.workers.get(wid)
            if w is None:
                return
            w.pid = msg.pid
            w.frames = msg.frames
            w.host = msg.host
            h = self.pool.handles.get(wid)
            if h is not None and h.spec.tasks and not w.frames:
                try:  # the worker holds the read end open by now
                    self._task_boxes[wid] = Outbox(h.spec.tasks, 0)
                except OSError as exc:
                    log.debug("worker %d: no task FIFO (%s); tasks by socket", wid, exc)
            if self.ring is not None and not w.frames:
                self._send_worker(wid, UseRing(self.ring_name, sched.slot_bytes, sched.slots))
            w.ready = True
            self.start_failures = 0
            log.debug("worker %d (pid %d) ready", w.index, w.pid)
        elif isinstance(msg, StartFailed):
            self._on_start_failed(wid, msg)

    def _on_start_failed(self, wid: int, msg: StartFailed) -> None:
        assert self.sched is not None
        w = self.sched.workers.get(wid)
        detail = msg.message if msg.type_name.endswith("ConfigError") else (
            f"{msg.type_name}: {msg.message}\n{msg.traceback}".rstrip()
        )
        text = f"worker {w.index if w else '?'} could not load the Sequence: {detail}"
        self.last_start_error = text
        if self.state != "running":
            self.fatal = text
        else:
            log.error("%s", text)

    def _on_worker_exit(self, inc: int) -> None:
        assert self.pool is not None and self.sched is not None
        h = self.pool.handles.get(inc)
        if h is None:
            return
        self._drop_sentinel(h.sentinel)
        if self.stopping:
            return
        if h.process is not None:
            h.process.join(1.0)
        self._authed.discard(inc)
        w = self.sched.workers.get(inc)
        if w is not None and w.retiring and not w.inflight:  # stopped by a cap, replaced
            self.sched.worker_gone(inc, w.retiring)
            self._forget_worker(inc)
            return
        reason = f"worker {h.spec.worker} (pid {w.pid if w else h.pid}) {h.exit_reason()}"
        self._replace(inc, reason)

    def _replace(self, inc: int, reason: str, quarantine: bool = False) -> None:
        assert self.pool is not None and self.sched is not None
        w = self.sched.workers.get(inc)
        if w is None:
            return
        was_ready = w.ready
        retried = self.sched.worker_gone(inc, reason, quarantine)
        h = self.pool.handles.get(inc)
        if h is not None:
            self._drop_sentinel(h.sentinel)
        self._forget_worker(inc)
        self.sched.stats["restarts"] += 1
        if not was_ready:
            self.start_failures += 1
            if self.state != "running" or self.start_failures >= MAX_START_FAILURES:
                self.fatal = self.last_start_error or f"{reason} while loading the Sequence"
                return
        log.warning("%s; replacing it%s", reason,
                    f", retrying batches {[e.index for e in retried]}" if retried else "")
        self._start_worker(w.index)

    def _forget_worker(self, inc: int) -> None:
        assert self.pool is not None
        box = self._task_boxes.pop(inc, None)
        if box is not None:
            box.close()
        self.pool.forget(inc)
        self._authed.discard(inc)
        for table in (self.mem_history, self._retire_since, self._retire_asked):
            table.pop(inc, None)
        self.growing.discard(inc)

    def _stacks(self) -> dict[str, str]:
        """Every worker's Python stacks, by worker index: process workers dump theirs on
        SIGUSR1 (faulthandler, works even inside C code); thread workers are read here."""
        assert self.pool is not None and self.rundir is not None
        out: dict[str, str] = {}
        asked: dict[str, tuple[Path, int]] = {}
        for inc, h in self.pool.handles.items():
            index = h.spec.worker
            key = str(index) if inc == self._current(index) else f"{index} (retiring, #{inc})"
            w = self.sched.workers.get(inc) if self.sched else None
            if w is not None and w.frames:
                out[key] = (f"(Ray actor pid {w.pid} on {w.host}: run `ray stack` on that node, "
                            "or use the Ray dashboard)")
            elif h.killable and (pid := w.pid if w is not None else h.pid):
                path = Path(stack_file(h.spec.address, inc))
                size = path.stat().st_size if path.exists() else 0
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR1)
                    asked[key] = (path, size)
            elif h.thread is not None and h.thread.ident is not None:
                frame = sys._current_frames().get(h.thread.ident)
                out[key] = "".join(traceback.format_stack(frame)) if frame else "(no frame)"
        deadline = time.monotonic() + STACKS_TIMEOUT_S
        while asked and time.monotonic() < deadline:
            for key, (path, size) in list(asked.items()):
                if path.exists() and path.stat().st_size > size:
                    time.sleep(0.02)  # let faulthandler finish writing
                    with open(path) as f:
                        f.seek(size)
                        out[key] = f.read()
                    del asked[key]
            time.sleep(0.01)
        for key in asked:
            out[key] = f"(no stack within {STACKS_TIMEOUT_S:g} s: the worker may be stopped)"
        return out

    def _current(self, index: int) -> int:
        assert self.sched is not None
        return max((w.wid for w in self.sched.workers.values() if w.index == index), default=-1)

    def _drop_sentinel(self, fd: int | None) -> None:
        if fd is not None and self._sentinels.pop(fd, None) is not None:
            self.poller.unregister(fd)
