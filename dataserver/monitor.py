"""What the server and each worker cost, and who holds what: the ``status`` snapshot.

Memory comes from psutil's full memory info (RSS, USS, PSS, swap), less each process's pages of
the server's shared-memory segments (the ring is reported once, as the ring: see
:mod:`dataserver.procmem`). Where a figure cannot be read (permissions, a platform without it)
it is ``None``, never invented. Thread workers share the server's memory, and the snapshot says
so instead of splitting it.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING, Any

import psutil

from dataserver.cache import reading
from dataserver.procmem import MEMORY_KINDS, own_memory, segments_memory

if TYPE_CHECKING:
    from dataserver.scheduler import Scheduler
    from dataserver.server import Server
    from dataserver.state import ConsumerState, WorkerState

__all__ = ["SCHEMA_VERSION", "STATUS_READS", "Monitor"]

#: Bumped when a field of the snapshot changes meaning or disappears (adding one does not).
SCHEMA_VERSION = 1
#: Process workers whose memory a status request reads anew (those read longest ago); the
#: others show their figures as last read by the metrics' snapshots or earlier requests.
STATUS_READS = 8


class Monitor:
    def __init__(self, segments: str | None = None) -> None:
        """``segments``: the path prefix of the server's shared-memory segments, whose pages
        are left out of each process's figures (:func:`dataserver.procmem.segment_prefix`)."""
        self._procs: dict[int, psutil.Process] = {}
        self.segments = segments
        self._figures: dict[int, tuple[float, dict[str, Any]]] = {}  # pid -> (when, figures)
        self._ring_read_at: dict[int, float] = {}  # pid -> when process(ring=True) read it

    def process(self, pid: int, ring: bool = False) -> dict[str, Any]:
        """Memory and CPU of ``pid``; None for what cannot be read. ``ring``: with its pages
        of the server's segments (cheaper: those take a walk of /proc/PID/smaps)."""
        out: dict[str, Any] = dict.fromkeys((*MEMORY_KINDS, "cpu_percent"))
        p = self._procs.get(pid)
        try:
            if p is None:
                p = self._procs[pid] = psutil.Process(pid)
                p.cpu_percent(None)  # the first call only starts the clock
            out["cpu_percent"] = p.cpu_percent(None)
            out.update(own_memory(p, None if ring else self.segments))
        except psutil.Error:
            self._procs.pop(pid, None)
        if ring:
            self._ring_read_at[pid] = time.monotonic()
        else:  # what snapshots show (and reuse)
            self._figures[pid] = (time.monotonic(), out)
        return out

    def due(self, pids: list[int], limit: int | None, ring: bool = False) -> set[int]:
        """Of ``pids``, those to read anew: all, or the ``limit`` read longest ago (never
        read first), by :meth:`process` with that ``ring``. Each read holds the server's loop
        (~0.2 ms with the ring, ~1 ms without; ~7 and ~10 ms with a 1 GiB ring mapped), so
        with many workers they take turns: the caps check reads the cheap figures, the
        snapshots the figures without the ring."""
        if limit is None or len(pids) <= limit:
            return set(pids)
        if ring:
            return set(sorted(pids, key=lambda pid: self._ring_read_at.get(pid, 0.0))[:limit])
        return set(sorted(pids, key=lambda pid: self._figures.get(pid, (0.0, {}))[0])[:limit])

    def ring_share(self, pid: int, kind: str) -> int:
        """``pid``'s pages of the server's segments, as memory of ``kind`` (0 if unreadable)."""
        if self.segments is None:
            return 0
        try:
            return segments_memory(pid, self.segments)[kind]
        except OSError:
            return 0

    def forget_dead(self, alive: set[int]) -> None:
        for pid in list(self._procs):
            if pid not in alive:
                del self._procs[pid]
        for table in (self._figures, self._ring_read_at):
            for pid in [pid for pid in table if pid not in alive]:
                del table[pid]

    def snapshot(self, server: Server, fresh: int | None = None) -> dict[str, Any]:
        """The status snapshot. ``fresh``: read at most that many process workers' memory
        anew (each read walks its /proc/PID/smaps, ~2 ms with a big ring mapped), those read
        longest ago, the others' as last read (``memory_age_s`` says when; one never read is
        read); None: all of them."""
        sched = server.sched
        assert sched is not None
        now = time.monotonic()
        cfg = server.config
        local = cfg.backend != "ray" and cfg.worker_type == "process"
        pids = [w.pid for w in sched.workers.values() if w.pid] if local else []
        read = self.due(pids, fresh)
        workers = [self._worker(server, w, now, read) for w in sched.workers.values()]
        fork_server = getattr(server.pool, "fork_server_pid", None)  # not the Ray backend's
        fs_pid = fork_server() if fork_server is not None else None
        self.forget_dead({w["pid"] for w in workers} | {os.getpid(), fs_pid or 0})
        one_off = [e for e in sched.by_bid.values() if e.segment]
        ring = {
            "slots": sched.slots, "slot_bytes": sched.slot_bytes,
            "free": len(sched.free_slots), "cached": sched.cached_slots(),
            "quarantined": len(sched.quarantined),
            "held": sched.held_slots(),
            "bytes": sched.slots * sched.slot_bytes,
            "one_off_segments": len(one_off), "one_off_bytes": sum(e.nbytes for e in one_off),
            "shm_dir": str(server.shm_dir), "name": server.ring_name,
        }
        consumers = [_consumer(sched, c, now) for c in sched.consumers.values()]
        me = self.process(os.getpid())
        with contextlib.suppress(Exception):
            me["threads"] = psutil.Process().num_threads()
        return {
            "schema": SCHEMA_VERSION,
            "server": {
                "id": server.server_id, "pid": os.getpid(), "endpoint": cfg.endpoint,
                "state": server.state, "uptime_s": round(now - server.started_at, 1),
                "worker_type": cfg.worker_type, "workers": cfg.workers,
                "prefetch": server.prefetch, **me,
            },
            "datasets": [{"name": d.name, "length": d.length, "shuffle": d.shuffle,
                          "seed": d.seed} for d in sched.datasets],
            "workers": workers,
            **({"fork_server": {"pid": fs_pid, **self.process(fs_pid)}} if fs_pid else {}),
            "ring": ring,
            "consumers": consumers,
            "counters": dict(sched.stats),
        }

    def _worker(self, server: Server, w: WorkerState, now: float,
                read: set[int]) -> dict[str, Any]:
        """``w`` as the snapshot shows it; its memory read anew if its pid is in ``read``."""
        sched, cfg = server.sched, server.config
        assert sched is not None
        running = next(iter(w.inflight), None)
        e = sched.by_bid.get(running) if running is not None else None
        item: dict[str, Any] = {
            "index": w.index, "incarnation": w.wid, "pid": w.pid,
            "kind": "ray" if cfg.backend == "ray" else cfg.worker_type,
            "state": "starting" if not w.ready else ("busy" if w.inflight else "idle"),
            "batch": e.index if e is not None else None,
            "dataset": sched.datasets[e.ds].name if e is not None else None,
            "batch_seconds": round(now - e.started, 3) if e is not None and e.started
            else None,
            "queued": len(w.inflight), "done": w.done, "errors": w.errors,
            "age_s": round(now - w.started, 1),
            "stuck": bool(e is not None and e.started
                          and now - e.started > cfg.hang_threshold),
            "retiring": w.retiring or None,
            "growing": w.wid in server.growing,
        }
        if cfg.backend == "ray":  # the actor may be on another host: its own figures
            item.update(dict.fromkeys((*MEMORY_KINDS, "cpu_percent")))
            item.update(w.memory)
            item["host"] = w.host
            item["transport"] = "frames" if w.frames else "shm"
        elif cfg.worker_type == "process":
            last = self._figures.get(w.pid)
            if w.pid in read or last is None:
                item.update(self.process(w.pid))
                item["memory_age_s"] = 0.0
            else:
                item.update(last[1])
                item["memory_age_s"] = now - last[0]  # > 0: read before this snapshot
        else:
            item.update(dict.fromkeys((*MEMORY_KINDS, "cpu_percent")))
            item["memory_note"] = "thread worker: shares the server process's memory"
        return item


def _consumer(sched: Scheduler, c: ConsumerState, now: float) -> dict[str, Any]:
    age = max(now - c.joined, 1e-9)
    return {
        "id": c.cid.hex(), "name": c.name, "pid": c.pid, "same_host": c.same_host,
        "dataset": sched.datasets[c.ds].name, "epoch": c.epoch, "position": c.position,
        "leases": sum(c.leases.values()), "waiting": c.waiting,
        "delivered": c.delivered, "batches_per_s": round(c.delivered / age, 2),
        "bytes_per_s": round(c.bytes / age), "gone": c.gone,
        "age_s": round(age, 1), "silent_s": round(now - c.seen, 1),
        "reading": reading(c, now),  # the others' batches are kept for it
    }
