"""Several consumers on one dataset: is the work done once? (``python -m bench.consumers``)

Issue 3's benchmark. Two measurements, each a lone consumer and then N consumer processes
reading the same epochs, repeated and interleaved, medians:

* **work**: a CPU-heavy Sequence (``--cpu-us`` of GIL-holding Python per batch): the workers'
  CPU time for N consumers over that of one (the bar: at most 1.3x; the work is not repeated);
* **throughput**: a cheap Sequence (4 KiB, cpu 0, workers not the bottleneck): each consumer's
  batches/s among N over a lone consumer's (the bar: at least 0.8x). Measured twice: with
  consumers that only read (checksum) each batch, so the data path itself is what they wait
  for, and with consumers that also take a ``--step-ms`` training step per batch (a sleep: the
  host thread of a trainer waiting on its accelerator), as trainers do.

On a machine with fewer cores than consumers + server + workers, the read-only consumers share
the cores, so their ratio measures the CPU they and the server spend per delivery rather than
anything the workers do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.workload import Workload
from dataserver import DataServer
from dataserver.status import fetch_status

CONSUMER = """
import sys, time
from dataserver.client import RemoteSequence
endpoint, epochs, step_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with RemoteSequence(endpoint, timeout=60) as seq:
    n = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x, y in seq:
            x.sum()
            if step_s:
                time.sleep(step_s)
            n += 1
        seq.on_epoch_end()
    print(n / (time.perf_counter() - t0))
"""


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def run_consumers(endpoint: str, count: int, epochs: int, step_s: float = 0.0) -> list[float]:
    procs = [subprocess.Popen([sys.executable, "-c", CONSUMER, endpoint, str(epochs),
                               str(step_s)],
                              stdout=subprocess.PIPE, text=True) for _ in range(count)]
    rates = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        if p.returncode:
            raise SystemExit(f"a consumer failed with exit code {p.returncode}")
        rates.append(float(out.strip()))
    return rates


def measure(wl: Workload, consumers: int, epochs: int, run_dir: Path,
            step_s: float = 0.0) -> dict[str, Any]:
    """One server; the workers' CPU seconds and each consumer's batches/s."""
    endpoint = f"ipc://{run_dir}/consumers-{consumers}-{time.monotonic_ns()}.sock"
    with DataServer(wl, workers=2, endpoint=endpoint, slots=2 * len(wl) + 16) as server:
        workers = [psutil.Process(w["pid"]) for w in fetch_status(server.endpoint)["workers"]]
        before = _cpu(workers)
        rates = run_consumers(endpoint, consumers, epochs, step_s)
        return {"worker_cpu_s": _cpu(workers) - before, "rates": rates}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.consumers", description=__doc__)
    p.add_argument("--consumers", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cpu-us", type=float, default=2000)
    p.add_argument("--batches", type=int, default=150)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--step-ms", type=float, default=2.0,
                   help="the training step of the second throughput measurement")
    a = p.parse_args()
    heavy = Workload(4096, a.batches, a.cpu_us)
    cheap = Workload(4096, 20 * a.batches, 0)
    stepped = Workload(4096, 2 * a.batches, 0)
    step_s = a.step_ms / 1e3
    results: dict[str, list[Any]] = {"work_1": [], "work_n": [], "rate_1": [], "rate_n": [],
                                     "step_1": [], "step_n": []}
    with tempfile.TemporaryDirectory(prefix="dsbench-", dir="/tmp") as tmp:
        run_dir = Path(tmp)
        for rep in range(a.reps):
            print(f"rep {rep + 1}/{a.reps}", file=sys.stderr, flush=True)
            results["work_1"].append(measure(heavy, 1, a.epochs, run_dir)["worker_cpu_s"])
            results["work_n"].append(
                measure(heavy, a.consumers, a.epochs, run_dir)["worker_cpu_s"])
            results["rate_1"].append(measure(cheap, 1, a.epochs, run_dir)["rates"][0])
            results["rate_n"].append(
                statistics.median(measure(cheap, a.consumers, a.epochs, run_dir)["rates"]))
            results["step_1"].append(measure(stepped, 1, a.epochs, run_dir, step_s)["rates"][0])
            results["step_n"].append(statistics.median(
                measure(stepped, a.consumers, a.epochs, run_dir, step_s)["rates"]))
    med = {k: statistics.median(v) for k, v in results.items()}
    work = med["work_n"] / med["work_1"]
    rate = med["rate_n"] / med["rate_1"]
    step = med["step_n"] / med["step_1"]
    n = a.consumers
    print(f"## {n} consumers on one dataset (2 workers, medians of {a.reps})\n")
    print("| measurement | 1 consumer | " + f"{n} consumers | ratio | bar |")
    print("|---|--:|--:|--:|---|")
    print(f"| worker CPU s, {a.batches} batches x {a.epochs} epochs, cpu {a.cpu_us:g} us | "
          f"{med['work_1']:.2f} | {med['work_n']:.2f} | {work:.2f}x | <= 1.3x: "
          f"{'PASS' if work <= 1.3 else 'MISS'} |")
    print(f"| batches/s per consumer, 4 KiB, cpu 0 | {med['rate_1']:,.0f} | "
          f"{med['rate_n']:,.0f} | {rate:.2f}x | >= 0.8x: {'PASS' if rate >= 0.8 else 'MISS'} |")
    print(f"| batches/s per consumer, 4 KiB, cpu 0, {a.step_ms:g} ms step per batch | "
          f"{med['step_1']:,.0f} | {med['step_n']:,.0f} | {step:.2f}x | >= 0.8x: "
          f"{'PASS' if step >= 0.8 else 'MISS'} |")
    out = Path(__file__).parent / "results" / "consumers.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"raw": results, "medians": med, "work_ratio": work,
                               "rate_ratio": rate, "step_ratio": step, "step_ms": a.step_ms,
                               "consumers": n}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
