"""A consumer's positions, without a server: Wants, routing arrivals, skipping, epochs."""

from __future__ import annotations

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
