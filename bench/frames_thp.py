"""Frames consumers of big batches, with and without huge pages (``python -m bench.frames_thp``).

Before 4c74bba a frames consumer received each batch into memory ZeroMQ allocated for it, and
glibc serves an allocation of 32 MiB or more with a fresh mmap every time, so every batch cost
~8k page faults (~half the receive time on this machine); starting the *consumer* with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35, transparent huge pages in "madvise"
or "always" mode) made those mappings huge pages and 1.5-2x the batches/s. Such batches now
come as 4 MiB frames received into buffers the client recycles, which this checks: the setting
should gain nothing. It measures one server (started without the setting) and a consumer
process with and without it, interleaved, 3 repetitions, medians: batches/s over epochs 2-3,
the median wait per batch and the first batch of each later epoch."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.workload import Workload
from dataserver import DataServer

CONSUMER = """
import json, statistics, sys, time
import numpy as np
from dataserver.client import RemoteSequence
endpoint, epochs = sys.argv[1], int(sys.argv[2])
out = {"rate": [], "wait": [], "first": []}
with RemoteSequence(endpoint, transport="frames", timeout=60) as rs:
    for epoch in range(epochs):
        t0 = t = time.perf_counter()
        waits = []
        for x, y in rs:
            waits.append(time.perf_counter() - t)
            int(x.view(np.uint64).sum())
            t = time.perf_counter()
        rs.on_epoch_end()
        if epoch:
            out["rate"].append(len(rs) / (time.perf_counter() - t0))
            out["wait"].append(statistics.median(waits))
            out["first"].append(waits[0])
print(json.dumps(out))
"""
SETTING = "glibc.malloc.hugetlb=1"


def thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else text.strip()


def consume(endpoint: str, epochs: int, tunable: bool) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunable:
        env["GLIBC_TUNABLES"] = SETTING
    p = subprocess.run([sys.executable, "-c", CONSUMER, endpoint, str(epochs)], env=env,
                       capture_output=True, text=True, timeout=600)
    if p.returncode:
        raise SystemExit(f"the consumer failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    got: dict[str, Any] = json.loads(p.stdout)
    return got


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.frames_thp", description=__doc__)
    p.add_argument("--mib", type=int, default=32, help="batch size in MiB")
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    glibc = os.confstr("CS_GNU_LIBC_VERSION") or "unknown"
    print(f"{glibc}; transparent huge pages: {thp_mode()}")
    os.environ.pop("GLIBC_TUNABLES", None)  # the server and its workers run without it
    results: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="dsbench-", dir="/tmp") as tmp, DataServer(
            Workload(a.mib << 20, a.batches), workers=2,
            endpoint=f"ipc://{tmp}/thp.sock") as server:
        for rep in range(a.reps):
            print(f"rep {rep + 1}/{a.reps}", file=sys.stderr, flush=True)
            for tunable in (False, True):
                results[tunable].append(consume(server.endpoint, a.epochs, tunable))

    def med(tunable: bool, key: str) -> float:
        return statistics.median(v for r in results[tunable] for v in r[key])

    print(f"\n## frames consumer, {a.mib} MiB batches, 2 process workers "
          f"(medians of {a.reps} runs, epochs 2-{a.epochs})\n")
    print("| consumer | batches/s | median wait (ms) | first batch of an epoch (ms) |")
    print("|---|--:|--:|--:|")
    for tunable, name in ((False, "default"), (True, f"GLIBC_TUNABLES={SETTING}")):
        print(f"| {name} | {med(tunable, 'rate'):.1f} | {med(tunable, 'wait') * 1e3:.1f} | "
              f"{med(tunable, 'first') * 1e3:.1f} |")
    print(f"\nbatches/s with huge pages / default: "
          f"{med(True, 'rate') / med(False, 'rate'):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
