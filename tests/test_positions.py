"""A consumer's positions, without a server: Wants, routing arrivals, skipping, epochs."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dataserver.client._positions import Positions
from dataserver.protocol import Want


def _item(epoch: int, pos: int) -> list[int]:
    return [epoch, pos, pos, 0]


def test_wants_cover_the_shard_ahead_into_the_next_epoch() -> None:
    p = Positions(length=3, shard=(1, 2), prefetch=4)  # positions 1, 3, 5 of a 6-batch epoch
    assert p.top_up() == [Want(0, 1, 6, 2, False), Want(1, 1, 2, 2, False)]
    assert p.top_up() == []  # more than half the window is still asked for
    p.speculate = False
    p.cursor = p.requested = 0
    assert p.top_up() == [Want(0, 1, 6, 2, False)]  # not into an epoch it may not read


def test_arrivals_are_filed_by_position_and_strays_handed_back() -> None:
    p = Positions(length=3, shard=(1, 2), prefetch=4)
    assert p.route(0, 3, 3, _item(0, 3)) is None
    assert p.buffer == {1: _item(0, 3)}
    assert p.route(0, 2, 2, _item(0, 2)) == _item(0, 2)  # another rank's position
    assert p.route(0, 3, 3, _item(0, 3)) == _item(0, 3)  # a duplicate
    assert p.route(0, -1, 4, _item(0, -1)) is None  # a Fetch's answer
    assert list(p.fetched[0, 4]) == [_item(0, -1)]


def test_skipping_drops_what_arrived_and_what_will() -> None:
    p = Positions(length=10, shard=(0, 1), prefetch=4)
    p.top_up()  # asked for 0..3
    p.route(0, 1, 1, _item(0, 1))
    assert p.skip_to(3) == [_item(0, 1)]
    assert p.route(0, 0, 0, _item(0, 0)) == _item(0, 0)  # behind the cursor
    assert p.route(0, 2, 2, _item(0, 2)) == _item(0, 2)  # skipped before it came
    assert not p.discard  # both skipped positions came and went
    p.route(0, 3, 3, _item(0, 3))
    assert p.end_epoch() == [_item(0, 3)]  # the rest of epoch 0 is not needed any more
    assert (p.epoch, p.cursor) == (1, 10)
    p.resume(2, 4)
    assert (p.epoch, p.cursor, p.requested) == (2, 24, 24)


class _Consumer:
    """RemoteSequence's use of Positions, against a server that owes one announcement per
    position per Want (an urgent Want for a position it still owes may or may not add one: a
    frames consumer's server does not, and the client must not care) and delivers them in any
    order; ending an epoch may or may not cancel what it still owed of the old one."""

    def __init__(self, data: Any, total: int, shard: tuple[int, int], prefetch: int) -> None:
        self.data = data
        self.rank, self.world = shard
        self.len = len(range(self.rank, total, self.world))
        self.p = Positions(self.len, shard, prefetch)
        self.owed: list[list[int]] = []  # [epoch, position in the order, uid]
        self.uids = itertools.count()
        self.delivered = self.consumed = self.dropped = 0

    def send(self, want: Want) -> None:
        for q in range(want.start, want.stop, want.step):
            if want.urgent and any(it[:2] == [want.epoch, q] for it in self.owed) \
                    and self.data.draw(st.booleans(), label="urgent dedup"):
                continue
            self.owed.append([want.epoch, q, next(self.uids)])

    def deliver(self) -> None:
        item = self.owed.pop(self.data.draw(st.integers(0, len(self.owed) - 1)))
        self.delivered += 1
        if self.p.route(item[0], item[1], item[1], item) is not None:
            self.dropped += 1

    def drop(self, items: list[Any]) -> None:
        self.dropped += len(items)

    def next(self) -> None:
        """The next batch of the epoch (as _next: top up, then wait, urgently after a while)."""
        p = self.p
        g = p.cursor
        for want in p.top_up():
            self.send(want)
        epoch, q = divmod(g, self.len)
        urgent = p.want(epoch, q, q + 1, True)
        while g not in p.buffer:
            if urgent is not None and (not self.owed or self.data.draw(st.booleans())):
                self.send(urgent)
                urgent = None
                continue
            assert self.owed, f"the consumer waits for position {g} that nothing will bring"
            self.deliver()
        item = p.buffer.pop(g)
        p.cursor = g + 1
        assert item[:2] == [epoch, self.rank + q * self.world], (item, g)
        self.consumed += 1


@settings(max_examples=400, deadline=None, database=None)
@given(st.data())
def test_any_order_of_arrivals_gives_each_position_its_batch(data: Any) -> None:
    """Reading on, jumping ahead (``at``), reading an epoch again and ending epochs, with
    arrivals in any order, duplicates for urgent Wants or not: the consumer gets the batch of
    its position every time, never waits for one that will not come, and every arrival is
    either read or handed back to be released."""
    total = data.draw(st.integers(1, 12), label="batches")
    world = data.draw(st.integers(1, min(3, total)), label="world")
    rank = data.draw(st.integers(0, world - 1), label="rank")
    if not range(rank, total, world):
        return
    c = _Consumer(data, total, (rank, world), data.draw(st.integers(1, 6), label="prefetch"))
    p = c.p
    for _ in range(data.draw(st.integers(1, 60), label="steps")):
        op = data.draw(st.sampled_from(["next", "next", "next", "deliver", "jump", "again",
                                        "end"]))
        start = p.epoch * c.len
        if op == "next" and p.cursor < start + c.len:
            c.next()
        elif op == "deliver" and c.owed:
            c.deliver()
        elif op == "jump":  # at(position): forward in the window or anywhere (shuffled)
            g = start + data.draw(st.integers(0, c.len - 1))
            window = p.cursor <= g < p.cursor + max(p.prefetch, 1) + 1
            if window or data.draw(st.booleans(), label="shuffled"):
                c.drop(p.skip_to(g))
                c.next()
        elif op == "again" and p.cursor != start:  # iter() again: the epoch from its start
            if p.cursor > start:
                p.speculate = False
            c.drop(p.skip_to(start))
        elif op == "end":  # on_epoch_end; the server may drop what it still owed of the epoch
            ended = p.epoch
            c.drop(p.end_epoch())
            if data.draw(st.booleans(), label="server drops its waits"):
                kept = [it for it in c.owed if it[0] > ended]
                c.owed = kept
    while c.owed:  # everything still owed arrives
        c.deliver()
    held = len(p.buffer)
    assert c.delivered == c.consumed + c.dropped + held
    assert all(n > 0 for n in p.discard.values())
