"""Worker caps (memory, tasks), growth warnings and stuck-batch flags."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import seqs
from dataserver.client import RemoteSequence
from dataserver.errors import ConfigError
from dataserver.server import HOUSEKEEPING_INTERVAL_S
from dataserver.status import fetch_status
from helpers import wait_for, wait_prefetched, worker_pids

pytestmark = pytest.mark.timeout(120)


def read_epoch(endpoint: str, epochs: int = 1) -> list[list[int]]:
    out = []
    with RemoteSequence(endpoint) as seq:
        for _ in range(epochs):
            out.append([int(y[0]) for _x, y in seq])
            seq.on_epoch_end()
    return out


def test_worker_over_its_memory_cap_is_replaced_and_nothing_is_lost(serve: Any) -> None:
    server = serve(seqs.Hog(40, hog_at=(5,), mb=200, delay=0.01), workers=2,
                   max_worker_memory="100MiB")
    pids_before = {w["pid"] for w in fetch_status(server.endpoint)["workers"]}
    assert read_epoch(server.endpoint) == [list(range(40))]
    status = wait_for(lambda: (s := fetch_status(server.endpoint))["counters"].get(
        "memory_cap_restarts") and len(s["workers"]) == 2 and s, "the hog to be replaced")
    # batch 5 hogs each time it is made (epoch 0, and epoch 1 when prefetched across the end)
    assert status["counters"]["memory_cap_restarts"] >= 1
    assert {w["pid"] for w in status["workers"]} != pids_before
    assert all(w["uss"] < 100 << 20 for w in status["workers"])
    assert read_epoch(server.endpoint, 2) == [list(range(40))] * 2


@pytest.mark.timeout(90)
def test_ring_pages_a_worker_wrote_do_not_count_toward_its_cap(serve: Any) -> None:
    """Batches made ahead and not read yet are in ring pages mapped by their worker alone, so
    psutil counts them in its USS: ~48 MiB per worker here, over a 40 MiB cap the worker's own
    memory stays well under. Nobody is replaced."""
    server = serve(seqs.Indexed(64, rows=1024, cols=1024), workers=2, prefetch=24,
                   max_worker_memory="40MiB")
    with RemoteSequence(server.endpoint) as seq:
        it = iter(seq)
        assert int(next(it)[1][0]) == 0  # the rest of the prefetch is made, and not read
        wait_prefetched(server.endpoint, held=20)
        raw = [psutil.Process(pid).memory_full_info().uss for pid in worker_pids(server.endpoint)]
        assert max(raw) > 40 << 20, f"the setting does not test the cap: USS {raw}"
        time.sleep(3 * HOUSEKEEPING_INTERVAL_S)  # a few passes of the caps check
        status = fetch_status(server.endpoint)
        assert not status["counters"].get("memory_cap_restarts"), status["counters"]
        assert not any(w["retiring"] for w in status["workers"])
        del it


def test_growth_that_is_the_ring_filling_is_not_flagged() -> None:
    """A worker's USS rising batch after batch because it writes ring slots nobody has read
    yet is not a leak; the same rise with no ring pages held is."""
    from types import SimpleNamespace

    from dataserver.caps import GROWTH_SAMPLES, Caps
    from dataserver.scheduler import WorkerState

    def feed(ring_now: int) -> bool:
        side: Any = SimpleNamespace(mem_history={}, growing=set(),
                                    _ring_share=lambda _w: ring_now)
        w = WorkerState(1, 0, ready=True)
        for k in range(GROWTH_SAMPLES):
            w.done = k + 1
            Caps._note_memory(side, w, (20 << 20) + k * (8 << 20))  # +72 MiB in all
        return 1 in side.growing

    assert not feed(ring_now=72 << 20), "the rise is the ring's pages"
    assert feed(ring_now=0), "the rise is the worker's own"


def test_worker_is_replaced_after_max_tasks(serve: Any) -> None:
    server = serve(seqs.Indexed(30, delay=0.01), workers=2, max_worker_tasks=6)
    assert read_epoch(server.endpoint, 2) == [list(range(30))] * 2
    status = wait_for(lambda: fetch_status(server.endpoint)["counters"].get(
        "task_cap_restarts", 0) >= 3, "workers to be replaced")
    assert status


def test_memory_cap_does_not_apply_to_threads(serve: Any) -> None:
    with pytest.raises(ConfigError, match="share the server's memory"):
        serve(seqs.Indexed(4), worker_type="thread", max_worker_memory="1GiB")


@pytest.mark.timeout(60)
def test_steady_growth_is_flagged(serve: Any) -> None:
    server = serve(seqs.Hog(40, grow_mb=8, delay=0.55), workers=1, prefetch=4, slots=8)
    with RemoteSequence(server.endpoint) as seq:
        it = iter(seq)
        status = None
        for _ in range(40):
            next(it)
            status = fetch_status(server.endpoint)
            if status["workers"][0]["growing"]:
                break
        assert status is not None and status["workers"][0]["growing"], status


def test_a_stuck_batch_is_flagged_then_replaced(serve: Any, tmp_path: Path) -> None:
    server = serve(seqs.Hangs(12, 3, str(tmp_path / "hung")), workers=2, hang_threshold=0.3,
                   batch_timeout=4)
    with RemoteSequence(server.endpoint) as seq:
        it = iter(seq)
        got = [int(next(it)[1][0]) for _ in range(3)]
        stuck = wait_for(lambda: [w for w in fetch_status(server.endpoint)["workers"]
                                  if w["stuck"]], "a stuck worker in status")
        assert stuck[0]["batch"] == 3 and stuck[0]["batch_seconds"] > 0.3
        got += [int(y[0]) for _x, y in it]
    assert got == list(range(12))


@pytest.mark.parametrize("worker_type", ["process", "thread"])
def test_status_stacks_find_a_stuck_getitem(serve: Any, tmp_path: Path,
                                            worker_type: str) -> None:
    import subprocess
    import sys

    server = serve(seqs.Hangs(8, 2, str(tmp_path / "hung")), workers=1, worker_type=worker_type,
                   hang_threshold=0.2, batch_timeout=30 if worker_type == "process" else None)
    with RemoteSequence(server.endpoint) as seq:
        it = iter(seq)
        next(it)
        next(it)
        wait_for(lambda: any(w["stuck"] for w in fetch_status(server.endpoint)["workers"]),
                 "the stuck batch")
        stacks = fetch_status(server.endpoint, stacks=True)["stacks"]
        assert list(stacks) == ["0"]
        assert "seqs.py" in stacks["0"] and "__getitem__" in stacks["0"], stacks["0"]
        out = subprocess.run([sys.executable, "-m", "dataserver", "status", "--stacks",
                              "--endpoint", server.endpoint], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0 and "worker 0" in out.stdout and "__getitem__" in out.stdout
        if worker_type == "process":  # the hung worker is killed at its deadline; go on
            for pid in worker_pids(server.endpoint):
                os.kill(pid, signal.SIGKILL)
            assert [int(y[0]) for _x, y in it] == list(range(2, 8))


def test_workers_memory_is_read_a_few_per_pass_in_turn() -> None:
    """Reading a worker's memory holds the server's loop: with many workers, each
    housekeeping pass reads MEMORY_READS_PER_PASS of them, those read longest ago, so every
    worker in turn."""
    from types import SimpleNamespace

    from dataserver.caps import MEMORY_READS_PER_PASS, Caps
    from dataserver.monitor import Monitor
    from dataserver.scheduler import WorkerState

    workers = {wid: WorkerState(wid, wid, pid=1000 + wid, ready=True) for wid in range(10)}
    workers[3].retiring = "over its cap"
    monitor = Monitor()
    side: Any = SimpleNamespace(sched=SimpleNamespace(workers=workers), monitor=monitor,
                                config=SimpleNamespace(backend="local"))
    clock = iter(range(1, 1000))

    def read(due: set[int]) -> set[int]:
        for wid in sorted(due):  # as _check_caps reads them, each by Monitor.process
            monitor._ring_read_at[workers[wid].pid] = float(next(clock))
        return due

    passes = [read(Caps._memory_due(side)) for _ in range(9)]
    assert all(len(p) == MEMORY_READS_PER_PASS for p in passes)
    assert all(3 not in p for p in passes), "a retiring worker is not read"
    for i in range(len(passes) - 2):
        assert set().union(*passes[i : i + 3]) == set(workers) - {3}, "all in any 3 passes"
    monitor.process(workers[0].pid, ring=True)  # a real read (of no process) counts too
    assert 0 not in Caps._memory_due(side)
    side.sched.workers = {wid: workers[wid] for wid in (0, 1)}
    assert Caps._memory_due(side) == {0, 1}
