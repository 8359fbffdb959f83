"""Which cached batch gives up its slot (scheduler bookkeeping only): batches a lagging consumer
reads before the task are kept for it (backpressure on the others), its own tasks come first,
and batches beyond every consumer's reach (the ring's size) are kept for nobody."""

from __future__ import annotations

from dataserver.cache import IDLE_S
from dataserver.scheduler import ConsumerState, Dataset, Scheduler, WorkerState

LENGTH = 20


def _scheduler(slots: int) -> Scheduler:
    s = Scheduler([Dataset("train", LENGTH)], max_retries=1, depth=8, barrier=[False])
    s.set_ring(slots, 4096)
    for wid in (1, 2):
        s.add_worker(WorkerState(wid, wid - 1, ready=True))
    return s


def _join(s: Scheduler, cid: bytes) -> None:
    s.add_consumer(ConsumerState(cid, pid=1, same_host=True, name=cid.decode(), ds=0))


def _dispatched(s: Scheduler) -> list[tuple[int, int, int]]:
    """(wid, bid, index) of the tasks one dispatch hands out."""
    s.dispatch()
    tasks = [(wid, t[0], t[3]) for wid, ts in s.out_tasks.items() for t in ts]
    s.out_tasks.clear()
    return tasks


def _read(s: Scheduler, cid: bytes, epoch: int, start: int, stop: int) -> None:
    """The consumer wants positions [start, stop), they are made, it reads and releases them."""
    assert s.want(cid, epoch, start, stop, 1, False) is None
    while tasks := _dispatched(s):  # each worker takes two at a time
        for wid, bid, _index in tasks:
            s.done(wid, bid, "", 4096, b"")
    bids = [item[3] for item in s.out_ready.pop(cid, [])]
    assert len(bids) == stop - start
    assert s.release(cid, bids) is None


def _cached(s: Scheduler) -> set[tuple[int, int]]:
    return {(e.epoch, e.pos) for e in s.cached.values()}


def test_a_consumer_joining_after_another_left_gets_the_ring() -> None:
    """The one who left filled the ring with the end of epoch 2; the newcomer starts epoch 0
    and will not read those for 40 positions: they must not keep their slots from it (they
    did, and it got one batch at a time, each after an urgent want: 20x slower)."""
    s = _scheduler(slots=6)
    _join(s, b"a")
    _read(s, b"a", 2, 14, 20)
    assert len(_cached(s)) == 6 and not s.free_slots
    s.remove_consumer(b"a")
    _join(s, b"b")
    assert s.want(b"b", 0, 0, 4, 1, False) is None
    assert sorted(index for _w, _b, index in _dispatched(s)) == [0, 1, 2, 3]  # 2 per worker
    assert s.stats["evicted"] == 4 and not s.stats["evicted_needed"]


def test_batches_a_lagging_consumer_reads_first_are_kept_for_it() -> None:
    """Backpressure: the fast consumer's next batches wait while every slot holds one the
    laggard reads before them."""
    s = _scheduler(slots=6)
    _join(s, b"fast")
    _read(s, b"fast", 0, 0, 6)
    _join(s, b"slow")
    assert s.want(b"slow", 0, 0, 2, 1, False) is None  # cache hits: 0 and 1, now leased
    assert len(s.out_ready.pop(b"slow")) == 2
    assert _cached(s) == {(0, 2), (0, 3), (0, 4), (0, 5)}
    assert s.want(b"fast", 0, 6, 10, 1, False) is None
    assert _dispatched(s) == []
    assert _cached(s) == {(0, 2), (0, 3), (0, 4), (0, 5)}, "kept for the laggard"


def test_batches_beyond_every_consumers_reach_are_kept_for_nobody() -> None:
    """A laggard reads 8 positions behind a 4-slot ring's batches: they could not stay cached
    until it got there, so they do not hold the fast consumer back."""
    s = _scheduler(slots=4)
    _join(s, b"fast")
    for start in (0, 4, 8):
        _read(s, b"fast", 0, start, start + 4)
    assert _cached(s) == {(0, 8), (0, 9), (0, 10), (0, 11)}
    _join(s, b"slow")
    assert s.want(b"slow", 0, 0, 2, 1, False) is None  # reach [2, 6)
    assert sorted(index for _w, _b, index in _dispatched(s)) == [0, 1]  # in 11's and 10's slots
    assert s.want(b"fast", 0, 12, 16, 1, False) is None
    assert sorted(index for _w, _b, index in _dispatched(s)) == [12, 13]
    assert _cached(s) == set()


def test_a_consumer_that_asks_for_nothing_is_not_waited_for() -> None:
    """Connected but not reading (not started yet, or paused for IDLE_S): the batches it would
    read next are not kept from the others (they were, and a trainer beside an idle consumer
    of the same dataset got 370 batches/s instead of 35,000)."""
    s = _scheduler(slots=6)
    _join(s, b"fast")
    _join(s, b"idle")  # never asks
    _read(s, b"fast", 0, 0, 6)
    assert s.want(b"fast", 0, 6, 10, 1, False) is None
    assert sorted(index for _w, _b, index in _dispatched(s)) == [6, 7, 8, 9]
    # one that asked once, long ago
    s = _scheduler(slots=6)
    _join(s, b"fast")
    _join(s, b"paused")
    _read(s, b"fast", 0, 0, 6)
    assert s.want(b"paused", 0, 0, 1, 1, False) is None
    s.out_ready.clear()
    assert s.want(b"fast", 0, 6, 10, 1, False) is None
    assert _dispatched(s) == [], "while it reads, its next batches are kept for it"
    s.consumers[b"paused"].wanted -= IDLE_S
    assert sorted(index for _w, _b, index in _dispatched(s)) == [6, 7, 8, 9]


def test_a_consumer_waiting_for_a_slow_batch_is_still_reading() -> None:
    """Blocked on a batch that takes long to make, a consumer asks for nothing more: what it
    reads after that batch is still kept for it, until it has what it waits for."""
    s = _scheduler(slots=6)
    _join(s, b"fast")
    _join(s, b"slow")
    _read(s, b"fast", 0, 1, 7)
    assert s.want(b"slow", 0, 0, 1, 1, False) is None  # reach [1, 7)
    [(wid, bid, index)] = _dispatched(s)  # in the slot of 6, the furthest
    assert index == 0 and _cached(s) == {(0, 1), (0, 2), (0, 3), (0, 4), (0, 5)}
    s.consumers[b"slow"].wanted -= IDLE_S  # long ago: batch 0 is slow to make
    assert s.want(b"fast", 0, 7, 9, 1, False) is None
    assert _dispatched(s) == []
    s.done(wid, bid, "", 4096, b"")  # it has it: now it waits for nothing
    assert sorted(index for _w, _b, index in _dispatched(s)) == [7, 8]


def test_a_shard_keeps_only_its_own_positions() -> None:
    """Rank 0 of 2 reads the even positions: the odd ones rank 1 released are not kept for
    it, however far behind rank 0 is."""
    s = _scheduler(slots=4)
    _join(s, b"r0")
    _join(s, b"r1")
    assert s.want(b"r0", 0, 0, 1, 2, False) is None  # rank 0 asked for position 0: reach [1, 9)
    while tasks := _dispatched(s):
        for wid, bid, _index in tasks:
            s.done(wid, bid, "", 4096, b"")
    s.out_ready.clear()
    for start, stop in [(1, 2), (3, 4), (5, 6)]:
        assert s.want(b"r1", 0, start, stop, 2, False) is None
        while tasks := _dispatched(s):
            for wid, bid, _index in tasks:
                s.done(wid, bid, "", 4096, b"")
        bids = [item[3] for item in s.out_ready.pop(b"r1")]
        assert s.release(b"r1", bids) is None
    assert {(0, 1), (0, 3), (0, 5)} <= _cached(s)
    assert s.want(b"r1", 0, 7, 8, 2, False) is None
    assert [index for _w, _b, index in _dispatched(s)] == [7]


def test_a_laggards_task_takes_the_slot_of_the_batch_read_last() -> None:
    """Every cached batch is one a consumer will read, all after the laggard's task: the one
    furthest along goes (the others are read sooner), not the oldest."""
    s = _scheduler(slots=6)
    _join(s, b"fast")
    _read(s, b"fast", 0, 1, 7)
    _join(s, b"slow")  # reach [0, 6)
    _join(s, b"mid")
    assert s.want(b"mid", 0, 3, 4, 1, False) is None  # a cache hit; it asked up to 4: [4, 10)
    s.out_ready.clear()
    assert _cached(s) == {(0, 1), (0, 2), (0, 4), (0, 5), (0, 6)}
    assert not s.free_slots
    assert s.want(b"slow", 0, 0, 1, 1, False) is None
    assert [index for _w, _b, index in _dispatched(s)] == [0]
    assert _cached(s) == {(0, 1), (0, 2), (0, 4), (0, 5)}


def test_a_laggards_task_is_not_stuck_behind_one_held_back() -> None:
    """The fast consumer's next task waits for a slot (the only cached batch is one the laggard
    reads first); the laggard's own task queued behind it takes that slot at once. It used to
    wait behind the held-back task until the laggard blocked on it (an urgent want, 50 ms)."""
    s = _scheduler(slots=4)
    _join(s, b"fast")
    _read(s, b"fast", 0, 0, 4)
    _read(s, b"fast", 0, 4, 8)
    assert _cached(s) == {(0, 4), (0, 5), (0, 6), (0, 7)}
    _join(s, b"slow")
    assert s.want(b"slow", 0, 0, 1, 1, False) is None  # reach [1, 5)
    assert [index for _w, _b, index in _dispatched(s)] == [0]  # in 5's slot, read by nobody
    assert s.want(b"fast", 0, 8, 10, 1, False) is None
    assert sorted(index for _w, _b, index in _dispatched(s)) == [8, 9]  # 6's and 7's
    assert s.want(b"fast", 0, 10, 12, 1, False) is None
    assert _dispatched(s) == [], "slow reads 4 before 10: 10 waits"
    assert s.want(b"slow", 0, 1, 3, 1, False) is None  # reach [3, 7): 4 still
    assert [index for _w, _b, index in _dispatched(s)] == [1], "1 is read before 4"
    assert [e.index for e in s.pending] == [10, 11, 2], "the held-back tasks keep their order"
    assert not s.stats["evicted_needed"]
