"""Many consumers on one server: shared production, shards, datasets, epochs, resume, reclaim."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import seqs
from dataserver.client import ProtocolError, RemoteSequence
from dataserver.status import fetch_status
from helpers import wait_for

pytestmark = pytest.mark.timeout(120)
HERE = Path(__file__).parent


def consumer(endpoint: str, epochs: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(HERE / "consumer.py"), endpoint, str(epochs),
                             *extra], stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("slots", [100, 12])
def test_four_consumers_share_one_production(serve: Any, tmp_path: Path, slots: int) -> None:
    """With room for both epochs in the ring, each batch is made once for all four consumers
    (they start at different moments); with a small ring, laggards get evicted batches made
    again, and still every consumer sees every batch in order with identical bytes."""
    log = tmp_path / "made"
    server = serve(seqs.Counting(40, str(log), delay=0.005), workers=2, slots=slots,
                   prefetch=8)
    procs = [consumer(server.endpoint, 2) for _ in range(4)]
    outs = [p.communicate(timeout=90)[0].splitlines() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    epochs = [[json.loads(line) for line in out] for out in outs]
    for seen in epochs:
        assert [[i for i, _ in e] for e in seen] == [list(range(40))] * 2
    assert all(e == epochs[0] for e in epochs), "consumers saw different bytes"
    made = Counter(tuple(map(int, line.split())) for line in log.read_text().splitlines())
    if slots == 100:
        # each (epoch, index) made once for all four consumers (batch 0 of epoch 0 at start,
        # to size the slots); the start of epoch 2 was prefetched before the consumers stopped
        assert {n for (e, _i), n in made.items() if e < 2} == {1}, made
        assert sum(1 for e, _i in made if e < 2) == 80


def test_ranks_reading_at_once_beside_an_idle_consumer_do_not_hold_each_other_back(
        serve: Any) -> None:
    """Four ranks read their shards at the same time, on the default ring, beside a consumer
    that connected and reads nothing. Each sees its shard in order, and the server hardly ever
    had to give up a batch someone will read for a blocked consumer. Under the old eviction
    rule the ranks kept each other's batches and the idle consumer kept the first ring's
    worth, so they got their batches one urgent want (and one such eviction) at a time: about
    one batch in four; 57 batches/s per rank instead of ~7,500."""
    n = 2000
    server = serve(seqs.Indexed(n, rows=1, cols=16), workers=2)
    with RemoteSequence(server.endpoint):  # connected, reads nothing
        procs = [consumer(server.endpoint, 1, f"shard={rank}/4") for rank in range(4)]
        outs = [p.communicate(timeout=90)[0].splitlines() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    for rank, out in enumerate(outs):
        assert [i for i, _ in json.loads(out[0])] == list(range(rank, n, 4))
    forced = fetch_status(server.endpoint)["counters"].get("evicted_needed", 0)
    assert forced < n // 20, f"{forced} batches someone needed were evicted for a blocked one"


def test_shards_cover_the_epoch_exactly_once_in_the_shared_order(serve: Any) -> None:
    server = serve(seqs.Indexed(43), shuffle=True, seed=3)
    for epoch in range(2):
        seen = []
        for rank in range(4):
            with RemoteSequence(server.endpoint, shard=(rank, 4)) as seq:
                for _ in range(epoch):
                    seq.on_epoch_end()
                got = [int(y[0]) for _x, y in seq]
                assert len(got) == len(seq) == len(range(rank, 43, 4))
                order = np.random.default_rng([3, epoch]).permutation(43).tolist()
                assert got == order[rank::4]
                assert int(seq[1][1][0]) == order[rank + 4]  # seq[i]: the shard's i-th batch
                seen += got
        assert sorted(seen) == list(range(43))


def test_bad_shard_is_refused() -> None:
    with pytest.raises(ValueError, match="0 <= rank < world"):
        RemoteSequence("ipc:///nonexistent", shard=(4, 4))


def test_two_datasets_from_one_pool(serve: Any) -> None:
    server = serve({"train": seqs.Indexed(30), "val": seqs.Indexed(7, rows=4, cols=4)})
    with RemoteSequence(server.endpoint, dataset="train") as train, \
            RemoteSequence(server.endpoint, dataset="val") as val:
        assert (len(train), len(val)) == (30, 7)
        for _ in range(2):
            assert [int(y[0]) for _x, y in train] == list(range(30))
            assert [(int(y[0]), x.shape) for x, y in val] == [(i, (4, 4)) for i in range(7)]
            train.on_epoch_end()
            val.on_epoch_end()
    with pytest.raises(ProtocolError, match="serves 'train', 'val'"):
        RemoteSequence(server.endpoint)
    status = fetch_status(server.endpoint)
    assert [d["name"] for d in status["datasets"]] == ["train", "val"]
    assert len(status["workers"]) == 2


def test_cli_named_datasets_with_targeted_args(isolated: dict[str, Path]) -> None:
    endpoint = f"ipc://{isolated['runtime']}/named.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dataserver", "serve", "train=seqs:Indexed", "val=seqs:Indexed",
         "--arg", "rows=2", "--arg", "val.n=5", "--arg", "train.n=9", "--workers", "1",
         "--endpoint", endpoint], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("dataserver: ready at")
        with RemoteSequence(endpoint, dataset="val") as val, \
                RemoteSequence(endpoint, dataset="train") as train:
            assert (len(train), len(val)) == (9, 5)
            assert val[0][0].shape == (2, 16)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.communicate()


def test_consumers_at_different_epochs_get_their_own_order(serve: Any) -> None:
    server = serve(seqs.Indexed(20), shuffle=True, seed=11)
    order = [np.random.default_rng([11, e]).permutation(20).tolist() for e in range(3)]
    with RemoteSequence(server.endpoint) as ahead:
        for e in range(3):
            assert [int(y[0]) for _x, y in ahead] == order[e]
            ahead.on_epoch_end()
        with RemoteSequence(server.endpoint) as late:
            assert late.epoch == 0
            assert [int(y[0]) for _x, y in late] == order[0]


def test_resume_continues_with_the_exact_next_batch(serve: Any) -> None:
    server = serve(seqs.Indexed(30), shuffle=True, seed=5)
    order = [np.random.default_rng([5, e]).permutation(30).tolist() for e in range(2)]
    with RemoteSequence(server.endpoint, shard=(1, 2)) as seq:
        seq.on_epoch_end()
        it = iter(seq)
        first = [int(next(it)[1][0]) for _ in range(6)]
        state = seq.state()
    assert first == order[1][1::2][:6]
    assert state["epoch"] == 1 and state["position"] == 6 and state["shard"] == [1, 2]
    with RemoteSequence(server.endpoint, resume=json.loads(json.dumps(state))) as again:
        assert again.shard == (1, 2) and again.epoch == 1
        rest = [int(y[0]) for _x, y in again]
        assert rest == order[1][1::2][6:]
    with pytest.raises(ValueError, match="seed=99"):
        RemoteSequence(server.endpoint, resume={**state, "seed": 99})


def test_killed_consumer_leases_come_back_and_others_go_on(serve: Any) -> None:
    server = serve(seqs.Indexed(40), slots=24, prefetch=8)
    holder = consumer(server.endpoint, 1, "hold")
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        held = fetch_status(server.endpoint)["consumers"][0]["leases"]
        assert held >= 20
        with RemoteSequence(server.endpoint) as other:
            it = iter(other)
            got = [int(next(it)[1][0]) for _ in range(5)]
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(10)
            wait_for(lambda: len(fetch_status(server.endpoint)["consumers"]) == 1,
                     "the dead consumer to be reclaimed")
            got += [int(y[0]) for _x, y in it]
        assert got == list(range(40))
        # once batches prefetched for the closed consumer are made, nothing stays held
        ring = wait_for(lambda: (r := fetch_status(server.endpoint)["ring"])["held"] == 0 and r,
                        "every slot released")
        assert ring["one_off_segments"] == 0
    finally:
        holder.kill()
        holder.communicate()


def test_a_consumer_asks_no_further_ahead_than_the_next_epoch(serve: Any) -> None:
    """Prefetch (64 here) spans epochs only into the next one: a small dataset is not made
    many epochs ahead for a consumer that may stop after this one."""
    server = serve(seqs.Indexed(8), prefetch=64)
    with RemoteSequence(server.endpoint) as rs:
        assert rs.prefetch == 64
        assert [int(y[0]) for _x, y in rs] == list(range(8))
        rs.on_epoch_end()
        snap = wait_for(lambda: (s := fetch_status(server.endpoint))["workers"]
                        and all(w["queued"] == 0 for w in s["workers"]) and s,
                        "the workers to finish what was asked")
    # epoch 0 and 1 (asked ahead), plus at most the slot-sizing probe
    assert snap["counters"]["produced"] <= 2 * 8 + 1, snap["counters"]
