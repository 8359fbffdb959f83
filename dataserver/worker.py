"""The worker loop: one function, one spec argument, a visible state machine.

States: STARTING (connect, load the Sequence) -> READY (say so, wait) -> BUSY (produce tasks)
-> EXITED. A process worker also exits when its server does: ``PR_SET_PDEATHSIG`` on Linux, and
a parent-pid check every ``POLL_INTERVAL_S`` elsewhere.

A task ``[bid, epoch, index, slot]`` is produced by calling ``seq[index]``, planning its layout,
and copying it into ring slot ``slot`` (or, when it does not fit or ``slot`` is -1, into a
one-off segment the worker creates under the server's name; the server owns and unlinks it).
A worker that cannot see the server's shared memory (a Ray actor on another host) sends each
batch instead as a ``Made`` message and one frame of bytes, which the server places.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import zmq

from dataserver import layout, shm
from dataserver._proc import pid_alive, pid_namespace
from dataserver.alloc import empty, full, slot_allocation, zeros
from dataserver.fifo import Inbox, Outbox
from dataserver.protocol import (
    FRAMES_SPLIT,
    Done,
    Exhausted,
    Made,
    Raised,
    StartFailed,
    Stop,
    Tasks,
    UseRing,
    WorkerMemory,
    WorkerReady,
    decode,
    encode,
    frame_chunks,
    send_tracked,
)
from dataserver.source import SequenceSource, WorkerInfo, set_worker_info

__all__ = ["WorkerSpec", "empty", "full", "stack_file", "worker_main", "zeros"]

POLL_INTERVAL_S = 0.5
#: A worker sending frames keeps this many buffers of big batches ZeroMQ has let go of.
SPARE_PAYLOADS = 2
#: Ray workers report their own memory (the server may be on another host) this often.
MEMORY_REPORT_S = 1.0
log = logging.getLogger("dataserver.worker")


@dataclass(frozen=True)
class WorkerSpec:
    worker: int  # stable index 0..count-1 (worker_info().id)
    incarnation: int  # unique per started worker; its socket identity and message id
    count: int
    kind: str  # "process", "thread" or "ray" (a Ray actor)
    address: str  # the server's private worker endpoint
    sources: list[SequenceSource]  # one per dataset, in the server's order
    server_id: str
    shm_dir: str
    on_epoch_end: bool  # call the Sequence's on_epoch_end here (process workers)
    log_level: str = "WARNING"
    skip: tuple[int, ...] = ()  # per dataset: generator items a predecessor already made
    secret: str = ""  # proves to the server that this worker is one it started
    answers: str = ""  # the server's answer FIFO (dataserver.fifo); "": answer by socket
    tasks: str = ""  # this worker's task FIFO, made by the pool; "": tasks by socket only
    server_pid: int = 0  # the server, watched while idle (a fork server may be our parent)
    # Ray actors only:
    tcp_address: str = ""  # the worker endpoint for actors on other hosts
    transport: str = "auto"  # auto: shared memory when on the server's host; shm; frames
    paths: tuple[str, ...] = ()  # the server's code folders, added to sys.path where present
    pidns: int = 0  # the server's pid namespace


def local_to_server(spec: WorkerSpec) -> bool:
    """Whether this process sees the server's shared memory and sockets: the server's lock file
    (named by its unique id) exists here, and pids are comparable."""
    lock = Path(spec.shm_dir) / f"{shm.PREFIX}{spec.server_id}.lock"
    return spec.pidns == pid_namespace() and lock.exists()


def ray_transport(spec: WorkerSpec) -> str:
    """"shm" or "frames" for this Ray actor; raises ConfigError if shm is asked for and
    impossible."""
    local = local_to_server(spec)
    if spec.transport == "shm" and not local:
        from dataserver.errors import ConfigError

        raise ConfigError(f"--ray-transport shm: this Ray actor (host {os.uname().nodename}) "
                          "cannot see the server's shared memory; use auto or frames")
    if spec.transport == "frames" or not local:
        return "frames"
    return "shm"


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    _let_the_fork_server_go()


def _let_the_fork_server_go() -> None:
    """A process forked by a fork server inherits the write end of the pipe whose end of file
    tells the fork server that its client (the server) is gone (CPython hands it down so that
    children can ask the fork server for processes of their own). Held by the workers, it
    would keep the fork server alive after the server died, and the fork server, their parent,
    would keep them alive: close it, so the fork server exits with the server and
    PR_SET_PDEATHSIG takes the workers with it."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if server is not None and fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None


def _error_fields(exc: BaseException) -> tuple[str, str, str]:
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else (
        f"{kind.__module__}.{kind.__qualname__}"
    )
    return name, str(exc), "".join(traceback.format_exception(exc))


class _Worker:
    def __init__(self, spec: WorkerSpec, sock: zmq.Socket[bytes], seqs: list[Any],
                 frames: bool = False, answers: Outbox | None = None,
                 tasks: Inbox | None = None) -> None:
        self.spec = spec
        self.answers = answers
        self.tasks = tasks
        self.frames = frames  # send batches as frames instead of writing the ring
        # frames: buffers of big batches sent, each with the tracker that says when ZeroMQ let
        # go of it (a fresh 32 MiB buffer per batch cost ~8k page faults)
        self.sent: list[tuple[np.ndarray[Any, Any], zmq.MessageTracker]] = []
        self.pending: np.ndarray[Any, Any] | None = None  # the big batch being answered
        self.sock = sock
        self.seqs = seqs
        self.epochs = [0] * len(seqs)  # on_epoch_end calls so far, per dataset
        self.ring: shm.Segment | None = None
        self.ring_array: np.ndarray[Any, Any] | None = None
        self.slot_bytes = 0
        self.dir = Path(spec.shm_dir)
        # our parent: the server, or with forkserver the fork server (which dies with it)
        self.parent = os.getppid()
        self.next_report = 0.0

    def use_ring(self, msg: UseRing) -> None:
        self.ring = shm.attach(self.dir / msg.ring, writable=True)
        self.ring_array = np.frombuffer(self.ring.mm, np.uint8)
        self.slot_bytes = msg.slot_bytes

    def run_task(self, bid: int, ds: int, epoch: int, index: int, slot: int
                 ) -> bytes | list[Any]:
        """Produce one batch; return the answer to send (Done or Raised)."""
        spec = self.spec
        t0 = time.perf_counter()
        seq = self.seqs[ds]
        try:
            region = self.slot_region(slot)
            if spec.sources[ds].generator:
                with slot_allocation(region) as allocated:
                    try:
                        batch = next(seq)
                    except StopIteration:
                        return encode(Exhausted(bid))
                return self.finish(bid, index, slot, batch, t0, allocated)
            if spec.on_epoch_end:
                while self.epochs[ds] < epoch and hasattr(seq, "on_epoch_end"):
                    self.epochs[ds] += 1
                    set_worker_info(WorkerInfo(spec.worker, spec.count, self.epochs[ds],
                                               spec.kind), spec.kind == "thread")
                    seq.on_epoch_end()
            self.epochs[ds] = max(self.epochs[ds], epoch)
            with slot_allocation(region) as allocated:
                batch = seq[index]
            return self.finish(bid, index, slot, batch, t0, allocated)
        except Exception as exc:  # MemoryError too: the batch failed, the worker goes on
            return encode(Raised(bid, *_error_fields(exc)))

    def slot_region(self, slot: int) -> np.ndarray[Any, Any] | None:
        if slot < 0 or self.ring_array is None:
            return None
        start = slot * self.slot_bytes
        return self.ring_array[start : start + self.slot_bytes]

    def finish(self, bid: int, index: int, slot: int, batch: Any, t0: float,
               allocated: Any = None) -> bytes | list[Any]:
        """Lay the batch out, write it into its slot (or a one-off segment); the answer."""
        try:
            region = self.slot_region(slot)
            if batch is None:
                raise layout.BatchFormatError(
                    f"batch {index}: __getitem__ returned None; return the batch, e.g. (x, y)"
                )
            inplace = None
            if allocated is not None and allocated.used:
                inplace = (allocated.region.__array_interface__["data"][0], allocated.used)
            plan = layout.plan(batch, index, inplace)
            if self.frames:
                payload = self.payload(plan.nbytes)
                layout.write(plan, payload)
                return [encode(Made(bid, plan.nbytes, plan.layout, time.perf_counter() - t0)),
                        *frame_chunks(payload.data)]
            segment = ""
            if region is not None and plan.nbytes <= self.slot_bytes:
                layout.write(plan, region[: plan.nbytes])
            else:
                if plan.in_place:  # too big for the slot after all: copy everything out
                    plan = layout.plan(batch, index)
                segment = self.write_oversize(bid, plan)
            del batch
        except Exception as exc:  # MemoryError too: the batch failed, the worker goes on
            return encode(Raised(bid, *_error_fields(exc)))
        return encode(Done(bid, segment, plan.nbytes, plan.layout, time.perf_counter() - t0))

    def payload(self, nbytes: int) -> np.ndarray[Any, Any]:
        """Where a batch sent as frames is laid out. For one over FRAMES_SPLIT: a buffer an
        earlier batch was sent from, once ZeroMQ let go of it (at most twice as big), else a
        new one; serve() keeps it with the tracker of its send, and lets go of the spare ones
        when it has had nothing to do for a poll interval."""
        if nbytes <= FRAMES_SPLIT:
            return np.empty(nbytes, np.uint8)
        buf = None
        for entry in self.sent:
            if entry[1].done and nbytes <= entry[0].nbytes <= 2 * nbytes:
                self.sent.remove(entry)
                buf = entry[0]
                break
        if buf is None:
            buf = np.empty(nbytes, np.uint8)
            # keep the sends still in flight and a few free buffers, not every size seen
            self.sent = [e for e in self.sent if not e[1].done] + [
                e for e in self.sent if e[1].done][-SPARE_PAYLOADS:]
        self.pending = buf
        return buf[:nbytes]

    def write_oversize(self, bid: int, plan: layout.Plan) -> str:
        return shm.write_one_off(self.dir, self.spec.server_id, bid, plan.nbytes,
                                 lambda region: layout.write(plan, region))

    def serve(self) -> None:
        """Wait for messages; run queued tasks in order, answering each as soon as it is made
        (holding answers back to send them together saved nothing measurable, and let one slow
        batch delay the finished ones before it)."""
        poll_ms = int(POLL_INTERVAL_S * 1000)
        queue: deque[list[int]] = deque()
        reports = self.spec.kind == "ray"  # Ray workers report their own memory
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        if self.tasks is not None:
            poller.register(self.tasks.fd, zmq.POLLIN)
        while True:
            if reports and time.monotonic() >= self.next_report:
                self.report_memory()
            events = dict(poller.poll(0 if queue else poll_ms))
            if not events and not queue:
                if self.sent:  # idle: keep no buffer ZeroMQ is done with (see payload)
                    self.sent = [e for e in self.sent if not e[1].done]
                if self.spec.kind == "process" and (
                        os.getppid() != self.parent
                        or (self.spec.server_pid and not pid_alive(self.spec.server_pid))):
                    return  # the server (or the fork server that started us) is gone
                continue
            for data in self.receive(events):
                msg = decode(data)
                if isinstance(msg, Tasks):
                    queue.extend(msg.items)
                elif isinstance(msg, UseRing):
                    self.use_ring(msg)
                elif isinstance(msg, Stop):
                    return
            if queue:
                answer = self.run_task(*queue.popleft())
                pending, self.pending = self.pending, None
                if type(answer) is list:
                    if pending is not None:  # its buffer is reused once ZeroMQ is done
                        self.sent.append((pending, send_tracked(self.sock, answer)))
                    else:
                        self.sock.send_multipart(answer, copy=False)
                elif self.answers is None or not self.answers.send(answer):  # type: ignore[arg-type]
                    self.sock.send(answer)  # type: ignore[arg-type]
                del answer, pending  # the batch's bytes: not kept alive until the next task

    def receive(self, events: dict[Any, int]) -> list[bytes]:
        """The server's messages waiting, in the order it sent them. It writes the FIFO until
        something must go by socket, then only the socket (dataserver.supervise), so: the
        socket's messages first, then the FIFO (also when poll() did not see it ready: a
        record may have landed since), whose records go first: they were written first."""
        received: list[bytes] = []
        if self.sock in events:
            while True:
                try:
                    received.append(self.sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
        if self.tasks is not None and (self.tasks.fd in events or received):
            piped = [data for _token, data in self.tasks.read()]
            return piped + received if received else piped
        return received

    def report_memory(self) -> None:
        """Ray actors: the server may not see this process, so it hears our memory from us."""
        import psutil

        from dataserver.procmem import own_memory, segment_prefix

        self.next_report = time.monotonic() + MEMORY_REPORT_S
        try:
            mem = own_memory(psutil.Process(),
                             segment_prefix(self.spec.shm_dir, self.spec.server_id))
        except psutil.Error:
            return
        fig = {k: -1 if v is None else v for k, v in mem.items()}
        self.sock.send(encode(WorkerMemory(self.spec.incarnation, fig["rss"], fig["uss"],
                                           fig["pss"], fig["swap"])))


def stack_file(address: str, incarnation: int) -> str:
    """Where process worker ``incarnation`` dumps its stacks: beside the worker socket."""
    return os.path.join(os.path.dirname(address[len("ipc://"):]), f"stacks-{incarnation}.txt")


def _route(spec: WorkerSpec) -> tuple[bool, str, BaseException | None]:
    """(frames?, the server's address, an error to report once connected): a Ray actor that
    cannot see the ring sends its batches as frames over TCP."""
    if spec.kind != "ray":
        return False, spec.address, None
    try:
        frames = ray_transport(spec) == "frames"
    except BaseException as exc:  # reported once connected
        if not spec.tcp_address:  # no way to reach the server: the actor's run() says it
            raise
        return True, spec.tcp_address, exc
    return frames, spec.tcp_address if frames else spec.address, None


def _own_process(spec: WorkerSpec, frames: bool) -> IO[str] | None:
    """A worker with a process of its own: signals, logging, and (returned) the file its
    Python stacks go to on SIGUSR1, for ``dataserver status --stacks``."""
    if spec.kind == "process":
        _die_with_parent()
    stacks = None
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when workers stop
        # forked workers inherit the server's handlers and wake-up pipe: undo both
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        if not frames:
            stacks = open(stack_file(spec.address, spec.incarnation), "w")  # noqa: SIM115
            faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    logging.basicConfig(
        level=spec.log_level,
        format=f"[worker {spec.worker}/{spec.count} pid {os.getpid()}] %(message)s",
    )
    return stacks


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of a worker process, thread or Ray actor."""
    own_process = spec.kind != "thread"
    frames, address, start_error = _route(spec)
    stacks = _own_process(spec, frames) if own_process else None
    ctx = zmq.Context() if own_process else zmq.Context.instance()
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.setsockopt(zmq.IDENTITY, f"w{spec.incarnation}".encode())
    sock.connect(address)
    worker: _Worker | None = None
    answers: Outbox | None = None
    tasks: Inbox | None = None
    try:
        set_worker_info(WorkerInfo(spec.worker, spec.count, 0, spec.kind), not own_process)
        try:
            if start_error is not None:
                raise start_error
            seqs = [source.load() for source in spec.sources]
            for ds, skip in enumerate(spec.skip):  # a replacement resumes its generators
                for _ in range(skip if spec.sources[ds].generator else 0):
                    next(seqs[ds], None)
        except BaseException as exc:
            sock.send(encode(StartFailed(spec.incarnation, spec.secret, *_error_fields(exc))))
            return
        if spec.tasks and not frames:  # open before WorkerReady: the server then opens it
            tasks = Inbox(spec.tasks, create=False, keep=True)
        sock.send(encode(WorkerReady(spec.incarnation, os.getpid(), spec.secret, frames,
                                     os.uname().nodename)))
        if spec.answers and not frames:
            answers = Outbox(spec.answers, spec.incarnation)
        worker = _Worker(spec, sock, seqs, frames, answers, tasks)
        worker.serve()
    finally:
        if stacks is not None:
            faulthandler.unregister(signal.SIGUSR1)
            stacks.close()
        if worker is not None and worker.ring is not None:
            worker.ring_array = None
            worker.ring.close()
        for box in (answers, tasks):
            if box is not None:
                box.close()
        sock.close()
        if own_process:
            ctx.term()
