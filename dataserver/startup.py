"""The server's start-up: datasets, sockets, FIFOs, workers, and the ring sized from a probe.

Sweep stale segments of dead servers, take the server lock, load the Sequence (for its length),
bind the public endpoint (refusing one another server listens on), start the workers and wait
until every one has loaded the Sequence, size the ring (from a probe batch when ``slot_bytes``
is auto) and reserve it in /dev/shm. Only then is the server *ready*.

A mixin of :class:`dataserver.server.Server`, which owns the state these methods use.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import zmq

from dataserver import shm
from dataserver.curve import secure_server
from dataserver.errors import ConfigError
from dataserver.fifo import Inbox
from dataserver.pool import Pool
from dataserver.protocol import UseRing
from dataserver.scheduler import READY, Dataset, Scheduler
from dataserver.source import SequenceSource, checked_len
from dataserver.supervise import WorkerSide
from dataserver.worker import WorkerSpec

if TYPE_CHECKING:
    from dataserver.server import Server

__all__ = ["SLOT_HEADROOM", "WORKER_QUEUE_DEPTH", "StartUp"]

log = logging.getLogger("dataserver")
#: Tasks queued per worker, the running one included, at least (more with a deep prefetch).
WORKER_QUEUE_DEPTH = 2
#: Slots are this much bigger than the largest probe batch, for batches that vary a little.
SLOT_HEADROOM = 1.25
#: The server process's GIL switch interval with thread workers (CPython's default is 5 ms).
#: A worker thread running Python keeps the GIL until the interval ends, so the server's
#: thread learned of a finished batch up to 5 ms late and consumers got batches in bursts
#: (measured at 2 ms of Python per batch: 30% of waits 4.5-9 ms at 5 ms; at 0.1 ms the
#: waits are even, 2-4 ms, and batches/s rose from 443 to 489 against 490 inline).
THREAD_SWITCH_INTERVAL_S = 1e-4


class StartUp(WorkerSide):
    # the Server's state these methods use (set in Server.__init__), beyond WorkerSide's
    sources: dict[str, SequenceSource]
    seqs: list[Any]
    lock: shm.ServerLock | None
    ctx: zmq.Context[zmq.Socket[bytes]] | None
    clients: zmq.Socket[bytes] | None
    ipc_path: Path | None
    authenticator: Any
    exporter: Any
    prefetch: int
    ring_id: str
    up: Inbox | None
    owner_fd: int
    _wake_r: int

    def start(self) -> None:
        """Everything up to ready; raises ConfigError / SharedMemoryError with one clear line."""
        cfg = self.config
        removed = shm.sweep(self.shm_dir)
        if removed:
            log.info("removed %d leftovers of dead servers: %s", len(removed), ", ".join(removed))
        shm.private_dir(self.shm_dir) if not self.shm_dir.exists() else None
        self.lock = shm.ServerLock(self.shm_dir, self.server_id)
        self.rundir = shm.private_dir(shm.private_dir(shm.runtime_root()) / self.server_id)
        self.sched = self._load_datasets()
        self.ctx = zmq.Context()
        self._bind_clients()
        worker_address = self._open_worker_side()
        if cfg.metrics:
            from dataserver.metrics import MetricsExporter

            self.exporter = MetricsExporter(cfg.metrics)
        if cfg.slot_bytes is not None:
            self._make_ring(cfg.slot_bytes)
        self._start_workers(worker_address)
        sched = self.sched
        deadline = time.monotonic() + cfg.startup_timeout
        self._run_until(lambda: all(w.ready for w in sched.workers.values())
                        and len(sched.workers) == cfg.workers, deadline, "start the workers")
        if self.ring is None:
            self._probe(deadline)
        self.state = "running"

    def _load_datasets(self) -> Scheduler:
        """Load each Sequence (for its length) and make the scheduler for them."""
        cfg = self.config
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
        return Scheduler(
            datasets, max_retries=cfg.max_retries, depth=WORKER_QUEUE_DEPTH, barrier=barrier,
            on_epoch_advance=cast("Server", self)._advance_shared_epoch if thread else None,
        )

    def _open_worker_side(self) -> str:
        """The workers' socket and the FIFOs, all registered with the poller; the address."""
        assert self.ctx is not None and self.rundir is not None and self.clients is not None
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
        if self.owner_fd >= 0:
            self.poller.register(self.owner_fd, zmq.POLLIN)
        return worker_address

    def _start_workers(self, worker_address: str) -> None:
        cfg = self.config
        thread = cfg.worker_type == "thread"
        assert self.sched is not None and self.answers is not None
        template = WorkerSpec(
            worker=0, incarnation=0, count=cfg.workers,
            kind="ray" if cfg.backend == "ray" else cfg.worker_type,
            address=worker_address,
            sources=[SequenceSource(obj=seq) for seq in self.seqs] if thread
            else list(self.sources.values()),
            server_id=self.server_id, shm_dir=str(self.shm_dir),
            on_epoch_end=not thread, log_level=logging.getLevelName(log.getEffectiveLevel()),
            secret=self._secret, answers=self.answers.path, server_pid=os.getpid(),
        )
        if thread:
            sys.setswitchinterval(THREAD_SWITCH_INTERVAL_S)
        self.pool = self._ray_pool(template) if cfg.backend == "ray" else Pool(
            template, cfg.start_method)
        self.sched.worker_count = cfg.workers
        for i in range(cfg.workers):
            self._start_worker(i)

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
                f"{cast('Server', self).name}: batch 0 (made to size the ring slots) failed: "
                f"{sched.probe_error}\nFix the Sequence, or pass --slot-bytes to skip sizing"
            )
        largest = max((e.nbytes for e in probes if e.state == READY), default=1 << 20)
        self._make_ring(max(int(largest * SLOT_HEADROOM), largest + 4096))

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
            cast("Server", self)._step(100)
