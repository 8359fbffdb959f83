"""Keras 3 ``model.fit`` steps/s on a trivial model, fed three ways, side by side in one run:

* ``dataserver``: a DataServer with 2 process workers, read through ``RemoteSequence.as_keras()``
  (no Keras pool: ``workers=1, use_multiprocessing=False``); server start-up is outside the
  timed region (it happens once, not per epoch) and reported on its own.
* ``keras processes``: the same Sequence as a ``keras.utils.PyDataset`` with ``workers=2,
  use_multiprocessing=True``: Keras' own ``OrderedEnqueuer`` and process pool.
* ``keras inline``: the same PyDataset with ``workers=1``: the Sequence runs in the training
  thread (no parallelism; the reference for Keras' own per-step cost).

The model is ``Dense(1)`` over the features (SGD, mse) on the torch backend (unless
``KERAS_BACKEND`` says otherwise). Each measurement builds a new model and runs
``fit(epochs=E, shuffle=False)``; epoch 1 (tracing, warm-up, the dataserver's first batches) is
not timed: steps/s is over epochs 2..E, from the first of them beginning to the last ending, so
it includes whatever Keras does at epoch boundaries (it rebuilds its pool every epoch). "first
step" is the median time from an epoch's start to its first step's end, epochs 2..E.
Contenders run interleaved, the order rotated each repetition; figures are medians.
Batch contents are not checked here (Keras consumes them); ``python -m bench`` checks them.

Run: ``python -m bench.keras_fit [--quick]`` or ``python -m bench --keras [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

from bench.workload import FILL_MOD, burn

__all__ = ["CONTENDERS", "FitWorkload", "main"]

CONTENDERS = ("dataserver", "keras-processes", "keras-inline")
LABELS = {"dataserver": "dataserver (2 process workers) via as_keras()",
          "keras-processes": "Keras PyDataset, workers=2, use_multiprocessing=True",
          "keras-inline": "Keras PyDataset, workers=1 (in the training thread)"}
WORKERS = 2
#: (rows, features, cpu_us, steps per epoch): 4 KiB and 1 MiB float32 batches, with and without
#: 2 ms of GIL-holding Python per batch.
GRID: list[tuple[int, int, int, int]] = [
    (32, 32, 0, 400),
    (32, 32, 2000, 200),
    (256, 1024, 0, 200),
    (256, 1024, 2000, 150),
]
RESULTS = Path(__file__).resolve().parent / "results"


class FitWorkload:
    """A Keras-style Sequence for ``fit``: batch i is ``x`` (rows, features) float32 filled with
    ``i % 251`` (freshly allocated) and ``y`` (rows, 1) float32, after ``cpu_us`` of Python."""

    def __init__(self, n: int, rows: int, features: int, cpu_us: float = 0.0) -> None:
        self.n, self.rows, self.features, self.cpu_us = n, rows, features, cpu_us

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        if self.cpu_us:
            burn(self.cpu_us)
        x = np.empty((self.rows, self.features), np.float32)
        x.fill(i % FILL_MOD)
        return x, np.full((self.rows, 1), i % FILL_MOD, np.float32)

    @property
    def nbytes(self) -> int:
        return self.rows * self.features * 4


_pydataset_class: Any = None


def keras_dataset(wl: FitWorkload, workers: int, use_multiprocessing: bool) -> Any:
    """``wl`` as a ``keras.utils.PyDataset`` with Keras' own parallelism settings. Picklable
    (through this function), so it also works where Keras' pool spawns instead of forking."""
    global _pydataset_class
    if _pydataset_class is None:
        import keras

        class KerasWorkload(keras.utils.PyDataset):  # type: ignore[misc]
            def __init__(self, wl: FitWorkload, workers: int, use_mp: bool) -> None:
                super().__init__(workers=workers, use_multiprocessing=use_mp,
                                 max_queue_size=10)
                self.wl = wl

            def __len__(self) -> int:
                return len(self.wl)

            def __getitem__(self, i: int) -> Any:
                return self.wl[i]

            def __reduce__(self) -> Any:
                return keras_dataset, (self.wl, self.workers, self.use_multiprocessing)

        _pydataset_class = KerasWorkload
    return _pydataset_class(wl, workers, use_multiprocessing)


def _model(keras: Any, features: int) -> Any:
    model = keras.Sequential([keras.Input((features,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(1e-6), loss="mse")
    return model


def _timer(keras: Any) -> Any:
    class StepTimer(keras.callbacks.Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.begin: list[float] = []
            self.first: list[float] = []
            self.end: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.begin.append(perf_counter())

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if batch == 0:
                self.first.append(perf_counter())

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.end.append(perf_counter())

    return StepTimer()


def measure(contender: str, wl: FitWorkload, epochs: int, run_dir: Path,
            serial: int) -> dict[str, Any]:
    import keras

    model, timer = _model(keras, wl.features), _timer(keras)
    extra: dict[str, Any] = {}
    fit = {"epochs": epochs, "shuffle": False, "verbose": 0, "callbacks": [timer]}
    if contender == "dataserver":
        from dataserver import DataServer
        from dataserver.client import RemoteSequence

        t0 = perf_counter()
        with DataServer(wl, workers=WORKERS, endpoint=f"ipc://{run_dir}/kf-{serial}.sock") as s:
            extra["startup_s"] = perf_counter() - t0
            with RemoteSequence(s.endpoint, timeout=60) as rs:
                model.fit(rs.as_keras(), **fit)
    elif contender == "keras-processes":
        model.fit(keras_dataset(wl, WORKERS, True), **fit)
    elif contender == "keras-inline":
        model.fit(keras_dataset(wl, 1, False), **fit)
    else:
        raise ValueError(f"unknown contender {contender!r}; known: {', '.join(CONTENDERS)}")
    if len(timer.begin) != epochs or len(timer.end) != epochs or len(timer.first) != epochs:
        raise RuntimeError(f"fit ran {len(timer.end)} of {epochs} epochs")
    timed = timer.end[-1] - timer.begin[1]
    return {"steps": len(wl) * (epochs - 1), "seconds": timed,
            "steps_per_s": len(wl) * (epochs - 1) / timed,
            "epoch1_s": timer.end[0] - timer.begin[0],
            "first_step_s": statistics.median(
                f - b for b, f in zip(timer.begin[1:], timer.first[1:], strict=True)),
            **extra}


def label(rows: int, features: int, cpu_us: int) -> str:
    nbytes = rows * features * 4
    size = f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"
    return f"{size} ({rows}x{features}), cpu {cpu_us} us"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.keras_fit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: 1 repetition, few steps")
    p.add_argument("--reps", type=int, help="repetitions (default 3, 1 with --quick)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per fit, the first untimed")
    p.add_argument("--only", help=f"only these contenders, of {','.join(CONTENDERS)}")
    p.add_argument("--out", type=Path, help="JSON results (default "
                   "bench/results/keras_fit.json, keras_fit_quick.json with --quick)")
    a = p.parse_args(argv)
    a.reps = a.reps or (1 if a.quick else 3)
    a.out = a.out or RESULTS / ("keras_fit_quick.json" if a.quick else "keras_fit.json")
    a.contenders = [c.strip() for c in a.only.split(",")] if a.only else list(CONTENDERS)
    bad = sorted(set(a.contenders) - set(CONTENDERS))
    if bad or a.reps < 1 or a.epochs < 2:
        p.error(f"unknown contenders {bad}" if bad else "--reps >= 1 and --epochs >= 2")
    a.grid = [(r, f, c, max(10, n // 8) if a.quick else n) for r, f, c, n in GRID]
    return a


def table(rows: list[dict[str, Any]], reps: int) -> list[str]:
    out = [f"| workload | feeder | fit steps/s (median of {reps}) | vs Keras processes "
           "| first step of an epoch (ms) | epoch 1 (s) |", "|---|---|--:|--:|--:|--:|"]
    base = {r["workload"]: r["steps_per_s"] for r in rows if r["contender"] == "keras-processes"}
    for r in rows:
        if r["steps_per_s"] is None:
            out.append(f"| {r['workload']} | {LABELS[r['contender']]} | error: "
                       f"{r['errors'][0].splitlines()[0][:60]} | | | |")
            continue
        b = base.get(r["workload"])
        ratio = f"{r['steps_per_s'] / b:.2f}x" if b else "—"
        out.append(f"| {r['workload']} | {LABELS[r['contender']]} | {r['steps_per_s']:,.0f} "
                   f"| {ratio} | {r['first_step_s'] * 1e3:.1f} | {r['epoch1_s']:.2f} |")
    return out


def medians(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from bench.report import group_medians

    return group_medians(raw, ("steps_per_s", "first_step_s", "epoch1_s", "startup_s"))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    a = parse(argv)
    try:
        import keras
    except ImportError:
        print("Keras 3 is not installed: pip install 'keras>=3' (and torch==2.13.0 for the "
              "torch backend)", file=sys.stderr)
        return 2
    from bench import report
    from bench.run import private_dirs, write_json

    m = report.machine()
    m["keras"], m["keras_backend"] = keras.__version__, keras.backend.backend()
    print("# Keras fit fed by the dataserver vs Keras' own workers\n")
    print("\n".join(report.machine_lines(m)))
    print(f"- keras {m['keras']} ({m['keras_backend']} backend); {a.epochs} epochs per fit "
          f"(epoch 1 untimed); {a.reps} repetition(s), interleaved\n", flush=True)
    raw: list[dict[str, Any]] = []
    started = time.time()
    serial = 0
    with private_dirs() as (_shm, run_dir):
        for rows, features, cpu_us, n in a.grid:
            wl, name = FitWorkload(n, rows, features, cpu_us), label(rows, features, cpu_us)
            for rep in range(a.reps):
                k = rep % len(a.contenders)
                for contender in a.contenders[k:] + a.contenders[:k]:
                    serial += 1
                    r: dict[str, Any] = {"workload": name, "contender": contender,
                                         "rep": rep + 1, "steps_per_epoch": n}
                    try:
                        r.update(measure(contender, wl, a.epochs, run_dir, serial))
                    except Exception as exc:
                        r["error"] = f"{type(exc).__name__}: {exc}"
                        r["traceback"] = traceback.format_exc()
                    raw.append(r)
                    shown = (f"{r['steps_per_s']:,.0f} steps/s, first step "
                             f"{r['first_step_s'] * 1e3:.1f} ms" if "error" not in r
                             else r["error"])
                    print(f"  [{name} | rep {rep + 1}/{a.reps} | {contender:15}] {shown}",
                          file=sys.stderr, flush=True)
    rows = medians(raw)
    print("\n".join(table(rows, a.reps)))
    starts = [r["startup_s"] for r in rows if r.get("startup_s")]
    if starts:
        print(f"\n- dataserver start-up (once, outside the timed region): median "
              f"{statistics.median(starts) * 1e3:.0f} ms")
    m["loadavg_end"] = list(os.getloadavg())
    write_json(a.out, {"args": {k: (str(v) if isinstance(v, Path) else v)
                                for k, v in vars(a).items()},
                       "machine": m, "started": started, "seconds": time.time() - started,
                       "medians": rows, "raw": raw})
    print(f"- raw results and medians: {a.out}")
    return 1 if any("error" in r for r in raw) else 0


if __name__ == "__main__":
    sys.exit(main())
