"""Soak: 8 consumers over many epochs while a worker is killed every couple of seconds.
Bounded (about a minute); marked ``soak`` so it can be selected or left out (-m "not soak")."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import seqs
from dataserver.status import fetch_status
from helpers import wait_for, worker_pids

HERE = Path(__file__).parent
CONSUMERS = 8
EPOCHS = 120
BATCHES = 80


@pytest.mark.soak
@pytest.mark.timeout(240)
def test_soak_eight_consumers_with_workers_killed(serve: Any, isolated: dict[str, Path],
                                                   tmp_path: Path) -> None:
    server = serve(seqs.Indexed(BATCHES, delay=0.01), workers=2, max_retries=10)
    server_proc = psutil.Process(server.pid)
    logs = [tmp_path / f"consumer{i}.jsonl" for i in range(CONSUMERS)]
    procs = []
    for log in logs:  # files, not pipes: a full pipe would stall a consumer
        with open(log, "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, str(HERE / "consumer.py"), server.endpoint, str(EPOCHS)],
                stdout=out))
    rng = random.Random(0)
    samples: list[tuple[float, int, int]] = []  # (t, server rss, bytes in the shm dir)
    kills = 0
    t0 = time.monotonic()
    while any(p.poll() is None for p in procs):
        time.sleep(0.25)
        rss = server_proc.memory_info().rss
        shm_bytes = sum(f.stat().st_blocks * 512 for f in isolated["shm"].iterdir())
        samples.append((time.monotonic() - t0, rss, shm_bytes))
        if time.monotonic() - t0 > 2 * (kills + 1):
            workers = worker_pids(server.endpoint)
            if workers:
                os.kill(rng.choice(workers), signal.SIGKILL)
                kills += 1
        assert time.monotonic() - t0 < 150, "soak did not finish"
    assert [p.wait() for p in procs] == [0] * CONSUMERS
    for log in logs:
        out = log.read_text().splitlines()
        epochs = [json.loads(line) for line in out]
        assert len(epochs) == EPOCHS
        assert all([i for i, _ in e] == list(range(BATCHES)) for e in epochs)
    # a consumer that exits while still referencing its last batch keeps it leased until the
    # server sees its pid gone (checked twice a second)
    deadline = time.monotonic() + 10
    while (status := fetch_status(server.endpoint))["consumers"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not status["consumers"]
    # batches prefetched for the consumers that left finish being made, then nothing is held
    status = wait_for(lambda: (s := fetch_status(server.endpoint))["ring"]["held"] == 0 and s,
                      "every slot released")
    assert status["ring"]["one_off_segments"] == 0
    assert status["counters"]["restarts"] >= kills - 1
    n = len(samples)
    early = max(rss for _, rss, _ in samples[n // 4 : n // 2])
    late = max(rss for _, rss, _ in samples[-n // 4 :])
    shm_early = max(s for _, _, s in samples[n // 4 : n // 2])
    shm_late = max(s for _, _, s in samples[-n // 4 :])
    print(f"\nsoak: {CONSUMERS} consumers x {EPOCHS} epochs x {BATCHES} batches in "
          f"{samples[-1][0]:.0f} s, {kills} workers killed; server RSS {early / 2**20:.1f} -> "
          f"{late / 2**20:.1f} MiB; shm {shm_early / 2**20:.2f} -> {shm_late / 2**20:.2f} MiB")
    assert late < early * 1.10 + (4 << 20), "server memory grew"
    assert shm_late <= shm_early + (1 << 20), "shared memory use grew"
