"""Which cached batch gives up its slot (scheduler bookkeeping only): batches a consumer reads
soon are kept for it (backpressure on the others), batches beyond its reach are not."""

from __future__ import annotations

from dataserver.scheduler import ConsumerState, Dataset, Scheduler, WorkerState

LENGTH = 20


def _scheduler(slots: int, prefetch: int) -> Scheduler:
    s = Scheduler([Dataset("train", LENGTH)], max_retries=1, depth=8, barrier=[False])
    s.set_ring(slots, 4096, prefetch)
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
    s = _scheduler(slots=6, prefetch=4)
    _join(s, b"a")
    _read(s, b"a", 2, 14, 20)
    assert len(_cached(s)) == 6 and not s.free_slots
    s.remove_consumer(b"a")
    _join(s, b"b")
    assert s.want(b"b", 0, 0, 4, 1, False) is None
    assert sorted(index for _w, _b, index in _dispatched(s)) == [0, 1, 2, 3]  # 2 per worker
    assert s.stats["evicted"] == 4 and not s.stats["evicted_needed"]


def test_batches_a_lagging_consumer_reads_soon_are_kept_for_it() -> None:
    """Backpressure: the fast consumer gets slots from batches the laggard will not read
    within its reach (slots - prefetch = 4 positions), never from those it will."""
    s = _scheduler(slots=6, prefetch=2)
    _join(s, b"fast")
    _read(s, b"fast", 0, 0, 6)
    _join(s, b"slow")
    assert s.want(b"slow", 0, 0, 2, 1, False) is None  # cache hits: 0 and 1, now leased
    assert len(s.out_ready.pop(b"slow")) == 2
    assert _cached(s) == {(0, 2), (0, 3), (0, 4), (0, 5)}
    assert s.want(b"fast", 0, 6, 10, 1, False) is None
    assert sorted(index for _w, _b, index in _dispatched(s)) == [6, 7]
    assert _cached(s) == {(0, 2), (0, 3)}, "the laggard's next two stay for it"
