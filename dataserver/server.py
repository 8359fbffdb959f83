"""The server: sockets, the event loop, start-up and shutdown. Decisions live in the scheduler.

Start-up: sweep stale segments of dead servers, take the server lock, load the Sequence (for its
length), bind the public endpoint (refusing one another server listens on), start the workers
and wait until every one has loaded the Sequence, size the ring (from a probe batch when
``slot_bytes`` is auto) and reserve it in /dev/shm. Only then is the server *ready*.

Shutdown (:meth:`Server.close`, idempotent, also on SIGINT/SIGTERM): stop answering consumers,
ask workers to stop, escalate to SIGTERM then SIGKILL after deadlines, close the sockets,
unlink every segment and the lock, remove the runtime directory and the socket file.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from dataserver import shm
from dataserver._proc import pid_alive, pid_namespace
from dataserver.config import ServerConfig
from dataserver.curve import secure_server
from dataserver.errors import ConfigError, DataServerError, ProtocolError, SharedMemoryError
from dataserver.fifo import MAX_MESSAGE, Inbox, Outbox
from dataserver.logs import setup_logging
from dataserver.monitor import Monitor
from dataserver.pool import Pool
from dataserver.protocol import (
    MAX_CONSUMER_MESSAGE_BYTES,
    VERSION,
    Alive,
    Bye,
    Done,
    EpochEnd,
    Exhausted,
    Fetch,
    Hello,
    Made,
    Message,
    OpenPipes,
    Ping,
    Pipes,
    Pong,
    Raised,
    Ready,
    Refused,
    Release,
    Stacks,
    StartFailed,
    Status,
    StatusReply,
    Stop,
    StreamEnd,
    Take,
    Tasks,
    UseFrames,
    UseRing,
    Want,
    Welcome,
    WorkerMemory,
    WorkerReady,
    decode,
    encode,
)
from dataserver.scheduler import READY, ConsumerState, Dataset, Scheduler, WorkerState
from dataserver.source import SequenceSource, checked_len
from dataserver.worker import WorkerSpec, stack_file

__all__ = ["DATASET", "Server"]

log = logging.getLogger("dataserver")
DATASET = "default"
HOUSEKEEPING_INTERVAL_S = 0.5
HEARTBEAT_S = 1.0
WORKER_QUEUE_DEPTH = 2
MAX_START_FAILURES = 3
OVERSIZE_WARN_INTERVAL_S = 30.0
RETIRE_GRACE_S = 30.0
STACKS_TIMEOUT_S = 1.0
#: Memory samples (one per new batch, at most two a second) that must all rise to warn.
GROWTH_SAMPLES = 10
GROWTH_MIN_BYTES = 32 << 20
SLOT_HEADROOM = 1.25
_NO_WORKER = WorkerState(-1, -1)


class Server:
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
        self.monitor = Monitor()
        self._in_flight_frames: deque[tuple[Any, bytes, list[int], list[shm.Segment]]] = deque()
        self.exporter: Any = None  # dataserver.metrics.MetricsExporter with --metrics
        self.authenticator: Any = None  # zmq ThreadAuthenticator with --curve-keys
        self._retire_since: dict[int, float] = {}
        self._retire_asked: dict[int, float] = {}
        self.mem_history: dict[int, deque[tuple[int, int]]] = {}  # wid -> (done, memory)
        self.growing: set[int] = set()
        self._wake_r = self._wake_w = -1
        self._on_signal: Callable[[int, Any], None] | None = None
        self._secret = secrets.token_hex(16)  # workers prove with it that we started them
        self._authed: set[int] = set()  # incarnations that did
        self.answers: Inbox | None = None
        self.up: Inbox | None = None  # short messages from local consumers (OpenPipes)
        self._pipes: dict[bytes, tuple[int, Inbox, Outbox]] = {}  # cid -> token, down FIFO
        self._by_token: dict[int, bytes] = {}
        self._next_token = 0
        self._worker_copy = True  # recv worker frames as bytes (False: big payloads come)
        self._last_housekeeping = 0.0
        self._last_oversize_warn = 0.0
        self._warned_oversize = 0
        self.started_at = time.monotonic()

    # --- start-up ---------------------------------------------------------------------------

    def start(self) -> None:
        """Everything up to ready; raises ConfigError / SharedMemoryError with one clear line."""
        cfg = self.config
        removed = shm.sweep(self.shm_dir)
        if removed:
            log.info("removed %d leftovers of dead servers: %s", len(removed), ", ".join(removed))
        shm.private_dir(self.shm_dir) if not self.shm_dir.exists() else None
        self.lock = shm.ServerLock(self.shm_dir, self.server_id)
        self.rundir = shm.private_dir(shm.private_dir(shm.runtime_root()) / self.server_id)
        datasets = []
        for name, source in self.sources.items():
            if source.generator:  # made by each worker from the factory; no length
                self.seqs.append(source.factory())
                datasets.append(Dataset(name, 0, stream=True))
                continue
            seq = source.load()
            self.seqs.append(seq)
            datasets.append(Dataset(name, checked_len(seq, source.name), cfg.shuffle, cfg.seed))
        if cfg.worker_type == "thread" and any(d.stream for d in datasets):
            raise ConfigError("--generator needs process workers: each worker runs a generator "
                              "of its own (use --worker-type process)")
        thread = cfg.worker_type == "thread"
        # thread workers share each Sequence: epochs need a barrier only where there is an
        # on_epoch_end to run between them
        barrier = [thread and callable(getattr(seq, "on_epoch_end", None)) for seq in self.seqs]
        self.sched = Scheduler(
            datasets, max_retries=cfg.max_retries, depth=WORKER_QUEUE_DEPTH, barrier=barrier,
            on_epoch_advance=self._advance_shared_epoch if thread else None,
        )
        self.ctx = zmq.Context()
        self._bind_clients()
        self.workers_sock = self.ctx.socket(zmq.ROUTER)
        self.workers_sock.setsockopt(zmq.LINGER, 0)
        self.workers_sock.setsockopt(zmq.SNDHWM, 0)
        self.workers_sock.setsockopt(zmq.RCVHWM, 0)
        worker_address = f"ipc://{self.rundir}/workers.sock"
        self.workers_sock.bind(worker_address)
        os.chmod(self.rundir / "workers.sock", 0o600)
        self.answers = Inbox(str(self.rundir / "answers.fifo"))
        self.poller.register(self.answers.fd, zmq.POLLIN)
        self.up = Inbox(str(self.rundir / "up.fifo"))
        self.poller.register(self.up.fd, zmq.POLLIN)
        self.poller.register(self.workers_sock, zmq.POLLIN)
        self.poller.register(self.clients, zmq.POLLIN)
        if self._wake_r >= 0:
            self.poller.register(self._wake_r, zmq.POLLIN)
        if cfg.metrics:
            from dataserver.metrics import MetricsExporter

            self.exporter = MetricsExporter(cfg.metrics)
        if cfg.slot_bytes is not None:
            self._make_ring(cfg.slot_bytes)
        template = WorkerSpec(
            worker=0, incarnation=0, count=cfg.workers,
            kind="ray" if cfg.backend == "ray" else cfg.worker_type,
            address=worker_address,
            sources=[SequenceSource(obj=seq) for seq in self.seqs] if thread
            else list(self.sources.values()),
            server_id=self.server_id, shm_dir=str(self.shm_dir),
            on_epoch_end=not thread, log_level=logging.getLevelName(log.getEffectiveLevel()),
            secret=self._secret, answers=self.answers.path,
        )
        self.pool = self._ray_pool(template) if cfg.backend == "ray" else Pool(
            template, cfg.start_method)
        self.sched.worker_count = cfg.workers
        for i in range(cfg.workers):
            self._start_worker(i)
        deadline = time.monotonic() + cfg.startup_timeout
        self._run_until(lambda: all(w.ready for w in self.sched.workers.values())  # type: ignore[union-attr]
                        and len(self.sched.workers) == cfg.workers, deadline,  # type: ignore[union-attr]
                        "start the workers")
        if self.ring is None:
            self._probe(deadline)
        self.state = "running"

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

    def _bind_clients(self) -> None:
        assert self.ctx is not None
        endpoint = self.config.endpoint
        if endpoint.startswith("ipc://"):
            path = Path(endpoint[len("ipc://"):])
            self._claim_ipc_path(path)
            self.ipc_path = path
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if self.config.curve_keys:
            try:
                self.authenticator = secure_server(sock, self.ctx, self.config.curve_keys)
            except BaseException:
                sock.close(0)
                raise
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            self.ipc_path = None
            raise ConfigError(f"--endpoint {endpoint}: cannot bind ({exc}); is it taken?") from None
        if self.ipc_path is not None:
            os.chmod(self.ipc_path, 0o600)
        self.clients = sock

    def _claim_ipc_path(self, path: Path) -> None:
        if not path.parent.is_dir():
            raise ConfigError(
                f"--endpoint ipc://{path}: directory {path.parent} does not exist; create it first"
            )
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise ConfigError(
                f"--endpoint ipc://{path}: directory {path.parent} is not writable by you"
            )
        if path.exists() or path.is_symlink():
            if shm.socket_listening(str(path)):
                raise ConfigError(
                    f"--endpoint ipc://{path} is taken: another server listens there. Stop it, "
                    "or choose another --endpoint"
                )
            path.unlink()  # a dead server's socket file

    def _make_ring(self, slot_bytes: int) -> None:
        assert self.sched is not None
        slot_bytes = (slot_bytes + 4095) & ~4095
        try:
            st = os.statvfs(self.shm_dir)
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = 1 << 40
        self.prefetch, slots = self.config.ring_geometry(slot_bytes, free)
        assert self.sched is not None
        self.sched.depth = max(WORKER_QUEUE_DEPTH, -(-self.prefetch // self.config.workers))
        self.ring_name = f"{shm.PREFIX}{self.server_id}-ring"
        self.ring = shm.create(self.shm_dir / self.ring_name, slots * slot_bytes,
                               f"a ring of {slots} slots x {shm.format_bytes(slot_bytes)}")
        ring_stat = os.stat(self.shm_dir / self.ring_name)
        self.ring_id = f"{ring_stat.st_dev}:{ring_stat.st_ino}"
        self.sched.set_ring(slots, slot_bytes)
        log.info("ring: %d slots x %s in %s; prefetch %d", slots, shm.format_bytes(slot_bytes),
                 self.shm_dir / self.ring_name, self.prefetch)
        for w in self.sched.workers.values():
            if w.ready:
                self._send_worker(w.wid, UseRing(self.ring_name, slot_bytes, slots))

    def _probe(self, deadline: float) -> None:
        """slot_bytes=auto: make the first batch of epoch 0 of every dataset in one-off
        segments, size slots from the largest, and keep them for the first consumers."""
        sched = self.sched
        assert sched is not None
        probes = [sched.probe(ds) for ds in range(len(sched.datasets))]
        # (a generator that ends at once makes nothing: its probe is forgotten)
        self._run_until(lambda: all(e.state == READY or e.bid not in sched.by_bid
                                    for e in probes)
                        or sched.probe_error is not None, deadline,
                        "make the first batches to size the slots")
        if sched.probe_error is not None:
            raise ConfigError(
                f"{self.name}: batch 0 (made to size the ring slots) failed: "
                f"{sched.probe_error}\nFix the Sequence, or pass --slot-bytes to skip sizing"
            )
        largest = max((e.nbytes for e in probes if e.state == READY), default=1 << 20)
        self._make_ring(max(int(largest * SLOT_HEADROOM), largest + 4096))

    @property
    def name(self) -> str:
        """The SPECs served, for messages: ``mypkg:Train`` or ``train=mypkg:Train, val=...``."""
        if list(self.sources) == [DATASET]:
            return self.sources[DATASET].name
        return ", ".join(f"{k}={v.name}" for k, v in self.sources.items())

    def _run_until(self, done: Callable[[], bool], deadline: float, what: str) -> None:
        while not done():
            if self.fatal:
                raise ConfigError(self.fatal)
            if self.stopping:
                raise ConfigError(f"interrupted while waiting to {what}")
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"timed out after {self.config.startup_timeout:.0f} s waiting to {what}; "
                    "is the Sequence slow to load? (raise startup_timeout)"
                )
            self._step(100)

    def _start_worker(self, index: int) -> None:
        assert self.pool is not None and self.sched is not None
        # a replacement skips the items its predecessor made from its generator
        h = self.pool.start(index, tuple(d.made[index] for d in self.sched.datasets))
        self.sched.add_worker(WorkerState(h.spec.incarnation, index, pid=h.pid or os.getpid()))
        if h.sentinel is not None:
            self._sentinels[h.sentinel] = h.spec.incarnation
            self.poller.register(h.sentinel, zmq.POLLIN)

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
        if self.up is not None and self.up.fd in events:
            self._on_up()
        if self.workers_sock in events:
            self._drain(self.workers_sock, self._on_worker_frames, self._worker_copy)
        if self.clients in events:
            self._drain(self.clients, self._on_client_frames)
        for fd, inc in list(self._sentinels.items()):
            if fd in events:
                self._on_worker_exit(inc)
        if self._wake_r in events:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 512)
        now = time.monotonic()
        if now - self._last_housekeeping >= HOUSEKEEPING_INTERVAL_S:
            self._last_housekeeping = now
            self._housekeeping(now)
        self._flush()

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
        for cid, ready in sched.out_ready.items():
            c = sched.consumers.get(cid)
            if c is not None and c.frames:
                self._send_frames(cid, ready)
            else:
                self._send_ready(cid, ready)
        sched.out_ready.clear()
        for cid, failed in sched.out_failed:
            self._send_client(cid, encode(failed))
        sched.out_failed.clear()
        for cid in sched.out_ended:
            self._send_client(cid, encode(StreamEnd()))
        sched.out_ended.clear()
        for name in sched.to_unlink:
            shm.unlink(self.shm_dir / name)
        sched.to_unlink.clear()

    def _send_client(self, cid: bytes, data: bytes) -> bool:
        """Send through the consumer's FIFO if it has one and ``data`` fits, else the socket.
        False only when it was too long for the FIFO and the caller may split it."""
        pipe = self._pipes.get(cid)
        if pipe is not None and pipe[2].send(data):
            return True
        if pipe is not None and len(data) > MAX_MESSAGE:
            return False
        assert self.clients is not None
        self.clients.send_multipart([cid, data])
        return True

    def _send_ready(self, cid: bytes, items: list[list[Any]]) -> None:
        data = encode(Ready(items))
        if self._send_client(cid, data):
            return
        if len(items) == 1:  # one announcement longer than a FIFO write: the socket
            assert self.clients is not None
            self.clients.send_multipart([cid, data])
            return
        half = len(items) // 2
        self._send_ready(cid, items[:half])
        self._send_ready(cid, items[half:])

    def _open_pipes(self, cid: bytes) -> str | None:
        sched = self.sched
        assert sched is not None and self.clients is not None and self.rundir is not None
        c = sched.consumers.get(cid)
        if c is None or not c.same_host or c.frames or self.up is None:
            return "OpenPipes is for a consumer on the server's host that maps the ring"
        self._close_pipes(cid)
        token = self._next_token
        self._next_token += 1
        down = Inbox(str(self.rundir / f"down-{token}.fifo"))  # we own it; the consumer reads
        self._pipes[cid] = (token, down, Outbox(down.path, token))
        self._by_token[token] = cid
        self.clients.send_multipart([cid, encode(Pipes(down.path, self.up.path, token))])
        return None

    def _close_pipes(self, cid: bytes) -> None:
        pipe = self._pipes.pop(cid, None)
        if pipe is not None:
            token, down, out = pipe
            self._by_token.pop(token, None)
            out.close()
            down.close()

    def _on_up(self) -> None:
        """Consumer messages from the up FIFO: the same handling as the socket's."""
        assert self.up is not None and self.sched is not None
        for token, data in self.up.read():
            cid = self._by_token.get(token)
            if cid is None:
                continue  # a consumer that left (or a stranger): nothing to answer
            try:
                msg = decode(data, MAX_CONSUMER_MESSAGE_BYTES)
            except ProtocolError as exc:
                self.sched.stats["bad_messages"] += 1
                self._refuse(cid, str(exc))
                continue
            reason = self._on_client(cid, msg)
            if reason:
                self._refuse(cid, reason)

    def _send_frames(self, cid: bytes, ready: list[list[Any]]) -> None:
        """Ready, then each batch's bytes as a frame sent from shared memory without a copy
        (pyzmq copy=False); the leases end when the tracker says the frames have left."""
        assert self.clients is not None and self.ring is not None
        views: list[Any] = []
        keep: list[shm.Segment] = []
        for _epoch, _pos, _index, _bid, segment, offset, nbytes, _layout in ready:
            if segment:
                seg = shm.attach(self.shm_dir / segment, writable=False)
                keep.append(seg)
                views.append(memoryview(seg.mm)[:nbytes])
            else:
                views.append(memoryview(self.ring.mm)[offset : offset + nbytes])
        tracker = self.clients.send_multipart([cid, encode(Ready(ready)), *views], copy=False,
                                              track=True)
        self._in_flight_frames.append((tracker, cid, [item[3] for item in ready], keep))

    def _reap_frames(self) -> None:
        """End the leases of batches whose frames have left."""
        assert self.sched is not None
        while self._in_flight_frames and self._in_flight_frames[0][0].done:
            _tracker, cid, bids, keep = self._in_flight_frames.popleft()
            self.sched.release(cid, bids)
            for seg in keep:
                seg.close()

    def _send_worker(self, wid: int, msg: Message) -> None:
        assert self.workers_sock is not None
        self.workers_sock.send_multipart([f"w{wid}".encode(), encode(msg)])

    # --- workers ----------------------------------------------------------------------------

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
                    self._on_made(wid, msg, frames[i])
                    i += 1
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

    def _on_made(self, wid: int, msg: Made, payload: Any) -> None:
        """A worker that cannot see the ring sent batch ``bid``: place it in its slot, or in a
        one-off segment when it does not fit (the server owns and unlinks those anyway)."""
        sched = self.sched
        assert sched is not None
        data = memoryview(payload.buffer if isinstance(payload, zmq.Frame) else payload)
        if data.nbytes != msg.nbytes:
            raise ProtocolError(f"Made says {msg.nbytes} bytes, its frame has {data.nbytes}")
        e = sched.by_bid.get(msg.bid)
        if e is None or e.bid not in sched.workers.get(wid, _NO_WORKER).inflight:
            return  # a late answer for a batch given to another worker
        src = np.frombuffer(data, np.uint8)
        segment = ""
        if e.slot >= 0 and msg.nbytes <= sched.slot_bytes and self.ring is not None:
            start = e.slot * sched.slot_bytes
            np.frombuffer(self.ring.mm, np.uint8, msg.nbytes, start)[:] = src
        else:
            segment = f"{shm.PREFIX}{self.server_id}-big-{msg.bid}"
            seg = shm.create(self.shm_dir / segment, max(msg.nbytes, 1),
                             f"batch of {msg.nbytes} bytes")
            try:
                np.frombuffer(seg.mm, np.uint8, msg.nbytes)[:] = src
            finally:
                seg.close()
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
                self._maybe_warn_oversize(time.monotonic())
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
            if h is not None and h.process is None and h.thread is None:
                h.pid = msg.pid  # a Ray actor's handle learns its pid here
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
            elif h.killable and h.pid:
                path = Path(stack_file(h.spec.address, inc))
                size = path.stat().st_size if path.exists() else 0
                with contextlib.suppress(ProcessLookupError):
                    os.kill(h.pid, signal.SIGUSR1)
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

    # --- consumers --------------------------------------------------------------------------

    def _on_client_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            if frames:
                self._refuse(frames[0], "send one frame per message")
            return
        cid, data = frames
        try:
            msg = decode(data, MAX_CONSUMER_MESSAGE_BYTES)
        except ProtocolError as exc:
            self.sched.stats["bad_messages"] += 1  # type: ignore[union-attr]
            self._refuse(cid, str(exc))
            return
        reason = self._on_client(cid, msg)
        if reason:
            self._refuse(cid, reason)

    def _refuse(self, cid: bytes, reason: str) -> None:
        assert self.clients is not None
        self.clients.send_multipart([cid, encode(Refused(reason))])

    def _on_client(self, cid: bytes, msg: Message) -> str | None:
        sched = self.sched
        assert sched is not None and self.clients is not None
        c = sched.consumers.get(cid)
        if c is not None:
            c.seen = time.monotonic()
        if isinstance(msg, Alive):
            owner = sched.consumers.get(msg.consumer)
            if owner is not None:
                owner.seen = time.monotonic()
            return None
        if isinstance(msg, Want):
            return sched.want(cid, msg.epoch, msg.start, msg.stop, msg.step, msg.urgent)
        if isinstance(msg, Take):
            return sched.take(cid, msg.count)
        if isinstance(msg, UseFrames):
            if c is None:
                return "UseFrames before Hello; send Hello first"
            c.frames = True
            self._close_pipes(cid)
            return None
        if isinstance(msg, OpenPipes):
            return self._open_pipes(cid)
        if isinstance(msg, Release):
            return sched.release(cid, msg.bids)
        if isinstance(msg, Fetch):
            return sched.fetch(cid, msg.epoch, msg.index)
        if isinstance(msg, Ping):
            self.clients.send_multipart([cid, encode(Pong())])
            return None
        if isinstance(msg, (Status, Stacks)):
            snap = self.monitor.snapshot(self)
            if isinstance(msg, Stacks):
                snap["stacks"] = self._stacks()
            snapshot = msgpack.packb(snap, use_bin_type=True)
            self.clients.send_multipart([cid, encode(StatusReply(snapshot))])
            return None
        if isinstance(msg, EpochEnd):
            sched.epoch_end(cid, msg.epoch)
            return None
        if isinstance(msg, Bye):
            sched.remove_consumer(cid, msg.held)
            self._close_pipes(cid)
            log.info("consumer %s left", c.name if c else cid.hex())
            return None
        if isinstance(msg, Hello):
            return self._hello(cid, msg)
        return f"{type(msg).__name__} is not a consumer message"

    def _hello(self, cid: bytes, msg: Hello) -> str | None:
        sched = self.sched
        assert sched is not None and self.clients is not None
        if msg.version != VERSION:
            return (f"protocol version {msg.version} is not this server's {VERSION}; install the "
                    "same dataserver version on both sides")
        names = [d.name for d in sched.datasets]
        if msg.dataset in names:
            ds = names.index(msg.dataset)
        elif msg.dataset in ("", DATASET) and len(names) == 1:
            ds = 0
        else:
            return (f"no dataset {msg.dataset!r} here; this server serves "
                    f"{', '.join(map(repr, names))}: pass dataset=NAME")
        d = sched.datasets[ds]
        if cid in sched.consumers:
            sched.remove_consumer(cid)
        self._close_pipes(cid)
        same_host = bool(msg.pidns) and msg.pidns == pid_namespace()
        sched.add_consumer(ConsumerState(cid, msg.pid, same_host, msg.name[:200], ds))
        log.info("consumer %s joined %s", msg.name[:200], d.name)
        self.clients.send_multipart([cid, encode(Welcome(
            VERSION, self.server_id, d.name, d.length, d.shuffle, d.seed,
            str(self.shm_dir), self.ring_name, sched.slot_bytes, sched.slots, self.prefetch,
            os.getpid(), pid_namespace(), HEARTBEAT_S, d.stream, self.ring_id,
        ))])
        return None

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
            self.exporter.update(self.monitor.snapshot(self))

    def _check_caps(self, now: float) -> None:
        """Retire workers over --max-worker-tasks or --max-worker-memory (they finish what they
        hold, then stop; a replacement starts at once), kill a retiree that does not finish
        within RETIRE_GRACE_S, and warn about workers whose memory keeps growing."""
        sched, cfg, pool = self.sched, self.config, self.pool
        assert sched is not None and pool is not None
        for w in list(sched.workers.values()):
            if not w.ready:
                continue
            if w.retiring:
                if not w.inflight and w.wid in self._retire_asked:
                    continue
                if not w.inflight:
                    self._send_worker(w.wid, Stop())
                    self._retire_asked[w.wid] = now
                elif now - self._retire_since.get(w.wid, now) > RETIRE_GRACE_S:
                    log.warning("worker %d did not finish its batches within %.0f s of "
                                "retiring; killing it", w.index, RETIRE_GRACE_S)
                    pool.kill(w.wid)
                continue
            why = ""
            if cfg.backend == "ray" or cfg.worker_type == "process":
                mem = (w.memory if cfg.backend == "ray" else self.monitor.process(w.pid)
                       ).get(cfg.memory_kind)
                self._note_memory(w, mem)
                if cfg.max_worker_memory and mem and mem > cfg.max_worker_memory:
                    why = (f"uses {shm.format_bytes(mem)} {cfg.memory_kind.upper()}, over "
                           f"--max-worker-memory {shm.format_bytes(cfg.max_worker_memory)}")
                    sched.stats["memory_cap_restarts"] += 1
            if why:
                self._retire(w, why, now)

    def _retire(self, w: WorkerState, why: str, now: float) -> None:
        """No more work for ``w``; it stops once idle; a replacement starts now."""
        w.retiring = f"worker {w.index} (pid {w.pid}) {why}"
        self._retire_since[w.wid] = now
        log.warning("%s; replacing it once it finishes its batches", w.retiring)
        self._start_worker(w.index)

    def _note_memory(self, w: WorkerState, mem: int | None) -> None:
        """Keep a worker's memory after each new batch; flag steady growth once."""
        if mem is None:
            return
        history = self.mem_history.setdefault(w.wid, deque(maxlen=GROWTH_SAMPLES))
        if history and history[-1][0] == w.done:
            return
        history.append((w.done, mem))
        if w.wid in self.growing or len(history) < GROWTH_SAMPLES:
            return
        mems = [m for _, m in history]
        grew = mems[-1] - mems[0]
        if all(b > a for a, b in itertools.pairwise(mems)) and grew > max(
                GROWTH_MIN_BYTES, mems[0] // 5):
            self.growing.add(w.wid)
            log.warning(
                "worker %d (pid %d) grew by %s over its last %d batches and keeps growing. "
                "Usual causes: a cache that is never bounded, references kept to old batches, "
                "or Python objects (lists, dicts) shared from the parent whose refcounts copy "
                "their pages (keep big tables in numpy arrays). --max-worker-memory caps it",
                w.index, w.pid, shm.format_bytes(grew), GROWTH_SAMPLES)

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
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.shm_dir):
                if entry.name.startswith(f"{shm.PREFIX}{self.server_id}-"):
                    shm.unlink(Path(entry.path))
        if self.lock is not None:
            self.lock.release()
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)
        log.info("stopped; removed the ring and every segment of server %s", self.server_id)


def run_in_child(config: ServerConfig, source: SequenceSource | dict[str, SequenceSource],
                 conn: Any, level: str) -> None:
    """Entry point of the server process that ``DataServer`` starts."""
    import msgpack

    setup_logging(level, config.log_format)
    server = Server(config, source)

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
