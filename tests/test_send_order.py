"""A frames consumer's announcements leave in its position order (scheduler bookkeeping only)."""

from __future__ import annotations

from dataserver.scheduler import ConsumerState, Dataset, Scheduler, WorkerState


def _scheduler(frames: bool) -> tuple[Scheduler, ConsumerState]:
    s = Scheduler([Dataset("train", 8)], max_retries=1, depth=4, barrier=[False])
    s.set_ring(8, 4096)
    c = ConsumerState(b"c", pid=1, same_host=False, name="c", ds=0, frames=frames)
    s.add_consumer(c)
    for wid in (1, 2):
        s.add_worker(WorkerState(wid, wid - 1, ready=True))
    return s, c


def _tasks(s: Scheduler) -> dict[int, tuple[int, int]]:
    """bid per position, from the tasks dispatched (index == position: no shuffle)."""
    s.dispatch()
    by_index = {t[3]: (wid, t[0]) for wid, ts in s.out_tasks.items() for t in ts}
    s.out_tasks.clear()
    return by_index


def _finish(s: Scheduler, task: tuple[int, int]) -> None:
    wid, bid = task
    s.done(wid, bid, "", 4096, b"")


def _sent(s: Scheduler) -> list[int]:
    return [item[1] for item in s.out_ready.pop(b"c", [])]


def test_a_frames_consumer_gets_announcements_in_position_order() -> None:
    s, _c = _scheduler(frames=True)
    assert s.want(b"c", 0, 0, 4, 1, False) is None
    tasks = _tasks(s)
    _finish(s, tasks[1])
    assert _sent(s) == []  # position 0 is still being made: 1 waits for it
    _finish(s, tasks[3])
    assert _sent(s) == []
    _finish(s, tasks[0])
    assert _sent(s) == [0, 1]
    _finish(s, tasks[2])
    assert _sent(s) == [2, 3]


def test_a_failed_or_dropped_position_lets_the_later_ones_go() -> None:
    s, c = _scheduler(frames=True)
    assert s.want(b"c", 0, 0, 3, 1, False) is None
    tasks = _tasks(s)
    _finish(s, tasks[1])
    wid0, bid0 = tasks[0]
    s.raised(wid0, bid0, "ValueError", "bad", "")
    assert _sent(s) == [1]
    assert [f.pos for _cid, f in s.out_failed] == [0]
    # position 2 is still owed; the consumer ends the epoch, so it is owed no longer
    assert s.want(b"c", 1, 0, 2, 1, False) is None
    tasks = _tasks(s)
    _finish(s, tasks[1])
    assert _sent(s) == []  # epoch 0's position 2 comes first
    s.epoch_end(b"c", 0)
    assert _sent(s) == []  # epoch 1's position 0 is still owed
    _finish(s, tasks[0])
    assert _sent(s) == [0, 1]
    assert len(c.order) == 0


def test_a_consumer_blocked_further_on_gets_its_batch_at_once() -> None:
    """``at()`` forward: the consumer skipped positions it still owes; it waits for a later one
    (an urgent want), and the positions before it no longer hold that back."""
    s, _c = _scheduler(frames=True)
    assert s.want(b"c", 0, 0, 4, 1, False) is None
    tasks = _tasks(s)
    _finish(s, tasks[3])
    assert _sent(s) == []
    assert s.want(b"c", 0, 3, 4, 1, True) is None  # blocked on position 3
    assert _sent(s) == [3]  # once: the urgent want only let the prefetched announcement go
    _finish(s, tasks[1])
    assert _sent(s) == [1]  # behind the floor: sent as it comes (the consumer drops it)
    # the consumer reads the epoch again from the start: it asks again, as its prefetch does,
    # and blocks on position 0; the order holds again from there
    assert s.want(b"c", 0, 0, 3, 1, False) is None
    assert _sent(s) == [1]  # made already: the floor of the jump to 3 still lets it go
    assert s.want(b"c", 0, 0, 1, 1, True) is None  # blocked on 0: the order holds from there
    assert _tasks(s) == {}  # 0 and 2 are still being made
    _finish(s, tasks[2])
    assert _sent(s) == []  # 2 waits for 0
    _finish(s, tasks[0])
    assert _sent(s) == [0, 0, 2, 2]  # 0 and 2 were owed twice (before and after going back)


def test_shared_memory_consumers_get_announcements_as_batches_are_made() -> None:
    s, _c = _scheduler(frames=False)
    assert s.want(b"c", 0, 0, 2, 1, False) is None
    tasks = _tasks(s)
    _finish(s, tasks[1])
    assert _sent(s) == [1]  # the client reorders what it maps; nothing waits on a socket


def test_an_urgent_want_for_what_is_owed_already_announces_it_once() -> None:
    """A consumer blocked on a batch it asked for sends an urgent want after a while: that
    moves the batch forward, and adds no second announcement (for a frames consumer, a
    second copy of the batch's bytes) while the batch is being made or, for a frames
    consumer, while its frames are on their way out."""
    for frames in (False, True):
        s, c = _scheduler(frames=frames)
        assert s.want(b"c", 0, 0, 3, 1, False) is None
        tasks = _tasks(s)
        assert s.want(b"c", 0, 0, 1, 1, True) is None  # being made: waited for already
        _finish(s, tasks[0])
        ready = s.out_ready.pop(b"c")
        assert [item[1] for item in ready] == [0]
        assert s.want(b"c", 0, 0, 1, 1, True) is None
        # a frames consumer's announcement is on its way until its frames have left; one of
        # the ring's is read at once: asked for again, it is announced again
        assert _sent(s) == ([] if frames else [0])
        s.sent(b"c", ready)
        assert not c.sending
        assert s.want(b"c", 0, 0, 1, 1, True) is None  # gone: a request like any other
        assert _sent(s) == [0]


def test_an_urgent_want_for_a_position_of_a_fetched_batch_announces_it() -> None:
    """Holding a batch from random access is not being owed its position: an urgent want for
    that position (the consumer asked for nothing else) is announced."""
    s, _c = _scheduler(frames=True)
    assert s.fetch(b"c", 0, 0) is None
    tasks = _tasks(s)
    _finish(s, tasks[0])
    assert _sent(s) == [-1]
    assert s.want(b"c", 0, 0, 1, 1, True) is None
    assert _sent(s) == [0]
