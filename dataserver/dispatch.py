"""The workers' side of the scheduler: which worker makes which batch, and what their answers
(done, raised, exhausted, gone) mean for the consumers waiting on those batches.

A mixin of :class:`dataserver.scheduler.Scheduler` (pure bookkeeping, like it), which owns the
state these methods use and keeps the consumers' side.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from dataserver.cache import Spans
from dataserver.protocol import Failed
from dataserver.state import PENDING, READY, RUNNING, ConsumerState, Entry, WorkerState
from dataserver.streams import Streams

__all__ = ["MIN_DEPTH", "QUEUE_S", "Dispatch"]

#: A worker's task queue holds about QUEUE_S seconds of work, at least MIN_DEPTH tasks.
MIN_DEPTH = 2
QUEUE_S = 0.002
#: Tasks looked at past one held back for want of a slot, per dispatch.
SCAN_PAST = 512


class Dispatch(Streams):
    # the Scheduler's state these methods use (set in Scheduler.__init__), beyond Streams'
    max_retries: int
    depth: int
    busy_s: float
    barrier: list[bool]
    on_epoch_advance: Callable[[int, int], None] | None
    running_epochs: Counter[tuple[int, int]]
    workers: dict[int, WorkerState]
    out_failed: list[tuple[bytes, Failed]]
    out_tasks: dict[int, list[list[int]]]
    largest_oversize: int
    probe_error: str | None

    # --- workers ----------------------------------------------------------------------------

    def add_worker(self, w: WorkerState) -> None:
        self.workers[w.wid] = w

    def _running(self, wid: int, bid: int) -> Entry | None:
        e = self.by_bid.get(bid)
        if e is None or e.state != RUNNING or e.worker != wid:
            return None
        w = self.workers.get(wid)
        if w is not None:
            w.inflight.pop(bid, None)
            w.isolated = False
            self.task_started(wid)
        self.running_epochs[e.ds, e.epoch] -= 1
        return e

    def done(self, wid: int, bid: int, segment: str, nbytes: int, layout: bytes,
             busy_s: float = 0.0) -> None:
        e = self._running(wid, bid)
        if e is None:  # a late answer for a batch given to another worker: drop it
            if segment:
                self.to_unlink.append(segment)
            return
        w = self.workers[wid]
        w.done += 1
        self.busy_s += (busy_s - self.busy_s) * 0.1 if self.busy_s else busy_s
        if segment:
            if e.slot >= 0:
                self._free_slot(e.slot)
                self.stats["oversize"] += 1
                self.largest_oversize = max(self.largest_oversize, nbytes)
            else:
                self.stats["one_off"] += 1
            e.slot = -1
        e.state = READY
        e.segment = segment
        e.nbytes = nbytes
        e.layout = layout
        self.stats["produced"] += 1
        self.stats["bytes"] += nbytes
        if e.stream:
            d = self.datasets[e.ds]
            d.producing -= 1
            d.made[w.index] += 1
            d.ready.append(e)
            self._stream_fill(e.ds)
            return
        self._deliver(e)
        self._maybe_free(e)

    def raised(self, wid: int, bid: int, type_name: str, message: str, tb: str) -> None:
        e = self._running(wid, bid)
        if e is None:
            return
        w = self.workers[wid]
        w.errors += 1
        self.stats["raised"] += 1
        self._free_slot(e.slot)
        self._fail(e, "raised", type_name, message, tb, w)

    def worker_gone(self, wid: int, reason: str, quarantine: bool = False) -> list[Entry]:
        """A worker exited or was killed: retry what it held, or report it after max_retries.

        With several batches queued, the server cannot be sure which one the worker died on
        (the answer for a finished one may still be in flight when the death is seen). Then
        none is charged a try; each is marked *suspect* and next runs alone on a worker, where
        a death is attributed exactly.
        ``quarantine`` keeps its slots out of use (a hung thread may still write them)."""
        w = self.workers.pop(wid, None)
        if w is None:
            return []
        retried = []
        attributable = len(w.inflight) == 1
        for bid in reversed(w.inflight):
            e = self.by_bid[bid]
            self.running_epochs[e.ds, e.epoch] -= 1
            if e.slot >= 0:
                if quarantine:
                    self.quarantined.add(e.slot)
                else:
                    self._free_slot(e.slot)
            e.slot = -1
            if attributable:
                e.attempts += 1
            else:
                e.suspect = True
            if e.attempts > self.max_retries:
                self.stats["died"] += 1
                self._fail(e, "died", "WorkerDied",
                           f"{reason}; gave up after {e.attempts} attempts", "", w)
            else:
                self.stats["retried"] += 1
                e.state = PENDING
                e.worker = -1
                self.pending.appendleft(e)
                retried.append(e)
        # a generator item queued behind its worker's end: no ended generator can retry it
        for ds in {e.ds for e in retried if e.stream}:
            self._drop_unmakeable(ds)
        return [e for e in retried if e.state == PENDING]

    def overdue(self, now: float, timeout: float) -> list[tuple[int, Entry]]:
        """Workers whose running batch started more than ``timeout`` seconds ago."""
        late = []
        for w in self.workers.values():
            for bid in w.inflight:
                e = self.by_bid[bid]
                if e.started and now - e.started > timeout:
                    late.append((w.wid, e))
                    break
        return late

    # --- generator datasets (asking for items is Streams.take) ------------------------------

    def exhausted(self, wid: int, bid: int) -> None:
        """The worker's generator ended instead of making ``bid``."""
        e = self._running(wid, bid)
        if e is None:
            return
        d = self.datasets[e.ds]
        d.producing -= 1
        d.exhausted.add(self.workers[wid].index)
        self._free_slot(e.slot)
        self._forget(e)
        self._drop_unmakeable(e.ds)

    def _drop_unmakeable(self, ds: int) -> None:
        """Once every worker's generator of ``ds`` has ended, nobody can make its queued
        items: drop them, and end the stream for its consumers when nothing else is coming."""
        d = self.datasets[ds]
        if len(d.exhausted) >= self.worker_count:
            for p in [p for p in self.pending if p.stream and p.ds == ds and
                      p.state == PENDING]:
                p.state = READY  # skipped by dispatch; forgotten here
                self._forget(p)
                d.producing -= 1
        self._stream_fill(ds)

    # --- dispatch ---------------------------------------------------------------------------

    def _depth(self) -> int:
        """Tasks a worker may have queued: about QUEUE_S of work, at least 2 (one running, one
        waiting), at most ``depth``. Deep queues amortise messages for cheap batches; shallow
        ones keep a slow batch from holding up the ones queued behind it."""
        if self.busy_s <= 0:
            return MIN_DEPTH
        return max(MIN_DEPTH, min(self.depth, 1 + int(QUEUE_S / self.busy_s)))

    def _pick_worker(self, depth: int, alone: bool,
                     skip: set[int] | None = None) -> WorkerState | None:
        """The least loaded ready worker with room; an idle one if the task must run alone;
        none whose index is in ``skip`` (its generator ended)."""
        best = None
        for w in self.workers.values():
            if (not w.ready or w.isolated or w.retiring or (skip and w.index in skip)
                    or len(w.inflight) >= (1 if alone else depth)):
                continue
            if best is None or len(w.inflight) < len(best.inflight):
                best = w
        return best

    def dispatch(self) -> None:
        """Hand pending tasks to workers, first in first out. A task held back for want of a
        slot (every cached batch is one a reading consumer needs before it) stays queued, and
        the tasks behind it that come earlier in the order (a laggard's) may still take a slot
        (see :meth:`_evict`); the held-back ones keep their place in the queue."""
        held: list[Entry] = []
        try:
            self._dispatch(held)
        finally:
            self.pending.extendleft(reversed(held))

    def _dispatch(self, held: list[Entry]) -> None:
        now = time.monotonic()
        depth = self._depth()
        spans: Spans | None = None  # consumers do not move meanwhile
        horizon: dict[int, int] | None = None  # once a task is held back (see _horizon)
        while self.pending:
            e = self.pending[0]
            if e.state != PENDING:
                self.pending.popleft()
                continue
            if not e.waiters and not e.keep and not e.stream:
                self.pending.popleft()
                self._forget(e)
                continue
            if held:
                if len(held) >= SCAN_PAST:
                    return
                if horizon is None:
                    horizon = self._horizon()
                    if not horizon:
                        return  # no cached batch lies after any task: none can take a slot
                if not (e.urgent or e.keep) and (
                        e.pos < 0 or self._at(e) >= horizon.get(e.ds, -1)):
                    held.append(self.pending.popleft())  # it would be held back too
                    continue
            d = self.datasets[e.ds]
            if self.barrier[e.ds] and e.epoch > d.epoch_running:
                if any(n > 0 for (ds, ep), n in self.running_epochs.items()
                       if ds == e.ds and ep < e.epoch):
                    return
                if self.on_epoch_advance is not None:
                    self.on_epoch_advance(e.ds, e.epoch)
                d.epoch_running = e.epoch
            w = self._pick_worker(depth, e.suspect, d.exhausted if e.stream else None)
            if w is None:
                return
            if self.free_slots:
                slot = self.free_slots.popleft()
            else:
                slot = -1
                if self.cached:
                    spans = self._reach() if spans is None else spans
                    slot = self._evict(e, spans)
                    horizon = None
                # no slot: a one-off segment for a blocked consumer (or before the ring exists)
                if slot < 0 and not (e.urgent or e.keep or self.slots == 0):
                    if not self.cached:
                        return  # nothing to evict for anyone: wait for a release
                    held.append(self.pending.popleft())
                    continue
            self.pending.popleft()
            e.state = RUNNING
            e.slot = slot
            e.worker = w.wid
            e.started = now if not w.inflight else 0.0
            w.inflight[e.bid] = None
            w.isolated = e.suspect
            self.running_epochs[e.ds, e.epoch] += 1
            self.out_tasks.setdefault(w.wid, []).append([e.bid, e.ds, e.epoch, e.index, slot])

    def _horizon(self) -> dict[int, int]:
        """Per dataset, the furthest position (in the order) of a cached batch. Once a task is
        held back, no cached batch is free to take: only a task before that (in its own
        dataset) can take a slot, from the furthest batch after it (:meth:`_victim`)."""
        far: dict[int, int] = {}
        for c in self.cached.values():
            if c.pos >= 0:
                far[c.ds] = max(far.get(c.ds, -1), self._at(c))
        return far

    def task_started(self, wid: int) -> None:
        """Stamp the start time of the worker's oldest queued task (its previous one finished)."""
        w = self.workers.get(wid)
        if w is None:
            return
        for bid in w.inflight:
            e = self.by_bid[bid]
            if not e.started:
                e.started = time.monotonic()
            break

    # --- internals --------------------------------------------------------------------------

    def _deliver(self, e: Entry) -> None:
        for cid, pos in e.waiters:
            c = self.consumers.get(cid)
            if c is None or c.gone:
                continue
            c.waiting -= 1
            item = self._lease(c, e, pos)
            if c.frames and pos >= 0:
                c.order.settle(e.epoch, pos)
                c.order.hold(e.epoch, pos, item)
                c.sending[e.epoch, pos] += 1
                self._send_in_order(c)
            else:
                self.out_ready.setdefault(cid, []).append(item)
        e.waiters.clear()
        if e.leases:
            e.keep = False
            if self.cached.pop(e.bid, None) is not None:
                self.stats["cache_hits"] += 1

    def _send_in_order(self, c: ConsumerState) -> None:
        """A frames consumer's held announcements that may leave now (see SendOrder)."""
        ready = c.order.sendable()
        if ready:
            self.out_ready.setdefault(c.cid, []).extend(ready)

    def _fail(self, e: Entry, kind: str, type_name: str, message: str, tb: str,
              w: WorkerState) -> None:
        if e.keep:
            self.probe_error = f"{type_name}: {message}\n{tb}".rstrip()
        for cid, pos in e.waiters:
            c = self.consumers.get(cid)
            if c is None or c.gone:
                continue
            c.waiting -= 1
            self.out_failed.append((cid, Failed(e.epoch, pos, e.index, kind, type_name, message,
                                                tb, w.index, w.pid)))
            if c.frames and pos >= 0:
                c.order.settle(e.epoch, pos)
                self._send_in_order(c)
        e.waiters.clear()
        e.slot = -1
        self._forget(e)
