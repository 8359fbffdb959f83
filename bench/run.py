"""The benchmark driver: grid x repetitions x contenders, interleaved; table, bars, targets,
JSON and a chart.

For each workload, repetition r measures every contender once (the order rotated by r), so
slow drifts on a shared machine hit all contenders alike. Figures are medians over the
repetitions. Everything runs against a private shm directory (``/dev/shm/dsbench-<pid>``) and
a private runtime directory, both removed at the end; what is left in them is reported.
The peers (Keras 3 PyDataset, PyTorch DataLoader) run where their frameworks are installed
(``pip install -e '.[bench]'`` plus torch==2.13.0) and are skipped with a note where not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import chart, memory, report, targets
from bench.contenders import CONTENDERS, EXTRA_EPOCHS, OPTIONAL, RAY, RING_PREFIX, measure
from bench.workload import Checker, Workload

__all__ = ["GRID", "main"]

RESULTS = Path(__file__).resolve().parent / "results"
#: (batch bytes, cpu_us, batches per epoch, batches per epoch for the slow peers): each
#: dataserver epoch ~0.5-2 s on 2 cores; Keras processes (~200/s at 1 MiB, ~6/s at 32 MiB) and
#: PyTorch (~600/s at 4 KiB) read fewer (bench.peers.SLOW) to keep a full run under ~10 min.
GRID: list[tuple[int, int, int, int]] = [
    (4 << 10, 0, 6_000, 2_000),
    (1 << 20, 0, 2_000, 400),
    (32 << 20, 0, 100, 40),
    (4 << 10, 2000, 400, 400),
    (1 << 20, 2000, 400, 400),
]
SLOW = ("keras-proc", "torch")  # bench.peers.SLOW, without importing the frameworks


def _size(text: str) -> int:
    from dataserver.config import parse_size

    return parse_size(text.strip(), "--sizes")


def label(nbytes: int, cpu_us: int) -> str:
    size = f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"
    return f"{size}, cpu {cpu_us} us"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1/20 of the batches, 1 repetition, short baselines")
    p.add_argument("--reps", type=int, help="repetitions (default 3, 1 with --quick)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every batch count")
    p.add_argument("--sizes", help="only these batch sizes, e.g. 4KiB,32MiB")
    p.add_argument("--cpu-us", help="only these cpu_us values, e.g. 0 or 0,2000")
    p.add_argument("--only", help=f"only these contenders, of {','.join(CONTENDERS)} (and, "
                   f"only when named here, {','.join(OPTIONAL)}: --backend ray)")
    p.add_argument("--min-s", type=float,
                   help="least time per inline/ring measurement (default 0.5 s, 0.05 quick)")
    p.add_argument("--keras", action="store_true", help="instead: Keras fit steps/s fed by the "
                   "dataserver vs Keras' own workers (python -m bench.keras_fit --help)")
    p.add_argument("--out", type=Path, help="JSON results (default bench/results/latest.json, "
                   "bench/results/quick.json with --quick)")
    p.add_argument("--chart", type=Path, help="PNG chart (default bench/results/chart.png, "
                   "bench/results/chart_quick.png with --quick)")
    a = p.parse_args(argv)
    a.reps = a.reps or (1 if a.quick else 3)
    a.min_s = a.min_s if a.min_s is not None else (0.05 if a.quick else 0.5)
    a.out = a.out or RESULTS / ("quick.json" if a.quick else "latest.json")
    a.chart = a.chart or RESULTS / ("chart_quick.png" if a.quick else "chart.png")
    if a.quick:
        a.scale /= 20
    a.contenders = [c.strip() for c in a.only.split(",")] if a.only else list(CONTENDERS)
    bad = sorted(set(a.contenders) - set(CONTENDERS) - set(OPTIONAL))
    if bad or a.reps < 1 or a.scale <= 0:
        p.error(f"unknown contenders {bad}" if bad else "--reps and --scale must be positive")
    sizes = {_size(s) for s in a.sizes.split(",")} if a.sizes else None
    cpus = {int(c) for c in a.cpu_us.split(",")} if a.cpu_us else None
    a.grid = [(nb, cpu, max(10, round(n * a.scale)), max(10, round(pn * a.scale)))
              for nb, cpu, n, pn in GRID
              if (sizes is None or nb in sizes) and (cpus is None or cpu in cpus)]
    if not a.grid:
        p.error("--sizes / --cpu-us leave no workload to measure")
    return a


@contextlib.contextmanager
def private_dirs() -> Iterator[tuple[Path, Path]]:
    """A private shm directory and runtime directory for every server of this run."""
    shm = Path(f"/dev/shm/dsbench-{os.getpid()}")
    shm.mkdir(mode=0o700)
    saved = {k: os.environ.get(k) for k in ("DATASERVER_SHM_DIR", "DATASERVER_RUNTIME_DIR")}
    try:
        with tempfile.TemporaryDirectory(prefix="dsbench-") as tmp:
            run_dir = Path(tmp)
            os.environ["DATASERVER_SHM_DIR"] = str(shm)
            os.environ["DATASERVER_RUNTIME_DIR"] = str(run_dir / "rt")
            yield shm, run_dir
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for entry in os.scandir(shm):
            os.unlink(entry.path)
        shm.rmdir()


def run_grid(a: argparse.Namespace, shm: Path, run_dir: Path) -> list[dict[str, Any]]:
    raw: list[dict[str, Any]] = []
    for nbytes, cpu_us, n, peer_n in a.grid:
        wl, check, name = Workload(nbytes, n, cpu_us), Checker(nbytes), label(nbytes, cpu_us)
        slow_wl = Workload(nbytes, peer_n, cpu_us)
        for rep in range(a.reps):
            k = rep % len(a.contenders)
            for contender in a.contenders[k:] + a.contenders[:k]:
                w = slow_wl if contender in SLOW else wl
                r: dict[str, Any] = {"workload": name, "nbytes": nbytes, "cpu_us": cpu_us,
                                     "n": len(w), "contender": contender, "rep": rep + 1}
                t0 = time.perf_counter()
                try:
                    r.update(measure(contender, w, check, min_s=a.min_s, shm_dir=shm,
                                     run_dir=run_dir))
                except Exception as exc:
                    r["error"] = f"{type(exc).__name__}: {exc}"
                    r["traceback"] = traceback.format_exc()
                left = sorted(e.name for e in os.scandir(shm))
                if left:
                    r["left_in_shm"] = left
                    for e in left:
                        os.unlink(shm / e)
                raw.append(r)
                rate = (f"{r['batches_per_s']:,.0f} batches/s, {r['gb_per_s']:.2f} GB/s"
                        if "error" not in r else r["error"])
                extra = (f", first {r['ttfb_s'] * 1e3:.1f} ms, stall {r['stall_s'] * 1e3:.1f} ms "
                         f"(boundary wait {r['boundary_wait_s'] * 1e3:.1f} ms)"
                         if "ttfb_s" in r else "")
                if r.get("left_running"):
                    left = [*left, f"processes {r['left_running']}"]
                print(f"  [{name} | rep {rep + 1}/{a.reps} | {contender:12}] {rate}{extra} "
                      f"({time.perf_counter() - t0:.1f} s){' LEFT ' + str(left) if left else ''}",
                      file=sys.stderr, flush=True)
    return raw


def leftovers(before: set[str]) -> dict[str, Any]:
    import psutil

    def alive(k: psutil.Process) -> bool:
        with contextlib.suppress(psutil.Error):
            return bool(k.is_running() and k.status() != psutil.STATUS_ZOMBIE)
        return False

    def cmd(k: psutil.Process) -> str:
        with contextlib.suppress(psutil.Error):
            return " ".join(k.cmdline())
        return "?"

    # multiprocessing's resource tracker (started by any spawn) lives until this process exits.
    helper = "multiprocessing.resource_tracker"
    kids = [k for k in psutil.Process().children(recursive=True) if helper not in cmd(k)]
    deadline = time.monotonic() + 5
    while kids and time.monotonic() < deadline:
        time.sleep(0.1)
        kids = [k for k in kids if alive(k)]
    new_shm = sorted(set(os.listdir("/dev/shm")) - before)
    ours = [e for e in new_shm if e.startswith(("dsbench-", RING_PREFIX))]
    return {"child_processes": [f"{k.pid} {cmd(k)[:80]}" for k in kids], "new_in_dev_shm": new_shm,
            "ours_in_dev_shm": ours}


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--keras" in args:  # Keras fit steps/s instead: bench/keras_fit.py, with its own options
        from bench import keras_fit

        return keras_fit.main([x for x in args if x != "--keras"])
    a = parse(argv)
    # SIGTERM (a stopped run): unwind, so the servers close and the private directories go
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(128 + signal.SIGTERM))
    before = set(os.listdir("/dev/shm"))
    from bench import peers  # imports the peers' frameworks now, before any measurement

    skipped, versions = peers.available(a.contenders)
    if any(c in RAY for c in a.contenders):
        try:
            import ray

            versions["ray"] = ray.__version__
        except ImportError:
            skipped.update(dict.fromkeys((c for c in a.contenders if c in RAY),
                                         "Ray is not installed (pip install -e '.[ray]')"))
    a.contenders = [c for c in a.contenders if c not in skipped]
    m = report.machine()
    m.update(versions)
    m["consumer_rss_baseline"] = memory.rss()
    print("# dataserver benchmark\n")
    print("\n".join(report.machine_lines(m)))
    if versions:
        print(f"- peers: {', '.join(f'{k} {v}' for k, v in versions.items())}; consumer RSS "
              f"with them imported {m['consumer_rss_baseline'] / 2**20:.0f} MiB")
    for peer, why in skipped.items():
        print(f"- {peer} skipped: {why}")
    print(f"- grid: {', '.join(f'{label(nb, c)} x {n}' for nb, c, n, _ in a.grid)}; "
          f"{a.reps} repetition(s), interleaved; inline/ring >= {a.min_s:g} s each"
          f"{'; --quick' if a.quick else ''}\n", flush=True)
    started = time.time()
    with private_dirs() as (shm, run_dir):
        raw = run_grid(a, shm, run_dir)
    rows = report.medians(raw)
    print("\n".join(report.table(rows, a.reps)))
    bar_lines, verdicts = report.bars(rows)
    print("\n## bars\n")
    print("\n".join(bar_lines))
    target_lines, target_verdicts = targets.evaluate(rows)
    print("\n## targets (issue 7)\n")
    print("\n".join(target_lines))
    scale_lines = targets.scale_out(rows)
    if scale_lines:
        print("\n## scale-out (issue 9): ratios of batches/s\n")
        print("\n".join(scale_lines))
    left = leftovers(before)
    leaked = [r for r in raw if r.get("left_in_shm") or r.get("left_running")]
    errors = [r for r in raw if "error" in r]
    print("\n## notes\n")
    print("\n".join(notes(a, raw, left, leaked, errors)))
    why = chart.write(rows, a.chart, f"dataserver benchmark: batches/s, median of {a.reps}; "
                      f"{m['nproc']} cores, load {m['loadavg_start'][0]:.2f} at start")
    print(f"- chart: {a.chart}" if why is None else f"- chart not drawn: {why}")
    m["loadavg_end"] = list(os.getloadavg())
    doc = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
           "machine": m, "started": started, "seconds": time.time() - started,
           "skipped": skipped, "medians": rows, "bars": verdicts, "targets": target_verdicts,
           "chart": None if why else str(a.chart), "cleanup": left, "raw": raw}
    write_json(a.out, doc)
    print(f"- raw results and medians: {a.out}; load average at end "
          + ", ".join(f"{x:.2f}" for x in m["loadavg_end"]))
    return 1 if errors or leaked or left["child_processes"] or left["ours_in_dev_shm"] else 0


def notes(a: argparse.Namespace, raw: list[dict[str, Any]], left: dict[str, Any],
          leaked: list[dict[str, Any]], errors: list[dict[str, Any]]) -> list[str]:
    out = [
        "- batches/s: dataserver and peers = epoch 2 (timed from just after epoch 1 ended, "
        "on_epoch_end() where there is one, to the last batch consumed, so it includes the "
        "epoch-end stall and, for Keras, starting its pool again); inline/ring = cycling "
        "through the indices for >= the minimum time",
        "- first batch, epoch 1: from iter() (Keras: on_epoch_begin()) to the first batch; the "
        "dataserver was started and connected beforehand, the peers start their workers here. "
        "First batch, epoch 2: the same from just after epoch 1 ended. Boundary wait: last "
        "batch of an epoch consumed -> first batch of the next received; mean wait: the mean "
        "time the next epoch's other batches were waited for; epoch-end stall: the boundary "
        "wait minus the mean wait, what the boundary adds (where the workers are the "
        "bottleneck the consumer waits for every batch, boundary or not). For the dataserver "
        f"these are medians over the boundaries into epochs 2 to {2 + EXTRA_EPOCHS} (one "
        "boundary is one sample of a wait that varies by milliseconds where the workers are "
        "the bottleneck; the worst is in the JSON and the targets), for the peers epoch 2's",
        "- worker USS: median over a contender's worker processes at the end of epoch 2 (the "
        "dataserver's once its workers are idle, like PyTorch's there; they go on making the "
        "next epoch's first batches) "
        "(Keras processes: near the end of epoch 1, as Keras' pool exits early; thread workers: "
        "—); consumer RSS: this process at the same moment",
    ]
    caps = {label(nb, c): pn for nb, c, n, pn in a.grid if pn != n}
    slow = [c for c in SLOW if c in a.contenders]
    if caps and slow:
        out.append(f"- {' and '.join(slow)} read fewer batches per epoch: "
                   + ", ".join(f"{k} {v:,}" for k, v in caps.items()))
    servers = [r["server_uss"] for r in raw if r.get("server_uss")]
    if servers:
        out.append(f"- dataserver server process USS (thread workers live there): median "
                   f"{statistics.median(servers) / 2**20:.0f} MiB")
    out.append(f"- cleanup: child processes left {left['child_processes'] or 'none'}; our files "
               f"left in /dev/shm {left['ours_in_dev_shm'] or 'none'}; segments or processes "
               f"left by a finished measurement {len(leaked) or 'none'}")
    if left["new_in_dev_shm"] != left["ours_in_dev_shm"]:
        out.append(f"- (new in /dev/shm, not ours: {left['new_in_dev_shm']})")
    if errors:
        out.append(f"- {len(errors)} measurement(s) FAILED; first: {errors[0]['error']}")
    return out
