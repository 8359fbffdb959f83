"""Issue 7's targets, evaluated as ratios of figures measured in the same run.

Each target prints one line with both figures, the ratio, the bound and PASS or MISS; a target
whose figures were not measured (a contender skipped or failed) says so and has no verdict.
"""

from __future__ import annotations

from typing import Any

from bench.contenders import DATASERVER, PEERS
from bench.report import LABELS, MIB

__all__ = ["evaluate", "scale_out"]

KIB4, MIB1, MIB32 = 4 << 10, 1 << 20, 32 << 20
#: (batch bytes, cpu_us, contender, baseline, least ratio); baseline "best peer" is the fastest
#: of the peers measured on that workload.
RATIOS: list[tuple[int, int, str, str, float]] = [
    (KIB4, 0, "process", "keras-thread", 2.0),
    (KIB4, 0, "process", "torch", 20.0),
    (MIB1, 0, "process", "ring", 0.6),
    (MIB32, 0, "process", "ring", 0.8),
    (MIB32, 0, "process", "torch", 2.5),
    (MIB32, 0, "zerocopy", "keras-thread", 1.0),
    (KIB4, 2000, "process", "inline", 1.6),
    (KIB4, 2000, "process", "best peer", 1.4),
    (MIB1, 2000, "process", "inline", 1.6),
    (MIB1, 2000, "process", "best peer", 1.4),
]
#: From epoch 2 on: the first batch within this long of the epoch starting ...
TTFB2_MAX_S = 5e-3
#: ... and no end-of-epoch stall over this.
STALL_MAX_S = 1e-3


def _size(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= MIB1 else f"{nbytes >> 10} KiB"


def _ok(rows: list[dict[str, Any]], nbytes: int, cpu_us: int, contender: str) -> Any:
    for r in rows:
        if (r["nbytes"], r["cpu_us"], r["contender"]) == (nbytes, cpu_us, contender):
            return r if r["batches_per_s"] is not None else None
    return None


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _ratios(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    lines, out = [], {}
    for nbytes, cpu, who, base, need in RATIOS:
        key = f"{_size(nbytes)} cpu {cpu}: {who} >= {need:g}x {base}"
        a = _ok(rows, nbytes, cpu, who)
        if base == "best peer":
            peers = [r for r in (_ok(rows, nbytes, cpu, p) for p in PEERS) if r]
            b = max(peers, key=lambda r: r["batches_per_s"]) if peers else None
        else:
            b = _ok(rows, nbytes, cpu, base)
        if not (a and b):
            lines.append(f"- {key}: not measured")
            continue
        ratio = a["batches_per_s"] / b["batches_per_s"]
        out[key] = {"ratio": ratio, "need": need, "pass": ratio >= need,
                    "value": a["batches_per_s"], "baseline": b["batches_per_s"],
                    "baseline_contender": b["contender"]}
        named = (f"best peer ({LABELS[b['contender']]})" if base == "best peer"
                 else LABELS[base])
        lines.append(f"- {_size(nbytes)}, cpu {cpu}: {LABELS[who]} {a['batches_per_s']:,.1f} vs "
                     f"{named} {b['batches_per_s']:,.1f} batches/s = {ratio:.2f}x "
                     f"(target >= {need:g}x): {_verdict(ratio >= need)}")
    return lines, out


def _epoch2(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    lines, out = [], {}
    for who in DATASERVER:
        for fig, bound, what in (("ttfb2_s", TTFB2_MAX_S, "first batch of epoch 2"),
                                 ("stall_s", STALL_MAX_S, "end-of-epoch stall")):
            got = [(r[fig], r) for r in rows if r["contender"] == who and r.get(fig) is not None]
            if not got:
                continue
            worst, wr = max(got, key=lambda t: t[0])
            ok = worst <= bound
            single = wr.get(fig.replace("_s", "_worst_s"))
            out[f"{who} {what} <= {bound * 1e3:g} ms"] = {
                "worst_s": worst, "workload": wr["workload"], "pass": ok,
                "each_s": {r["workload"]: v for v, r in got}, "worst_single_boundary_s": single}
            how = (f"boundary wait {wr['boundary_wait_s'] * 1e3:.2f} ms minus mean wait "
                   f"{wr['mean_wait_s'] * 1e3:.2f} ms; " if fig == "stall_s" else "")
            how += f"worst single boundary {single * 1e3:.2f} ms; " if single is not None else ""
            lines.append(f"- {LABELS[who]}, {what}: worst median {worst * 1e3:.2f} ms "
                         f"({wr['workload']}: {how}bound {bound * 1e3:g} ms; all: "
                         + ", ".join(f"{v * 1e3:.2f}" for v, _ in got)
                         + f"): {_verdict(ok)}")
    return lines, out


def _uss(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    pairs = []
    for r in rows:
        if r["contender"] != "process" or r.get("worker_uss") is None:
            continue
        t = _ok(rows, r["nbytes"], r["cpu_us"], "torch")
        if t and t.get("worker_uss"):
            pairs.append((r["worker_uss"] / t["worker_uss"], r, t))
    if not pairs:
        return ["- worker USS <= PyTorch DataLoader worker USS: not measured"], {}
    ratio, r, t = max(pairs, key=lambda p: p[0])
    ok = ratio <= 1.0
    each = ", ".join(f"{p[1]['workload']} {p[1]['worker_uss'] * MIB:.0f}/"
                     f"{p[2]['worker_uss'] * MIB:.0f}" for p in pairs)
    return [f"- worker USS, dataserver process <= PyTorch DataLoader: worst {ratio:.2f}x "
            f"({r['workload']}: {r['worker_uss'] * MIB:.0f} vs {t['worker_uss'] * MIB:.0f} MiB; "
            f"each, MiB: {each}): {_verdict(ok)}"], {
        "worker USS process <= torch": {"worst_ratio": ratio, "workload": r["workload"],
                                        "pass": ok}}


def evaluate(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """The targets section's lines and a {target: figures and verdict} dict for the JSON."""
    lines: list[str] = []
    verdicts: dict[str, Any] = {}
    for part in (_ratios, _epoch2, _uss):
        more, v = part(rows)
        lines += more
        verdicts.update(v)
    passed = sum(1 for v in verdicts.values() if v["pass"])
    lines.append(f"- {passed} of {len(verdicts)} measured targets PASS")
    return lines, verdicts


#: Issue 9's comparisons (no bound is set; the README explains the overheads): each pair is
#: (contender, baseline) on every workload where both were measured.
SCALE_OUT = [("frames", "process"), ("ray", "process"), ("ray-frames", "frames"),
             ("ray-frames", "process")]


def scale_out(rows: list[dict[str, Any]]) -> list[str]:
    """One line per workload and pair, e.g. ``4 KiB cpu 0: ray / process = 0.93x``."""
    lines = []
    for nbytes, cpu in sorted({(r["nbytes"], r["cpu_us"]) for r in rows}):
        for who, base in SCALE_OUT:
            a, b = _ok(rows, nbytes, cpu, who), _ok(rows, nbytes, cpu, base)
            if a and b:
                lines.append(f"- {_size(nbytes)} cpu {cpu}: {who} / {base} = "
                             f"{a['batches_per_s'] / b['batches_per_s']:.2f}x "
                             f"({a['batches_per_s']:,.0f} vs {b['batches_per_s']:,.0f} batches/s)")
    return lines
