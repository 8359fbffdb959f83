"""Machine description, medians, the markdown table and the issue's bars."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from typing import Any

import numpy as np

__all__ = ["bars", "machine", "medians", "table"]

LABELS = {"inline": "inline", "ring": "one-copy ring", "process": "dataserver process",
          "thread": "dataserver thread", "zerocopy": "dataserver zero-copy",
          "frames": "dataserver frames", "ray": "dataserver Ray actors (shm)",
          "ray-frames": "dataserver Ray actors (frames over TCP)",
          "keras-proc": "Keras PyDataset processes", "keras-thread": "Keras PyDataset threads",
          "torch": "PyTorch DataLoader"}
FIGURES = ("batches_per_s", "gb_per_s", "ttfb_s", "ttfb2_s", "stall_s", "ttfb2_worst_s",
           "stall_worst_s",
           "boundary_wait_s", "mean_wait_s", "startup_s", "connect_s",
           "epoch1_batches_per_s", "epoch2_after_first_batches_per_s", "worker_uss",
           "consumer_rss", "server_uss")
MIB = 1 / 2**20
BAR_GB_RATIO = 0.6
BAR_SMALL_RATE = 15_000
BAR_TTFB_S = 0.5


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_head() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, Any]:
    import psutil
    import zmq

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    try:
        st = os.statvfs("/dev/shm")
        shm_gib = round(st.f_blocks * st.f_frsize / 2**30, 1)
    except OSError:
        shm_gib = None
    return {
        "nproc": usable, "cpu_count": os.cpu_count(), "cpu_model": _cpu_model(),
        "python": sys.version.split()[0], "numpy": np.__version__, "pyzmq": zmq.__version__,
        "platform": platform.platform(), "mem_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "dev_shm_gib": shm_gib, "loadavg_start": list(os.getloadavg()), "git": _git_head(),
    }


def machine_lines(m: dict[str, Any]) -> list[str]:
    load = ", ".join(f"{x:.2f}" for x in m["loadavg_start"])
    return [
        f"- machine: nproc {m['nproc']} ({m['cpu_count']} online), {m['cpu_model']}, "
        f"{m['mem_gib']} GiB RAM, /dev/shm {m['dev_shm_gib']} GiB",
        f"- python {m['python']}, numpy {m['numpy']}, pyzmq {m['pyzmq']}, {m['platform']}",
        f"- dataserver at git {m['git']}; load average at start {load}",
    ]


def group_medians(raw: list[dict[str, Any]], figures: tuple[str, ...],
                  keep: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """One row per (workload, contender): the median of each of ``figures`` over the
    repetitions that did not fail (and the values in ``<figure>_all``); ``keep`` copies fields
    of the first repetition."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in raw:
        groups.setdefault((r["workload"], r["contender"]), []).append(r)
    rows = []
    for (wl, contender), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        row: dict[str, Any] = {"workload": wl, "contender": contender,
                               **{k: rs[0].get(k) for k in keep}, "reps": len(ok),
                               "errors": [r["error"] for r in rs if "error" in r]}
        for f in figures:
            vals = [r[f] for r in ok if r.get(f) is not None]
            row[f] = statistics.median(vals) if vals else None
            row[f"{f}_all"] = vals
        rows.append(row)
    return rows


def medians(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (workload, contender): the median of each figure over the repetitions."""
    rows = group_medians(raw, FIGURES, keep=("nbytes", "cpu_us", "n"))
    for row in rows:
        vals = row["batches_per_s_all"]
        if vals:
            row["batches_per_s_min"], row["batches_per_s_max"] = min(vals), max(vals)
    rate = {(r["workload"], r["contender"]): r["batches_per_s"] for r in rows}
    for r in rows:
        for base, key in (("inline", "vs_inline"), ("ring", "vs_ring")):
            b = rate.get((r["workload"], base))
            r[key] = r["batches_per_s"] / b if b and r["batches_per_s"] else None
    return rows


def _f(v: float | None, fmt: str, scale: float = 1.0, suffix: str = "") -> str:
    return "—" if v is None else f"{v * scale:{fmt}}{suffix}"


def _waits(r: dict[str, Any]) -> str:
    if r.get("boundary_wait_s") is None:
        return "—"
    return f"{r['boundary_wait_s'] * 1e3:.2f} / {r['mean_wait_s'] * 1e3:.2f}"


def table(rows: list[dict[str, Any]], reps: int) -> list[str]:
    out = [
        f"| workload (batch, cpu) | contender | batches/s (median of {reps}) | GB/s "
        "| vs inline | vs one-copy ring | first batch, epoch 1 (ms) | first batch, epoch 2 (ms) "
        "| epoch-end stall (ms) | boundary wait / mean wait (ms) | worker USS (MiB) "
        "| consumer RSS (MiB) |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        if r["batches_per_s"] is None:
            rate = "error: " + (r["errors"][0].splitlines()[0][:60] if r["errors"] else "?")
        else:
            rate = f"{r['batches_per_s']:,.0f}"
            if r["errors"]:
                rate += f" ({len(r['errors'])} failed)"
        out.append(
            f"| {r['workload']} | {LABELS.get(r['contender'], r['contender'])} | {rate} "
            f"| {_f(r['gb_per_s'], '.2f')} | {_f(r['vs_inline'], '.2f', suffix='x')} "
            f"| {_f(r['vs_ring'], '.2f', suffix='x')} | {_f(r['ttfb_s'], '.1f', 1e3)} "
            f"| {_f(r['ttfb2_s'], '.2f', 1e3)} | {_f(r['stall_s'], '.2f', 1e3)} "
            f"| {_waits(r)} "
            f"| {_f(r['worker_uss'], '.0f', MIB)} | {_f(r['consumer_rss'], '.0f', MIB)} |"
        )
    return out


def _row(rows: list[dict[str, Any]], nbytes: int, cpu_us: float, contender: str) -> Any:
    for r in rows:
        if (r["nbytes"], r["cpu_us"], r["contender"]) == (nbytes, cpu_us, contender):
            return r if r["batches_per_s"] is not None else None
    return None


def bars(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    lines, verdicts = [], {}
    proc, ring = _row(rows, 32 << 20, 0, "process"), _row(rows, 32 << 20, 0, "ring")
    if proc and ring:
        need = BAR_GB_RATIO * ring["gb_per_s"]
        ok = proc["gb_per_s"] >= need
        verdicts["a"] = ok
        lines.append(f"- (a) 32 MiB, cpu 0: dataserver process {proc['gb_per_s']:.2f} GB/s vs "
                     f">= {BAR_GB_RATIO} x one-copy ring {ring['gb_per_s']:.2f} = {need:.2f} GB/s "
                     f"({proc['gb_per_s'] / ring['gb_per_s']:.2f}x): {'PASS' if ok else 'MISS'}")
    else:
        lines.append("- (a) 32 MiB, cpu 0, process vs ring: not measured")
    small = _row(rows, 4 << 10, 0, "process")
    if small:
        ok = small["batches_per_s"] >= BAR_SMALL_RATE
        verdicts["b"] = ok
        lines.append(f"- (b) 4 KiB, cpu 0: dataserver process {small['batches_per_s']:,.0f} "
                     f"batches/s vs >= {BAR_SMALL_RATE:,}: {'PASS' if ok else 'MISS'}")
    else:
        lines.append("- (b) 4 KiB, cpu 0, process: not measured")
    firsts = [(r["ttfb_s"], r) for r in rows
              if r["contender"] in ("process", "thread") and r["ttfb_s"] is not None]
    if firsts:
        worst, wr = max(firsts, key=lambda t: t[0])
        ok = worst < BAR_TTFB_S
        verdicts["c"] = ok
        lines.append(f"- (c) time to first batch well under a second (bar here: < "
                     f"{BAR_TTFB_S * 1e3:.0f} ms): worst median {worst * 1e3:.1f} ms "
                     f"({LABELS[wr['contender']]}, {wr['workload']}): "
                     f"{'PASS' if ok else 'MISS'}")
        starts = {c: [r["startup_s"] for r in rows if r["contender"] == c and r["startup_s"]]
                  for c in ("process", "thread")}
        lines.append("  (server start-up, outside the timed region: median "
                     + ", ".join(f"{c} {statistics.median(v) * 1e3:.0f} ms"
                                 for c, v in starts.items() if v) + ")")
    else:
        lines.append("- (c) time to first batch: not measured")
    return lines, verdicts
