"""The core contract: order, exactly once, zero copies, lifetimes, structures, errors."""

from __future__ import annotations

import gc
import mmap
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import seqs
from dataserver.client import RemoteError, RemoteSequence, WorkerDiedError
from dataserver.config import ServerConfig
from dataserver.errors import ClosedError, ConfigError

pytestmark = pytest.mark.timeout(90)


def indices(seq: RemoteSequence) -> list[int]:
    out = []
    for x, y in seq:
        i = int(y[0])
        assert x.shape == (16, 16) and float(x[0, 0]) == i and float(x[-1, -1]) == i
        out.append(i)
    return out


@pytest.mark.parametrize("worker_type", ["process", "thread"])
def test_order_is_exact_under_random_delays(serve: Any, worker_type: str) -> None:
    server = serve(seqs.Indexed(48, delay=0.02), workers=3, worker_type=worker_type)
    with RemoteSequence(server.endpoint) as seq:
        assert len(seq) == 48
        for _epoch in range(2):
            assert indices(seq) == list(range(48))
            seq.on_epoch_end()


def test_shuffle_is_a_permutation_per_epoch_from_seed(serve: Any) -> None:
    server = serve(seqs.Indexed(40), shuffle=True, seed=7)
    with RemoteSequence(server.endpoint) as seq:
        first = indices(seq)
        seq.on_epoch_end()
        second = indices(seq)
    assert sorted(first) == sorted(second) == list(range(40))
    assert first != second and first != list(range(40))
    expected = [np.random.default_rng([7, e]).permutation(40).tolist() for e in (0, 1)]
    assert [first, second] == expected


def _backing(x: np.ndarray) -> Any:
    base = x
    while isinstance(base, np.ndarray):
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


@pytest.mark.parametrize("slot_bytes", [None, 1 << 20])
def test_batches_are_views_into_the_shared_ring(serve: Any, slot_bytes: Any) -> None:
    server = serve(seqs.Indexed(8, rows=256, cols=256), slot_bytes=slot_bytes)
    with RemoteSequence(server.endpoint) as seq:
        ring = np.frombuffer(seq._batches.ring.mm, np.uint8)  # type: ignore[union-attr]
        lo = ring.__array_interface__["data"][0]
        hi = lo + ring.nbytes
        del ring
        for x, y in seq:
            assert isinstance(_backing(x), mmap.mmap), "batch is not a view of shared memory"
            addr = x.__array_interface__["data"][0]
            in_ring = lo <= addr and addr + x.nbytes <= hi
            # with auto slot sizing, batch 0 was made before the ring (to size it) and stays in
            # its own segment; every other batch lies in the ring
            assert in_ring or (slot_bytes is None and int(y[0]) == 0), "batch left the ring"
            assert not x.flags.writeable and not x.flags.owndata
            with pytest.raises(ValueError, match="read-only"):
                x[0, 0] = 1
            del x, y


def test_copy_true_returns_owned_writable_arrays(serve: Any) -> None:
    server = serve(seqs.Indexed(6))
    with RemoteSequence(server.endpoint, copy=True) as seq:
        batches = list(seq)
        assert [int(y[0]) for _x, y in batches] == list(range(6))
        for x, _y in batches:
            assert x.flags.writeable and x.flags.owndata
            x[0, 0] = -1
        assert seq.held() == 0


def test_a_held_view_keeps_its_slot_and_dropping_it_frees_it(serve: Any) -> None:
    server = serve(seqs.Indexed(30), workers=2, slots=6, prefetch=2)
    with RemoteSequence(server.endpoint) as seq:
        kept_x, kept_y = seq[0]
        snapshot = kept_x.copy()
        assert seq.held() == 1
        for _ in range(3):  # many times round a 6-slot ring
            seq.on_epoch_end()
            assert indices(seq) == list(range(30))
            assert np.array_equal(kept_x, snapshot) and int(kept_y[0]) == 0
        gc.collect()
        assert seq.held() == 1
        view = kept_x[3:5]
        del kept_x, kept_y
        gc.collect()
        assert seq.held() == 1, "a view of the batch must keep it leased"
        del view
        gc.collect()
        assert seq.held() == 0


def test_holding_more_batches_than_slots_stays_correct(serve: Any) -> None:
    server = serve(seqs.Indexed(40), slots=4, prefetch=2)
    with RemoteSequence(server.endpoint) as seq:
        held = list(seq)
        assert seq.held() == 40
        for i, (x, y) in enumerate(held):
            assert int(y[0]) == i and float(x.min()) == float(x.max()) == i


def _assert_same(a: Any, b: Any, path: str = "batch") -> None:
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert a.tobytes() == np.ascontiguousarray(b).tobytes(), path
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _assert_same(u, v, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), path
    else:
        assert a == b, path


@pytest.mark.parametrize("copy", [False, True])
def test_nested_structures_and_dtypes_round_trip_exactly(serve: Any, copy: bool) -> None:
    server = serve(seqs.Structured(), workers=1)
    with RemoteSequence(server.endpoint, copy=copy) as seq:
        for i, batch in enumerate(seq):
            _assert_same(batch, seqs.make_structured(i))


def test_exception_reaches_the_consumer_at_its_index_with_traceback(serve: Any) -> None:
    server = serve(seqs.Raising(10, bad=(3, 7)))
    with RemoteSequence(server.endpoint) as seq:
        it = iter(seq)
        got: list[Any] = []
        for _ in range(10):
            try:
                got.append(int(next(it)[1][0]))
            except RemoteError as exc:
                got.append(exc)
    assert [g for g in got if isinstance(g, int)] == [0, 1, 2, 4, 5, 6, 8, 9]
    err = got[3]
    assert isinstance(err, RemoteError) and err.index == 3
    assert err.type_name == "ValueError" and err.message == "cannot decode record 3"
    assert "helper_that_fails" in err.traceback and "seqs.py" in err.traceback
    assert str(err).startswith("batch 3: ValueError: cannot decode record 3")
    assert isinstance(got[7], RemoteError) and got[7].index == 7


def test_object_dtype_is_refused_with_the_path_inside_the_batch(serve: Any) -> None:
    server = serve(seqs.ObjectDtype(4), slot_bytes=4096)
    with RemoteSequence(server.endpoint) as seq, pytest.raises(RemoteError) as info:
        seq[2]
    assert info.value.type_name == "dataserver.layout.BatchFormatError"
    assert "batch 2: batch['img'][3] has dtype object" in info.value.message


def test_none_batch_is_an_error_at_its_index(serve: Any) -> None:
    server = serve(seqs.ReturnsNone(4), slot_bytes=4096)
    with RemoteSequence(server.endpoint) as seq, pytest.raises(RemoteError, match="returned None"):
        seq[1]


def test_worker_killed_by_its_batch_is_retried_then_reported(serve: Any) -> None:
    server = serve(seqs.Dies(12, die_at=5), max_retries=1)
    with RemoteSequence(server.endpoint) as seq:
        got = []
        it = iter(seq)
        for _ in range(12):
            try:
                got.append(int(next(it)[1][0]))
            except WorkerDiedError as exc:
                assert exc.index == 5 and "SIGKILL" in str(exc) and "2 attempts" in str(exc)
                got.append(-1)
    assert got == [0, 1, 2, 3, 4, -1, 6, 7, 8, 9, 10, 11]


def test_segfault_in_getitem_is_reported_not_hung(serve: Any) -> None:
    server = serve(seqs.Dies(6, die_at=2, how="segv"), max_retries=0, slot_bytes=4096)
    with RemoteSequence(server.endpoint) as seq, pytest.raises(WorkerDiedError, match="SIGSEGV"):
        seq[2]


def test_worker_that_dies_once_loses_nothing(serve: Any, tmp_path: Any) -> None:
    server = serve(seqs.DiesOnce(40, 17, str(tmp_path / "died")))
    with RemoteSequence(server.endpoint) as seq:
        assert indices(seq) == list(range(40))
    assert (tmp_path / "died").exists()


def test_random_access_negative_and_out_of_range(serve: Any) -> None:
    server = serve(seqs.Indexed(20), shuffle=True)
    with RemoteSequence(server.endpoint) as seq:
        assert int(seq[13][1][0]) == 13
        assert int(seq[-1][1][0]) == 19
        assert int(seq[np.int64(4)][1][0]) == 4
        with pytest.raises(IndexError):
            seq[20]
        with pytest.raises(TypeError):
            seq["3"]  # type: ignore[index]


def test_sequential_getitem_is_served_from_the_prefetched_stream(serve: Any) -> None:
    server = serve(seqs.Indexed(30))
    with RemoteSequence(server.endpoint) as seq:
        assert [int(seq[i][1][0]) for i in range(30)] == list(range(30))
        assert seq._pos.cursor == 30  # served by the stream, not one round trip per batch
        assert [int(seq[i][1][0]) for i in (5, 2, 29)] == [5, 2, 29]


def test_breaking_out_and_iterating_again_restarts_the_epoch(serve: Any) -> None:
    server = serve(seqs.Indexed(25))
    with RemoteSequence(server.endpoint) as seq:
        for _x, y in seq:
            if int(y[0]) == 10:
                break
        del _x, y
        assert indices(seq) == list(range(25))
        assert indices(seq) == list(range(25))


def test_on_epoch_end_runs_in_every_process_worker_before_the_next_epoch(serve: Any) -> None:
    server = serve(seqs.EpochTagged(20), workers=2)
    with RemoteSequence(server.endpoint) as seq:
        for epoch in range(3):
            tags = [int(y[1]) for _x, y in seq]
            assert tags == [epoch] * 20
            seq.on_epoch_end()


def test_on_epoch_end_runs_once_per_epoch_with_shared_thread_workers(serve: Any) -> None:
    server = serve(seqs.EpochTagged(20), workers=3, worker_type="thread")
    with RemoteSequence(server.endpoint) as seq:
        for epoch in range(3):
            assert [int(y[1]) for _x, y in seq] == [epoch] * 20
            seq.on_epoch_end()


def test_oversize_batch_travels_in_a_one_off_segment(serve: Any) -> None:
    server = serve(seqs.Sized(12, small=4096, big=2 << 20, big_at=(5, 9)))
    with RemoteSequence(server.endpoint) as seq:
        assert seq.slot_bytes < 2 << 20
        for i, (x, y) in enumerate(seq):
            assert int(y[0]) == i
            assert x.nbytes == (2 << 20 if i in (5, 9) else 4096)
            assert float(x[0]) == float(x[-1]) == i


def test_closed_client_raises_clearly(serve: Any) -> None:
    server = serve(seqs.Indexed(4))
    seq = RemoteSequence(server.endpoint)
    seq.close()
    seq.close()
    with pytest.raises(ClosedError, match="closed"):
        seq[0]


def test_views_outlive_close(serve: Any) -> None:
    server = serve(seqs.Indexed(6))
    seq = RemoteSequence(server.endpoint)
    x, y = seq[2]
    seq.close()
    assert float(x[0, 0]) == 2 and int(y[0]) == 2


def test_bad_options_and_sequences_fail_at_start_with_one_line(serve: Any) -> None:
    with pytest.raises(ConfigError, match="len\\(\\) is 0"):
        serve(seqs.Empty())
    with pytest.raises(ConfigError, match="len\\(\\) raised RuntimeError: no index file"):
        serve(seqs.BadLen())
    with pytest.raises(ConfigError, match="--workers must be a positive integer"):
        serve(seqs.Indexed(), workers=-1)
    with pytest.raises(ConfigError, match="unknown option wrokers"):
        serve(seqs.Indexed(), wrokers=2)
    with pytest.raises(ConfigError, match="is not a size"):
        serve(seqs.Indexed(), slot_bytes="lots")
    with pytest.raises(ConfigError, match="without authentication"):
        serve(seqs.Indexed(), endpoint="tcp://0.0.0.0:5599")


@pytest.mark.parametrize(("option", "message"), [
    ({"worker_type": "fibre"}, "--worker-type must be process or thread, got 'fibre'"),
    ({"start_method": "clone"}, "--start-method must be spawn, forkserver or fork"),
    ({"memory_kind": "vss"}, "--memory-kind must be uss, pss or rss, got 'vss'"),
    ({"backend": "k8s"}, "--backend must be local or ray"),
    ({"batch_timeout": 0}, "--batch-timeout must be positive seconds, got 0"),
    ({"consumer_timeout": -1}, "--consumer-timeout must be positive seconds, got -1"),
    ({"slots": 1}, "--slots must be at least 2"),
])
def test_each_bad_option_is_named_with_what_it_takes(option: dict[str, Any],
                                                     message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        ServerConfig(**option)


def test_spec_sources(serve: Any) -> None:
    for spec, args, n in (("seqs:Indexed", {"n": 5}, 5), ("seqs:make_indexed", {"n": 3}, 3),
                          ("seqs:instance", None, 10)):
        server = serve(spec=spec, args=args)
        with RemoteSequence(server.endpoint) as seq:
            assert len(seq) == n and indices(seq) == list(range(n))
        server.close()
    with pytest.raises(ConfigError, match="cannot import 'nosuchmodule'"):
        serve(spec="nosuchmodule:Seq")
    with pytest.raises(ConfigError, match="has no attribute 'Nope'"):
        serve(spec="seqs:Nope")


def test_client_imports_no_server_module() -> None:
    code = (
        "import sys, dataserver.client\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'psutil' or m in ("
        "'dataserver.server','dataserver.worker','dataserver.pool','dataserver.scheduler',"
        "'dataserver.api','dataserver.cli','dataserver.source','dataserver.demo')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("worker_type", ["process", "thread"])
def test_arrays_made_with_dataserver_empty_are_not_copied(serve: Any, worker_type: str) -> None:
    server = serve(seqs.InPlace(12, rows=64, cols=64), worker_type=worker_type,
                   slot_bytes=1 << 16)
    with RemoteSequence(server.endpoint) as seq:
        for i, batch in enumerate(seq):
            assert batch["y"][1] == 1, "empty() did not allocate in the slot"
            assert float(batch["x"][0, 0]) == i and int(batch["y"][0]) == i
            assert np.array_equal(batch["strided"], batch["x"][:, ::2])
    inline = seqs.InPlace(2)[1]  # outside a worker: plain numpy arrays
    assert inline["y"][1] == 0 and float(inline["x"][0, 0]) == 1


def test_thread_workers_overlap_epochs_when_there_is_no_on_epoch_end(serve: Any,
                                                                     tmp_path: Path) -> None:
    """Thread workers share the Sequence, so epochs are fenced only to run its on_epoch_end
    between them; without one, the next epoch's batches are made while a slow last batch of
    this one still runs (no epoch-end stall)."""
    log = tmp_path / "calls.txt"
    server = serve(seqs.LoggedSlowLast(8, str(log)), worker_type="thread", workers=2)
    with RemoteSequence(server.endpoint) as rs:
        for _ in range(2):
            assert [int(b[0]) for b in rs] == list(range(8))
            rs.on_epoch_end()
    lines = log.read_text().split("\n")
    begin, end = lines.index("start 7 slow"), lines.index("end 7 slow")
    # an index whose first call came before the slow one is called again (a later epoch, as
    # the client asks ahead) while it runs; the barrier would allow no such start
    earlier = {line for line in lines[:begin] if line.startswith("start ")}
    again = [line for line in lines[begin + 1 : end] if line in earlier]
    assert again, f"the next epoch waited for the slow last batch: {lines}"
