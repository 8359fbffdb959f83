"""Which batch is made where, and who holds what. Pure bookkeeping: no sockets, no processes.

The ring is a cache of batches keyed by ``(dataset, epoch, index)``, shared by every consumer.
An :class:`Entry` moves PENDING (wanted, queued) -> RUNNING (a worker writes it into a slot) ->
READY (announced; each consumer that wanted it holds one lease per announcement). When the last
lease is released and nobody waits for it, the entry stays cached in its slot, so a consumer
reading the same epoch a little later gets it without it being made again; cached slots are
reused oldest first when a free slot is needed (one-off segments are unlinked at once).
Wants are served first in, first out, so production follows the consumers' order;
an *urgent* want (the consumer is blocked on it) jumps the queue and, if every slot is held,
is produced into a one-off segment, so a consumer holding many batches never deadlocks.

The server calls the event methods (``want``, ``release``, ``done``, ``worker_gone`` ...), then
``dispatch()``, then sends what collected in ``out_ready``, ``out_failed`` and ``out_tasks`` and
unlinks ``to_unlink``. This module keeps the consumers' side; the workers' side (dispatching
tasks, filing their answers, delivering what they made) is in :mod:`dataserver.dispatch`, slots
and the cache in :mod:`dataserver.cache`, generator datasets in :mod:`dataserver.streams`
(mixins of :class:`Scheduler`).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from typing import Any

from dataserver.dispatch import Dispatch
from dataserver.protocol import Failed
from dataserver.state import (
    PENDING,
    READY,
    ConsumerState,
    Dataset,
    Entry,
    WorkerState,
)
from dataserver.streams import MAX_WAITING, MAX_WANT_SPAN

__all__ = ["READY", "ConsumerState", "Dataset", "Entry", "Scheduler", "WorkerState"]

class Scheduler(Dispatch):
    def __init__(
        self,
        datasets: list[Dataset],
        *,
        max_retries: int,
        depth: int,
        barrier: list[bool],
        on_epoch_advance: Callable[[int, int], None] | None = None,
    ) -> None:
        self.datasets = datasets
        self.max_retries = max_retries
        self.depth = depth  # most tasks queued per worker, the running one included
        self.busy_s = 0.0  # moving average of the time one batch takes
        # per dataset: thread workers share one Sequence, so one whose on_epoch_end must run
        # between epochs finishes an epoch before the next starts
        self.barrier = barrier
        self.on_epoch_advance = on_epoch_advance
        self.running_epochs: Counter[tuple[int, int]] = Counter()
        self.entries: dict[tuple[int, int, int], Entry] = {}
        self.cached: OrderedDict[int, Entry] = OrderedDict()  # bid -> READY, unleased, in ring
        self.by_bid: dict[int, Entry] = {}
        self.pending: deque[Entry] = deque()
        self.slots = 0
        self.slot_bytes = 0
        self.free_slots: deque[int] = deque()
        self.quarantined: set[int] = set()
        self.consumers: dict[bytes, ConsumerState] = {}
        self.workers: dict[int, WorkerState] = {}
        self.out_ready: dict[bytes, list[list[Any]]] = {}
        self.out_failed: list[tuple[bytes, Failed]] = []
        self.out_tasks: dict[int, list[list[int]]] = {}
        self.out_ended: list[bytes] = []  # consumers to tell StreamEnd
        self.worker_count = 0  # worker indices 0..worker_count-1 (generator datasets end when
        # every index's generator has)
        self.to_unlink: list[str] = []
        self.stats: Counter[str] = Counter()
        self.largest_oversize = 0
        self.probe_error: str | None = None
        self._next_bid = 1

    # --- order and ring ---------------------------------------------------------------------

    def probe(self, ds: int) -> Entry:
        """Make the first batch of epoch 0 before anyone asks (to size the slots); it is kept
        for the first consumer that wants it. A failure lands in ``probe_error``."""
        d = self.datasets[ds]
        # a generator's first item, or the first batch of epoch 0
        e = self._stream_entry(ds) if d.stream else self._entry(ds, 0, int(d.order(0)[0]), 0)
        e.keep = e.probe = True
        return e

    def set_ring(self, slots: int, slot_bytes: int) -> None:
        """The ring's geometry. Cached batches are kept for a consumer up to ``slots``
        positions ahead of what it asked for: further ahead, they could not stay cached until
        it got there."""
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.free_slots = deque(range(slots))

    # --- consumers --------------------------------------------------------------------------

    def add_consumer(self, c: ConsumerState) -> None:
        self.consumers[c.cid] = c

    def _entry(self, ds: int, epoch: int, index: int, pos: int = -1) -> Entry:
        key = (ds, epoch, index)
        e = self.entries.get(key)
        if e is None:
            e = Entry(self._next_bid, ds, epoch, index)
            e.pos = pos
            self._next_bid += 1
            self.entries[key] = e
            self.by_bid[e.bid] = e
            self.pending.append(e)
        return e

    def _wait(self, c: ConsumerState, e: Entry, pos: int) -> None:
        e.waiters.append((c.cid, pos))
        c.waiting += 1
        if c.frames and pos >= 0:
            c.order.owe(e.epoch, pos)
        if e.state == READY:
            self._deliver(e)

    def want(self, cid: bytes, epoch: int, start: int, stop: int, step: int,
             urgent: bool) -> str | None:
        """Queue positions range(start, stop, step) of epoch; returns a refusal reason or None."""
        c = self.consumers.get(cid)
        if c is None or c.gone:
            return "Want before Hello; send Hello first"
        d = self.datasets[c.ds]
        positions = range(start, stop, step) if step > 0 else range(0)
        if not positions or stop > d.length or len(positions) > MAX_WANT_SPAN:
            return (f"Want range({start}, {stop}, {step}) is not a range of positions within "
                    f"0..{d.length} of at most {MAX_WANT_SPAN}")
        if c.waiting + len(positions) > MAX_WAITING:
            return f"more than {MAX_WAITING} batches wanted and not yet announced"
        order = d.order(epoch)
        c.epoch, c.position, c.asked, c.step = epoch, start, stop, step
        c.phase, c.wanted = start % step, time.monotonic()
        if urgent and c.frames:  # before the waits: what is ready may go at once
            c.order.blocked_at(epoch, start)
        for pos in positions:
            e = self._entry(c.ds, epoch, int(order[pos]), pos)
            if urgent and pos == start and e.state == PENDING:
                e.urgent = True
                self.pending.appendleft(e)
            if urgent and self._owed(c, e, pos):
                continue
            self._wait(c, e, pos)
        if urgent and c.frames:
            self._send_in_order(c)
        return None

    @staticmethod
    def _owed(c: ConsumerState, e: Entry, pos: int) -> bool:
        """Whether ``c`` is owed ``e`` at ``pos`` already: it waits for it or, a frames
        consumer, its frames are still on their way out. An urgent Want for such a batch (a
        consumer blocked on what it asked for earlier) only moves it forward: another waiter
        would announce it twice, and a frames consumer would be sent its bytes twice. (A
        consumer of the ring reads an announcement within microseconds of its sending.)"""
        return (c.cid, pos) in e.waiters or c.sending[e.epoch, pos] > 0

    def sent(self, cid: bytes, items: list[list[Any]]) -> None:
        """The frames of these announcements (a frames consumer's Ready items) have left
        (their leases end too: :meth:`release`)."""
        c = self.consumers.get(cid)
        if c is None:
            return
        for item in items:
            key = (item[0], item[1])
            if item[1] >= 0 and c.sending[key] > 0:
                c.sending[key] -= 1
                if not c.sending[key]:
                    del c.sending[key]

    def fetch(self, cid: bytes, epoch: int, index: int) -> str | None:
        c = self.consumers.get(cid)
        if c is None or c.gone:
            return "Fetch before Hello; send Hello first"
        length = self.datasets[c.ds].length
        if index >= length:
            return f"Fetch of batch {index}: the Sequence has {length} batches"
        if c.waiting >= MAX_WAITING:
            return f"more than {MAX_WAITING} batches wanted and not yet announced"
        e = self._entry(c.ds, epoch, index)
        if e.state == PENDING:
            e.urgent = True  # a random access blocks its caller
            self.pending.appendleft(e)
        self._wait(c, e, -1)
        return None

    def release(self, cid: bytes, bids: list[int]) -> str | None:
        c = self.consumers.get(cid)
        if c is None:
            return "Release before Hello; send Hello first"
        bad = []
        for bid in bids:
            if c.leases[bid] <= 0:
                del c.leases[bid]
                bad.append(bid)
                continue
            c.leases[bid] -= 1
            if not c.leases[bid]:
                del c.leases[bid]
            e = self.by_bid.get(bid)
            if e is not None:
                e.leases -= 1
                self._maybe_free(e)
        if bad:
            self.stats["bad_releases"] += len(bad)
            return f"Release of batch ids {bad[:8]} that this consumer does not hold (ignored)"
        return None

    def epoch_end(self, cid: bytes, epoch: int) -> None:
        """The consumer is done with ``epoch``: drop what it still waits for from it."""
        c = self.consumers.get(cid)
        if c is None:
            return
        c.epoch, c.position, c.asked = epoch + 1, 0, 0
        self._drop_waits(c, lambda e: e.epoch <= epoch)

    def remove_consumer(self, cid: bytes, keep: list[int] | None = None) -> None:
        """The consumer left (keep: leases whose views live on in it) or died (keep None)."""
        c = self.consumers.get(cid)
        if c is None:
            return
        self._drop_waits(c, lambda e: True)
        self.out_ready.pop(cid, None)  # announcements it will never read: their leases go below
        kept = Counter({b: c.leases[b] for b in (keep or ()) if c.leases[b] > 0})
        if kept and c.same_host:
            self.release(cid, list((c.leases - kept).elements()))
            c.gone = True
            return
        self.release(cid, list(c.leases.elements()))
        del self.consumers[cid]

    def _drop_waits(self, c: ConsumerState, which: Callable[[Entry], bool]) -> None:
        for e in list(self.entries.values()):
            if e.state != READY and e.waiters and which(e):
                kept = []
                for waiter, pos in e.waiters:
                    if waiter != c.cid:
                        kept.append((waiter, pos))
                    elif c.frames and pos >= 0:
                        c.order.settle(e.epoch, pos)
                c.waiting -= len(e.waiters) - len(kept)
                e.waiters = kept
        if c.frames:
            self._send_in_order(c)
