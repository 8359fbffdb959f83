"""The ring as a cache: which slot is free, which READY batch stays cached in its slot for
whoever reads it next, and which one is evicted when a slot is needed.

A mixin of :class:`dataserver.scheduler.Scheduler` (pure bookkeeping, like it), which owns the
state these methods use.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from typing import Any

from dataserver.state import READY, ConsumerState, Dataset, Entry

__all__ = ["IDLE_S", "RingCache", "Spans", "reading"]

#: Per dataset, (from, to, stride, rank) of each consumer reading it now (RingCache._reach).
Spans = dict[int, list[tuple[int, int, int, int]]]

#: A consumer that has asked for nothing this long keeps no cached batches from the others.
IDLE_S = 1.0


def reading(c: ConsumerState, now: float) -> bool:
    """Is the consumer reading: waiting for batches it asked for, or asking within IDLE_S?
    One that is not (not started, paused, evaluating elsewhere) is not waited for."""
    return c.waiting > 0 or now - c.wanted < IDLE_S  # wanted: 0.0 if it never asked


class RingCache:
    # the Scheduler's state these methods use (set in Scheduler.__init__)
    datasets: list[Dataset]
    consumers: dict[bytes, ConsumerState]
    entries: dict[tuple[int, int, int], Entry]
    by_bid: dict[int, Entry]
    cached: OrderedDict[int, Entry]  # bid -> READY, unleased, in ring
    slots: int  # also how far ahead of a consumer its cached batches are kept for it
    slot_bytes: int
    free_slots: deque[int]
    quarantined: set[int]
    to_unlink: list[str]
    stats: Counter[str]

    def _lease(self, c: ConsumerState, e: Entry, pos: int) -> list[Any]:
        """Lease READY ``e`` to ``c`` once more; its Ready item (``pos`` in the epoch's order,
        -1 for a Fetch): ``[epoch, pos, index, bid, segment, offset, nbytes, layout]``."""
        c.leases[e.bid] += 1
        c.delivered += 1
        c.bytes += e.nbytes
        e.leases += 1
        offset = e.slot * self.slot_bytes if not e.segment else 0
        return [e.epoch, pos, e.index, e.bid, e.segment, offset, e.nbytes, e.layout]

    def _free_slot(self, slot: int) -> None:
        if slot >= 0 and slot not in self.quarantined:
            self.free_slots.append(slot)

    def _reach(self) -> Spans:
        """Per dataset, for each consumer reading it now, the global positions ``[from, to)``
        (``epoch * length + position``) it reads next and the ring could keep cached for it,
        with its shard's stride and rank: from where it has asked up to (it needs nothing
        before that cached), as many of its shard's positions on as the ring has slots (a
        batch further ahead cannot stay cached until it gets there). Only consumers
        :func:`reading` now."""
        now = time.monotonic()
        spans: Spans = {}
        for c in self.consumers.values():
            if not c.gone and reading(c, now):
                g = c.epoch * self.datasets[c.ds].length + c.asked
                spans.setdefault(c.ds, []).append((g, g + self.slots * c.step, c.step, c.phase))
        return spans

    def _needed(self, e: Entry, spans: Spans) -> bool:
        """Will a consumer reading ``e``'s dataset now read ``e`` within its reach?"""
        g = self._at(e)
        return any(a <= g < b and e.pos % step == phase
                   for a, b, step, phase in spans.get(e.ds, ()))

    def _at(self, e: Entry) -> int:
        return e.epoch * self.datasets[e.ds].length + e.pos

    def _victim(self, task: Entry, spans: Spans) -> Entry | None:
        """The cached batch to give up for ``task``: the oldest one no consumer will read
        within its reach; else, of those the consumers will read, the furthest one that lies
        after ``task`` in the same order (whoever reads it reads the task first); else none:
        every cached batch will be read before the task, so the task waits for them."""
        for e in self.cached.values():
            if e.pos < 0 or not self._needed(e, spans):
                return e
        if task.pos < 0:
            return None
        best, best_at = None, self._at(task)
        for e in self.cached.values():
            if e.ds == task.ds and (at := self._at(e)) > best_at:
                best, best_at = e, at
        return best

    def _evict(self, task: Entry, spans: Spans) -> int:
        """Free a cached batch's slot for ``task`` (see :meth:`_victim`), or, for a consumer
        blocked on it (``task.urgent``) or the slot-sizing batch, the oldest of all. -1 if
        none qualifies.

        Not evicting what a lagging consumer reads before the task is the backpressure: a
        consumer ahead of the others then waits for slots (or, blocked, gets its batch in a
        one-off segment), so the others catch up instead of every batch being made once per
        consumer. A laggard's own tasks come before what it will read later, so it is never
        held up by batches kept for it (a consumer joining after another left would find the
        ring full of the other's last batches), and batches beyond every consumer's reach are
        not kept at all. ``spans`` is :meth:`_reach`, computed once per dispatch.
        """
        needed_too = task.urgent or task.keep
        victim = self._victim(task, spans)
        if victim is None and needed_too and self.cached:
            victim = next(iter(self.cached.values()))
            self.stats["evicted_needed"] += 1
        while victim is not None:
            old = victim
            self._forget(old)
            self.stats["evicted"] += 1
            if not old.segment:
                return old.slot
            self.to_unlink.append(old.segment)  # the slot-sizing batch, in its own segment
            victim = next(iter(self.cached.values()), None) if needed_too else None
        return -1

    def _maybe_free(self, e: Entry) -> None:
        if e.stream:
            if e.state == READY and e.leases <= 0 and e not in self.datasets[e.ds].ready:
                if e.segment:
                    self.to_unlink.append(e.segment)
                else:
                    self._free_slot(e.slot)
                self._forget(e)
            return
        if e.state == READY and e.leases <= 0 and not e.waiters and not e.keep:
            if e.segment and not e.probe:
                self.to_unlink.append(e.segment)
                self._forget(e)
            elif e.slot in self.quarantined:
                self._forget(e)
            else:
                self.cached[e.bid] = e  # kept for whoever reads it next, until its slot is needed

    def _forget(self, e: Entry) -> None:
        self.entries.pop((e.ds, e.epoch, e.index), None)
        self.by_bid.pop(e.bid, None)
        self.cached.pop(e.bid, None)

    def cached_slots(self) -> int:
        """Ring slots holding a cached batch (the slot-sizing batch is cached outside the ring)."""
        return sum(1 for e in self.cached.values() if not e.segment)

    def held_slots(self) -> int:
        """Ring slots leased to consumers or being written."""
        return self.slots - len(self.free_slots) - len(self.quarantined) - self.cached_slots()
