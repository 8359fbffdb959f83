"""Generator datasets: items are made as consumers ask for them (``Take``) and handed to the
first who asked; a stream ends for everyone once every worker's generator has ended.

A mixin of :class:`dataserver.scheduler.Scheduler` (pure bookkeeping, like it), which owns the
state these methods use. The worker's side of the end (``exhausted``) is in the scheduler.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from dataserver.cache import RingCache
from dataserver.state import Entry

__all__ = ["MAX_WAITING", "MAX_WANT_SPAN", "Streams"]

#: The widest range one Want may name, and the most wants one consumer may have outstanding.
MAX_WANT_SPAN = 4096
MAX_WAITING = 65536


class Streams(RingCache):
    # the Scheduler's state these methods use (set in Scheduler.__init__), beyond RingCache's
    pending: deque[Entry]
    out_ready: dict[bytes, list[list[Any]]]
    out_ended: list[bytes]
    worker_count: int
    _next_bid: int

    def take(self, cid: bytes, count: int) -> str | None:
        """The consumer wants ``count`` more items of its generator dataset."""
        c = self.consumers.get(cid)
        if c is None or c.gone:
            return "Take before Hello; send Hello first"
        d = self.datasets[c.ds]
        if not d.stream:
            return f"dataset {d.name!r} is a Sequence: ask for positions with Want"
        if not 0 < count <= MAX_WANT_SPAN or c.takes + count > MAX_WAITING:
            return f"Take of {count}: ask for 1..{MAX_WANT_SPAN} items at a time"
        c.takes += count
        self._stream_fill(c.ds)
        return None

    def _stream_fill(self, ds: int) -> None:
        """Hand made items to consumers that asked (first asked, first served), start making
        as many more as are asked for, and say StreamEnd once every generator ended."""
        d = self.datasets[ds]
        wanting = [c for c in self.consumers.values() if c.ds == ds and c.takes and not c.gone]
        for c in wanting:
            while c.takes and d.ready:
                e = d.ready.popleft()
                c.takes -= 1
                # a generator's items are all of "epoch" 0, at the position they were made
                self.out_ready.setdefault(c.cid, []).append(self._lease(c, e, e.index))
        live = self.worker_count - len(d.exhausted)
        wanted = sum(c.takes for c in wanting)
        while live > 0 and d.producing < wanted:
            self._stream_entry(ds)
        if live <= 0 and not d.producing and not d.ready:
            for c in self.consumers.values():
                if c.ds == ds and not c.ended and not c.gone:
                    c.ended = True
                    c.takes = 0
                    self.out_ended.append(c.cid)

    def _stream_entry(self, ds: int) -> Entry:
        """Queue the making of the next item of generator dataset ``ds``."""
        d = self.datasets[ds]
        e = Entry(self._next_bid, ds, 0, d.next_item)
        self._next_bid += 1
        d.next_item += 1
        d.producing += 1
        e.stream = True
        self.entries[ds, 0, e.index] = e
        self.by_bid[e.bid] = e
        self.pending.append(e)
        return e
