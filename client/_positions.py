"""Where a consumer is in its epochs, and what it has asked the server for.

A position is *global*: ``epoch * len + p`` with ``p`` the position within this consumer's shard
of the epoch's order. :class:`Positions` keeps the cursor (the next position to yield), how far
Wants reach, the announcements that arrived ahead of the cursor, and the positions skipped
before their announcement came (to drop it when it does). No sockets: the caller sends the
Wants this returns and drops (releases) the items it hands back.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

from dataserver.protocol import Failed, Want

__all__ = ["Item", "Positions"]

#: An announcement (a Ready item) or the failure in its place.
Item = list[Any] | Failed


class Positions:
    def __init__(self, length: int, shard: tuple[int, int], prefetch: int) -> None:
        self.len = length  # positions in this shard of an epoch
        self.shard = shard
        self.prefetch = prefetch
        self.epoch = 0
        self.cursor = 0  # global position of the next batch to yield
        self.requested = 0  # global positions below this were asked for
        # ask for the next epoch's first batches while this one ends, unless this consumer
        # reads an epoch again without on_epoch_end (an evaluation loop, say)
        self.speculate = True
        self.buffer: dict[int, Item] = {}  # global position -> what arrived for it
        self.fetched: dict[tuple[int, int], deque[Item]] = {}  # (epoch, index): random access
        self.discard: Counter[int] = Counter()  # skipped before their announcement came

    def want(self, epoch: int, start: int, stop: int, urgent: bool) -> Want:
        """A Want for this shard's positions [start, stop) of ``epoch``."""
        rank, world = self.shard
        return Want(epoch, rank + start * world, rank + (stop - 1) * world + 1, world, urgent)

    def top_up(self) -> list[Want]:
        """Wants for positions up to ``prefetch`` ahead of the cursor, into the next epoch too
        unless this consumer re-reads epochs without stepping them; none while more than half
        the window is still asked for."""
        n = self.len
        # never past the next epoch: a small dataset would otherwise be asked for many epochs
        # ahead, made for nothing if the consumer stops
        limit = min(self.cursor + self.prefetch, (self.epoch + (2 if self.speculate else 1)) * n)
        if self.requested - self.cursor > self.prefetch // 2 or self.requested >= limit:
            return []
        wants = []
        g = max(self.requested, self.cursor)
        while g < limit:
            epoch, pos = divmod(g, n)
            stop = min(n, pos + (limit - g))
            wants.append(self.want(epoch, pos, stop, False))
            g += stop - pos
        self.requested = limit
        return wants

    def route(self, epoch: int, pos: int, index: int, item: Item) -> Item | None:
        """File an arrival; returns it back if nobody here needs it (the caller drops it)."""
        if pos < 0:
            self.fetched.setdefault((epoch, index), deque()).append(item)
            return None
        rank, world = self.shard
        p, off = divmod(pos - rank, world)
        if off or not 0 <= p < self.len:
            return item
        g = epoch * self.len + p
        if self.discard[g] > 0:
            self.discard[g] -= 1
            if not self.discard[g]:
                del self.discard[g]
            return item
        if g < self.cursor or g in self.buffer:
            return item
        self.buffer[g] = item
        return None

    def skip_to(self, g: int) -> list[Item]:
        """Move the cursor to ``g``: forward skips what lies between, backward starts over (and
        asks again from there). Returns the arrivals no longer needed."""
        drop = []
        end = self.requested if g < self.cursor else min(g, self.requested)
        for pos in range(self.cursor, end):
            if pos in self.buffer:
                drop.append(self.buffer.pop(pos))
            else:
                self.discard[pos] += 1
        self.requested = g if g < self.cursor else max(self.requested, g)
        self.cursor = g
        return drop

    def end_epoch(self) -> list[Item]:
        """Step to the next epoch (skipping what is left of this one); returns what to drop."""
        end = (self.epoch + 1) * self.len
        drop = self.skip_to(end) if self.cursor < end else []
        self.epoch += 1
        self.speculate = True
        for key in [k for k in self.fetched if k[0] < self.epoch]:
            drop.extend(self.fetched.pop(key))
        for g in [g for g in self.discard if g < end - self.len]:
            del self.discard[g]
        return drop

    def resume(self, epoch: int, position: int) -> None:
        self.epoch = epoch + position // self.len
        self.cursor = self.requested = epoch * self.len + position

    def clear(self) -> list[Item]:
        """Everything that arrived and was not taken (on close)."""
        drop = list(self.buffer.values())
        self.buffer.clear()
        for queue in self.fetched.values():
            drop.extend(queue)
        self.fetched.clear()
        return drop
