"""The PNG chart: batches/s by contender, one group of bars per workload, log scale.

Bars are the medians; the thin lines on them span the repetitions' minimum to maximum.
Needs matplotlib (``pip install -e '.[bench]'``); :func:`write` says why when it cannot draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report import LABELS

__all__ = ["write"]

#: dataserver in blues, the in-process baselines in greys, the peers in warm colours.
COLOURS = {"inline": "#9e9e9e", "ring": "#616161", "process": "#1565c0", "thread": "#42a5f5",
           "zerocopy": "#0d47a1", "frames": "#7986cb", "keras-proc": "#e65100",
           "keras-thread": "#ffa726", "torch": "#c62828"}


def write(rows: list[dict[str, Any]], path: Path, title: str) -> str | None:
    """Draw ``rows`` (report.medians) to ``path``; return None, or why nothing was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    contenders = [c for c in COLOURS if any(r["contender"] == c for r in rows)]
    contenders += sorted({r["contender"] for r in rows} - set(contenders))
    rate = {(r["workload"], r["contender"]): r for r in rows if r["batches_per_s"]}
    width = 0.85 / max(1, len(contenders))
    fig, ax = plt.subplots(figsize=(max(8.0, 2.2 * len(workloads)), 5.8), dpi=110)
    for k, c in enumerate(contenders):
        xs, ys, lo, hi = [], [], [], []
        for g, wl in enumerate(workloads):
            r = rate.get((wl, c))
            if r is None:
                continue
            xs.append(g - 0.425 + width * (k + 0.5))
            ys.append(r["batches_per_s"])
            lo.append(r["batches_per_s"] - r.get("batches_per_s_min", r["batches_per_s"]))
            hi.append(r.get("batches_per_s_max", r["batches_per_s"]) - r["batches_per_s"])
        ax.bar(xs, ys, width, label=LABELS.get(c, c), color=COLOURS.get(c),
               yerr=[lo, hi], error_kw={"elinewidth": 0.8, "capsize": 0, "ecolor": "black"})
    ax.set_yscale("log")
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels([w.replace(", cpu ", "\ncpu ") for w in workloads])
    ax.set_ylabel("batches/s (median; log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", which="major", alpha=0.4)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return None
