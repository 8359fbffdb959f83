"""The contenders. Each ``measure_*`` runs one measurement and returns a dict of figures.

* ``inline``: ``seq[i]`` in this process, then consume it.
* ``ring``: ``seq[i]`` in this process, ``np.copyto`` into a slot of a preallocated
  shared-memory ring (a file in the shm directory, unlinked as soon as it is mapped), consume
  the slot: one copy and nothing else, the single-copy ceiling for one producer (a server
  with 2 workers can beat it when producing the batch, not copying it, is the cost).
* ``frames``: ``process``, but the consumer gets the bytes as ZeroMQ frames (as a consumer
  on another host would; here over the ipc socket) instead of mapping the ring.
* ``zerocopy``: ``process``, with the Sequence building ``x`` by ``dataserver.empty`` (in the
  slot: no copy in the worker).
* ``process`` / ``thread``: a ``DataServer`` with 2 workers of that kind, started outside the
  timed region; epoch 1 gives the time to first batch, epoch 2 (after ``on_epoch_end``) the
  steady-state rate; the first batch of each later epoch and the gap before it (the epoch-end
  stall) are medians over epochs 2 to 2 + EXTRA_EPOCHS.
* ``keras-proc``, ``keras-thread``, ``torch``: the peers, measured the same way (bench/peers.py);
  each is skipped with a note where its framework is not installed.

inline and ring have no start-up and no epoch boundary to speak of: they cycle through the
indices until ``min_s`` has passed (after an untimed warm-up) and report the mean rate.
Every contender reports the consumer's RSS at the end of its measurement, and those with worker
processes the workers' USS (bench/memory.py).
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import secrets
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from time import perf_counter
from typing import Any, NamedTuple

import numpy as np

from bench import memory
from bench.workload import BenchError, Checker, Workload

__all__ = ["CONTENDERS", "DATASERVER", "OPTIONAL", "PEERS", "RAY", "Epoch", "boundary", "measure",
           "read_epoch"]

DATASERVER = ("process", "thread", "zerocopy", "frames")
#: --backend ray (pip install -e '.[ray]'): not in the default run (each starts a private Ray,
#: ~4 s); ask for them with --only, e.g. --only process,frames,ray,ray-frames.
RAY = ("ray", "ray-frames")
PEERS = ("keras-proc", "keras-thread", "torch")  # bench.peers.PEERS, without importing it
CONTENDERS = ("inline", "ring", *DATASERVER, *PEERS)
OPTIONAL = RAY
RING_SLOTS = 4
#: inline and ring first run untimed for this fraction of ``min_s`` (the dataservers' epoch 1
#: plays that part for them): first-touch page faults, allocator and cache warm-up.
WARMUP = 0.2
RING_PREFIX = "dsbench-ring-"
#: The dataserver contenders read this many epochs after epoch 2, so that their first-batch
#: and stall figures are medians over that many boundaries more.
EXTRA_EPOCHS = 4
_servers = itertools.count()


def _result(batches: int, seconds: float, nbytes: int, **extra: Any) -> dict[str, Any]:
    rate = batches / seconds
    return {"batches": batches, "seconds": seconds, "batches_per_s": rate,
            "gb_per_s": rate * nbytes / 1e9, **extra}


def _stride(wl: Workload) -> int:
    """How many batches between clock reads in the baselines' loops (reads cost ~0.1 us)."""
    return 1 if wl.cpu_us or wl.nbytes >= 64 << 10 else 256


def measure_inline(wl: Workload, check: Checker, min_s: float) -> dict[str, Any]:
    _inline_loop(wl, check, min_s * WARMUP)
    done, elapsed = _inline_loop(wl, check, min_s)
    return _result(done, elapsed, wl.nbytes, warmup_s=min_s * WARMUP, **memory.sample())


def _inline_loop(wl: Workload, check: Checker, min_s: float) -> tuple[int, float]:
    n, stride, done = len(wl), _stride(wl), 0
    t0 = perf_counter()
    while True:
        i = done % n
        x, y = wl[i]
        check(x, y, i)
        done += 1
        if done % stride == 0:
            elapsed = perf_counter() - t0
            if elapsed >= min_s:
                return done, elapsed


@contextlib.contextmanager
def shm_ring(directory: Path, slot_bytes: int, slots: int) -> Iterator[mmap.mmap]:
    """A mapped shared-memory file of ``slots * slot_bytes``; the file is unlinked at once, so
    nothing is left behind whatever happens next."""
    path = directory / f"{RING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    size = slots * slot_bytes
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)  # reserve the pages up front, as the dataserver does
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
        os.unlink(path)
    try:
        yield mm
    finally:
        with contextlib.suppress(BufferError):
            mm.close()


def measure_ring(wl: Workload, check: Checker, min_s: float, shm_dir: Path) -> dict[str, Any]:
    x_bytes = wl.nbytes
    y_off = (x_bytes + 63) & ~63
    slot_bytes = (y_off + 64 + 4095) & ~4095
    with shm_ring(shm_dir, slot_bytes, RING_SLOTS) as mm:
        _ring_loop(wl, check, min_s * WARMUP, mm, slot_bytes, y_off)
        done, elapsed = _ring_loop(wl, check, min_s, mm, slot_bytes, y_off)
        mem = memory.sample()  # with the ring still mapped
    return _result(done, elapsed, wl.nbytes, warmup_s=min_s * WARMUP, slots=RING_SLOTS,
                   slot_bytes=slot_bytes, **mem)


def _ring_loop(wl: Workload, check: Checker, min_s: float, mm: mmap.mmap, slot_bytes: int,
               y_off: int) -> tuple[int, float]:
    """The timed loop; its views into ``mm`` die with its frame, so the map can be closed."""
    region = np.frombuffer(mm, np.uint8)
    slots = [(region[k * slot_bytes: k * slot_bytes + wl.nbytes].view(np.float32),
              region[k * slot_bytes + y_off: k * slot_bytes + y_off + 8].view(np.int64))
             for k in range(RING_SLOTS)]
    n, stride, done = len(wl), _stride(wl), 0
    t0 = perf_counter()
    while True:
        i = done % n
        x, y = wl[i]
        xd, yd = slots[i % RING_SLOTS]
        np.copyto(xd, x)
        np.copyto(yd, y)
        del x, y
        check(xd, yd, i)
        done += 1
        if done % stride == 0:
            elapsed = perf_counter() - t0
            if elapsed >= min_s:
                return done, elapsed


class Epoch(NamedTuple):
    first: float  # perf_counter() when the first batch arrived
    end: float  # ... after the last batch was consumed
    count: int
    waited: float  # seconds spent waiting for batches 1..count-1 (inside next())


def read_epoch(rs: Any, check: Checker, n: int) -> Epoch:
    """Read one epoch, timing the first batch, the end and the waits for the others."""
    it = iter(rs)
    x, y = next(it)
    t_first = perf_counter()
    check(x, y, 0)
    count, waited = 1, 0.0
    t = perf_counter()
    for x, y in it:  # rebinding x, y frees the previous batch (its slot is released)
        got = perf_counter()
        waited += got - t
        check(x, y, count)
        count += 1
        t = perf_counter()
    del x, y
    t_end = perf_counter()
    if count != n:
        raise BenchError(f"an epoch of {n} batches yielded {count}")
    return Epoch(t_first, t_end, count, waited)


def boundary(end1: float, e2: Epoch) -> dict[str, float]:
    """The epoch boundary's figures: the wait from the last batch of epoch 1 consumed to the
    first of epoch 2, the mean wait for a batch within epoch 2, and the stall: the boundary's
    wait beyond that mean (where the workers are the bottleneck the consumer waits for every
    batch; the boundary costs only what it adds)."""
    wait = e2.first - end1
    mean = e2.waited / (e2.count - 1) if e2.count > 1 else 0.0
    return {"boundary_wait_s": wait, "mean_wait_s": mean, "stall_s": wait - mean}


def _idle_workers(endpoint: str, timeout_s: float = 2.0) -> list[dict[str, Any]]:
    """The workers from status once none is making a batch (or after ``timeout_s``)."""
    from dataserver.status import fetch_status

    deadline = perf_counter() + timeout_s
    while True:
        workers: list[dict[str, Any]] = fetch_status(endpoint)["workers"]
        if all(w["state"] == "idle" for w in workers) or perf_counter() > deadline:
            return workers
        time.sleep(0.005)


def measure_dataserver(wl: Workload, check: Checker, kind: str, run_dir: Path,
                       workers: int = 2, transport: str = "auto",
                       ray_transport: str | None = None) -> dict[str, Any]:
    from dataserver import DataServer
    from dataserver.client import RemoteSequence

    n = len(wl)
    endpoint = f"ipc://{run_dir}/bench-{kind}-{next(_servers)}.sock"
    if ray_transport is None:
        server = DataServer(wl, workers=workers, worker_type=kind, endpoint=endpoint)
    else:  # Ray actors import the workload from its SPEC
        server = DataServer(spec="bench.workload:Workload", endpoint=endpoint, workers=workers,
                            args={"nbytes": wl.nbytes, "n": wl.n, "cpu_us": wl.cpu_us},
                            backend="ray", ray_transport=ray_transport)
    t0 = perf_counter()
    with server:
        startup = perf_counter() - t0
        t0 = perf_counter()
        with RemoteSequence(server.endpoint, timeout=60, transport=transport) as rs:
            connect = perf_counter() - t0
            t_start1 = perf_counter()
            e1 = read_epoch(rs, check, n)
            t_first1, t_end1 = e1.first, e1.end
            rs.on_epoch_end()
            t_start2 = perf_counter()
            e2 = read_epoch(rs, check, n)
            t_first2, t_end2 = e2.first, e2.end
            # more boundaries (untimed for the rate, which is epoch 2's as for the peers): one
            # boundary is one sample of the batch-to-batch wait, which varies by milliseconds
            # where the workers are the bottleneck
            firsts, bounds = [t_first2 - t_start2], [boundary(t_end1, e2)]
            end = t_end2
            for _ in range(EXTRA_EPOCHS):
                rs.on_epoch_end()
                start = perf_counter()
                e = read_epoch(rs, check, n)
                firsts.append(e.first - start)
                bounds.append(boundary(end, e))
                end = e.end
            # from status: process workers are the fork server's children, Ray actors Ray's
            # (thread workers live in the server: none of their own). Sampled once they are
            # idle, as PyTorch's are at this point: ours go on making the next epoch's first
            # batches, and a worker making a 32 MiB batch holds that array.
            workers = _idle_workers(server.endpoint)
            pids = {w["pid"] for w in workers if w["kind"] != "thread"}
            mem = memory.sample(pids, server_pid=server.pid)
        t_stop = perf_counter()
    stopped = perf_counter() - t_stop  # DataServer.close(): server, workers and segments gone
    return _result(
        n, t_end2 - t_start2, wl.nbytes, workers=workers,
        ttfb_s=t_first1 - t_start1,
        ttfb2_s=statistics.median(firsts),
        ttfb2_worst_s=max(firsts),
        **{k: statistics.median(b[k] for b in bounds) for k in bounds[0]},
        stall_worst_s=max(b["stall_s"] for b in bounds),
        boundaries=len(bounds),
        epoch1_s=t_end1 - t_start1,
        epoch1_batches_per_s=n / (t_end1 - t_start1),
        epoch2_after_first_batches_per_s=(n - 1) / (t_end2 - t_first2) if n > 1 else None,
        startup_s=startup, connect_s=connect, stop_s=stopped, **mem,
    )


def measure(contender: str, wl: Workload, check: Checker, *, min_s: float, shm_dir: Path,
            run_dir: Path) -> dict[str, Any]:
    if contender == "inline":
        return measure_inline(wl, check, min_s)
    if contender == "ring":
        return measure_ring(wl, check, min_s, shm_dir)
    if contender in ("process", "thread"):
        return measure_dataserver(wl, check, contender, run_dir)
    if contender == "zerocopy":  # process workers building x with dataserver.empty
        return measure_dataserver(wl.zero_copy(), check, "process", run_dir)
    if contender == "frames":  # process workers, the bytes sent as ZeroMQ frames (ipc)
        return measure_dataserver(wl, check, "process", run_dir, transport="frames")
    if contender in RAY:  # Ray actors: writing the ring, or sending frames over TCP
        return measure_dataserver(wl, check, "process", run_dir,
                                  ray_transport="frames" if contender == "ray-frames" else "auto")
    if contender in PEERS:
        from bench import peers

        if contender == "torch":
            return peers.measure_torch(wl, check)
        return peers.measure_keras(wl, check, use_multiprocessing=contender == "keras-proc")
    raise ValueError(f"unknown contender {contender!r}; known: "
                     f"{', '.join(CONTENDERS + OPTIONAL)}")
