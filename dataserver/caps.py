"""Worker caps and memory watch: retire a worker over --max-worker-memory or
--max-worker-tasks (it finishes what it holds; a replacement starts at once), kill a retiree
that does not finish, and warn once about a worker whose memory rises batch after batch.

A mixin of :class:`dataserver.server.Server` (through
:class:`dataserver.supervise.WorkerSide`), which owns the state these methods use.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from dataserver import shm
from dataserver.config import ServerConfig
from dataserver.monitor import Monitor
from dataserver.protocol import Message, Stop
from dataserver.scheduler import Scheduler, WorkerState

__all__ = ["GROWTH_MIN_BYTES", "GROWTH_SAMPLES", "MEMORY_READS_PER_PASS", "RETIRE_GRACE_S",
           "Caps"]

log = logging.getLogger("dataserver")
RETIRE_GRACE_S = 30.0
#: Memory samples (one per new batch, at most two a second) that must all rise to warn.
GROWTH_SAMPLES = 10
GROWTH_MIN_BYTES = 32 << 20
#: Process workers whose memory one housekeeping pass reads (about 0.8 ms each, the server's
#: loop waiting meanwhile); with more workers they take turns, read longest ago first.
MEMORY_READS_PER_PASS = 4


class Caps:
    # the Server's state these methods use (set in Server.__init__)
    config: ServerConfig
    sched: Scheduler | None
    pool: Any
    monitor: Monitor
    mem_history: dict[int, deque[tuple[int, int]]]
    growing: set[int]
    _retire_since: dict[int, float]
    _retire_asked: dict[int, float]
    # WorkerSide's
    _send_worker: Callable[[int, Message], None]
    _start_worker: Callable[[int], None]

    def _check_caps(self, now: float) -> None:
        """Retire workers over --max-worker-tasks or --max-worker-memory (they finish what they
        hold, then stop; a replacement starts at once), kill a retiree that does not finish
        within RETIRE_GRACE_S, and warn about workers whose memory keeps growing."""
        sched, cfg, pool = self.sched, self.config, self.pool
        assert sched is not None and pool is not None
        measured = cfg.backend == "ray" or cfg.worker_type == "process"
        due = self._memory_due() if measured else set()
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
            if w.wid not in due:
                continue
            mem = self._worker_memory(w)
            self._note_memory(w, mem)
            cap = cfg.max_worker_memory
            if cap and mem and mem > cap and (mem := mem - self._ring_share(w)) > cap:
                sched.stats["memory_cap_restarts"] += 1
                self._retire(w, f"uses {shm.format_bytes(mem)} {cfg.memory_kind.upper()}, "
                                f"over --max-worker-memory {shm.format_bytes(cap)}", now)

    def _worker_memory(self, w: WorkerState) -> int | None:
        """The worker's memory of the kind caps watch, its pages of the ring included: the
        cheap figure (a Ray worker reports its own, the ring already left out)."""
        kind = self.config.memory_kind
        if self.config.backend == "ray":
            return w.memory.get(kind)
        value: int | None = self.monitor.process(w.pid, ring=True).get(kind)
        return value

    def _ring_share(self, w: WorkerState) -> int:
        """What of :meth:`_worker_memory` is the worker's pages of the ring: a batch made
        ahead and not read yet is mapped by its worker alone, so it counts as the worker's
        (read only to confirm a cap or a growth warning: it costs ~1 ms per worker)."""
        if self.config.backend == "ray":
            return 0
        return self.monitor.ring_share(w.pid, self.config.memory_kind)

    def _memory_due(self) -> set[int]:
        """The workers whose memory this pass reads: all, or the MEMORY_READS_PER_PASS read
        longest ago (Ray workers report theirs: all of them, it costs nothing)."""
        assert self.sched is not None
        ready = [w for w in self.sched.workers.values() if w.ready and not w.retiring]
        if self.config.backend == "ray":
            return {w.wid for w in ready}
        due = self.monitor.due([w.pid for w in ready], MEMORY_READS_PER_PASS, ring=True)
        return {w.wid for w in ready if w.pid in due}

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
        threshold = max(GROWTH_MIN_BYTES, mems[0] // 5)
        if not all(b > a for a, b in itertools.pairwise(mems)) or mems[-1] - mems[0] <= threshold:
            return
        # the ring filling up rises the same way: what grew beyond the ring pages held now
        # (the first sample's are not known: counting them as none understates the growth)
        grew = mems[-1] - self._ring_share(w) - mems[0]
        if grew > threshold:
            self.growing.add(w.wid)
            log.warning(
                "worker %d (pid %d) grew by %s over its last %d batches and keeps growing. "
                "Usual causes: a cache that is never bounded, references kept to old batches, "
                "or Python objects (lists, dicts) shared from the parent whose refcounts copy "
                "their pages (keep big tables in numpy arrays). --max-worker-memory caps it",
                w.index, w.pid, shm.format_bytes(grew), GROWTH_SAMPLES)
