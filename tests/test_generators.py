"""Generator datasets: one generator per worker, sharded by worker_info(), items as made."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import seqs
from dataserver.client import RemoteSequence

pytestmark = pytest.mark.timeout(90)
HERE = Path(__file__).parent


def test_finite_sharded_generator_delivers_every_item_exactly_once(serve: Any) -> None:
    server = serve(generator=seqs.sharded_items, args={"n": 200}, workers=4)
    with RemoteSequence(server.endpoint) as stream:
        assert stream.stream
        with pytest.raises(TypeError, match="no length"):
            len(stream)
        got = [int(y[0]) for _x, y in stream]
        assert list(stream) == []  # ended stays ended
    assert sorted(got) == list(range(200))


def test_several_consumers_share_one_stream(serve: Any) -> None:
    server = serve(generator=seqs.sharded_items, args={"n": 120}, workers=2)
    with RemoteSequence(server.endpoint, prefetch=4) as a, \
            RemoteSequence(server.endpoint, prefetch=4) as b:
        live = {0: iter(a), 1: iter(b)}
        got: list[int] = []
        per = [0, 0]
        while live:  # take from each in turn until both streams end
            for k, it in list(live.items()):
                item = next(it, None)
                if item is None:
                    del live[k]
                else:
                    got.append(int(item[1][0]))
                    per[k] += 1
    assert min(per) > 20, per
    assert sorted(got) == list(range(120)), "each item goes to exactly one consumer"


def test_infinite_generator_streams_on(serve: Any) -> None:
    server = serve(generator=seqs.endless, workers=2)
    with RemoteSequence(server.endpoint) as stream:
        got = [int(y[0]) for _x, y in itertools.islice(stream, 500)]
    assert len(set(got)) == 500


def test_dead_worker_generator_resumes_where_it_was(serve: Any, tmp_path: Path) -> None:
    server = serve(generator=seqs.dies_once_items, args={"n": 60, "marker": str(tmp_path / "m")},
                   workers=2)
    with RemoteSequence(server.endpoint) as stream:
        got = [int(y[0]) for _x, y in stream]
    assert sorted(got) == list(range(60)) and (tmp_path / "m").exists()


def test_generator_beside_a_sequence_from_the_cli(isolated: dict[str, Path]) -> None:
    endpoint = f"ipc://{isolated['runtime']}/gen.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dataserver", "serve", "val=seqs:Indexed", "--generator",
         "train=seqs:sharded_items", "--arg", "train.n=30", "--arg", "val.n=5",
         "--workers", "2", "--endpoint", endpoint], cwd=HERE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("dataserver: ready at"), proc.stderr
        with RemoteSequence(endpoint, dataset="train") as train, \
                RemoteSequence(endpoint, dataset="val") as val:
            assert sorted(int(y[0]) for _x, y in train) == list(range(30))
            assert [int(y[0]) for _x, y in val] == list(range(5))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.communicate()
