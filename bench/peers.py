"""The peers, measured like the dataserver: two epochs, the second timed, every batch checked.

* ``keras-proc`` / ``keras-thread``: the Workload as a Keras 3 ``PyDataset`` (``workers=2``,
  ``use_multiprocessing`` True / False, ``max_queue_size=10``), consumed through Keras' own
  ``PyDatasetAdapter`` as ``fit`` drives it: ``on_epoch_begin()`` (its ``OrderedEnqueuer``
  starts a new pool), ``get_numpy_iterator()`` for the batches, ``on_epoch_end()`` (it drains
  and stops the pool). The numpy iterator is what ``fit`` reads on the JAX and NumPy backends;
  on the torch backend ``fit`` wraps that same iterator in a ``DataLoader(num_workers=0)`` that
  converts to tensors, a per-batch cost of ``fit`` that ``python -m bench --keras`` measures.
* ``torch``: ``torch.utils.data.DataLoader(workload, batch_size=None, num_workers=2,
  persistent_workers=True)`` (default collate: numpy arrays become tensors, shipped to the
  consumer through PyTorch's shared memory); the consumer takes ``tensor.numpy()`` (no copy).

Timing as for the dataserver: epoch 1 gives the time to first batch (here it includes starting
the workers, which these peers do on first use: Keras every epoch, PyTorch once); epoch 2 is
timed from just after epoch 1 ended (``on_epoch_end()`` for Keras) to its last batch consumed;
the stall is from the last batch of epoch 1 to the first of epoch 2.

Worker USS is sampled at the end of epoch 2, except for Keras processes: Keras closes its pool
once the last index is submitted, and its workers exit before the consumer has read the last
``max_queue_size`` batches, so they are sampled just before that point, in epoch 1 (not the
timed epoch: sampling takes a few ms).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterable, Iterator
from time import perf_counter
from typing import Any

from bench import memory
from bench.contenders import PEERS, Epoch, boundary, read_epoch
from bench.workload import Checker, Workload

__all__ = ["PEERS", "SLOW", "available", "measure_keras", "measure_torch"]

#: Peers ~10-100x slower than the dataserver on some workloads: they read fewer batches per
#: epoch (the grid's ``peer_n``) so the whole run stays within ~10 minutes.
SLOW = ("keras-proc", "torch")
WORKERS = 2
KERAS_QUEUE = 10  # Keras' default max_queue_size
KERAS_BACKEND = "torch"


def available(wanted: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Import the frameworks the wanted peers need, up front (so the consumer's RSS has the same
    baseline for every contender). Returns ({peer: why it is skipped}, {framework: version})."""
    skipped: dict[str, str] = {}
    versions: dict[str, str] = {}
    wanted = [p for p in wanted if p in PEERS]
    if not wanted:
        return skipped, versions
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:
        if "torch" in wanted:
            skipped["torch"] = ("PyTorch is not installed (pip install torch==2.13.0, the CPU "
                                "build)")
    if any(p.startswith("keras") for p in wanted):
        os.environ["KERAS_BACKEND"] = KERAS_BACKEND  # before the first import of keras
        why = None
        try:
            import keras
            from keras.src.trainers.data_adapters import py_dataset_adapter  # noqa: F401

            if int(keras.__version__.split(".")[0]) < 3:
                why = f"Keras {keras.__version__} is installed; the peer is Keras 3"
            versions["keras"] = f"{keras.__version__} ({keras.backend.backend()} backend)"
        except ImportError as exc:
            why = (f"Keras 3 with the {KERAS_BACKEND} backend cannot be imported ({exc}); "
                   f"pip install -e '.[bench]' and torch==2.13.0")
        for p in wanted:
            if p.startswith("keras") and why:
                skipped[p] = why
    return skipped, versions


def _probing(batches: Iterable[Any], at: int, probe: Callable[[], None]) -> Iterator[Any]:
    for k, batch in enumerate(batches):
        if k == at:
            probe()
        yield batch


def _result(n: int, nbytes: int, t: dict[str, float], e2: Epoch, mem: dict[str, Any],
            **extra: Any) -> dict[str, Any]:
    seconds = e2.end - t["start2"]
    rate = n / seconds
    return {
        "batches": n, "seconds": seconds, "batches_per_s": rate, "gb_per_s": rate * nbytes / 1e9,
        "workers": WORKERS, "ttfb_s": t["first1"] - t["start1"],
        "ttfb2_s": e2.first - t["start2"], **boundary(t["end1"], e2),
        "epoch1_s": t["end1"] - t["start1"],
        "epoch1_batches_per_s": n / (t["end1"] - t["start1"]),
        "epoch2_after_first_batches_per_s": (n - 1) / (e2.end - e2.first) if n > 1 else None,
        **mem, **extra,
    }


def measure_keras(wl: Workload, check: Checker, use_multiprocessing: bool) -> dict[str, Any]:
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    from bench.keras_fit import keras_dataset

    n, t = len(wl), {}
    before = memory.children()
    seen: dict[str, Any] = {}
    probe_at = max(0, n - KERAS_QUEUE - 3)

    def probe() -> None:
        seen["pids"] = memory.children() - before
        seen.update(memory.sample(seen["pids"]))

    dataset = keras_dataset(wl, WORKERS, use_multiprocessing)  # type: ignore[arg-type]
    dataset.max_queue_size = KERAS_QUEUE
    adapter = PyDatasetAdapter(dataset, shuffle=False)
    try:
        t["start1"] = perf_counter()
        adapter.on_epoch_begin()
        batches = adapter.get_numpy_iterator()
        if use_multiprocessing:
            batches = _probing(batches, probe_at, probe)
        e1 = read_epoch(batches, check, n)
        t["first1"], t["end1"] = e1.first, e1.end
        adapter.on_epoch_end()
        t["start2"] = perf_counter()
        adapter.on_epoch_begin()
        e2 = read_epoch(adapter.get_numpy_iterator(), check, n)
        mem = memory.sample()
        if use_multiprocessing:  # the workers' figures from epoch 1 (see the module docstring)
            mem.update(worker_uss=seen.get("worker_uss"),
                       worker_uss_each=seen.get("worker_uss_each", []),
                       worker_uss_sampled=f"epoch 1, batch {probe_at}")
    finally:
        adapter.on_epoch_end()
        del adapter, dataset
        gc.collect()  # Keras' pool is closed, not joined: its finalizer joins it
        left = memory.wait_gone(memory.children() - before)
    return _result(n, wl.nbytes, t, e2, mem, kind="process" if use_multiprocessing else "thread",
                   **({"left_running": left} if left else {}))


def _as_numpy(loader: Any) -> Iterator[tuple[Any, Any]]:
    for x, y in loader:
        yield x.numpy(), y.numpy()  # views of the tensors' storage: no copy


def measure_torch(wl: Workload, check: Checker) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    n, t = len(wl), {}
    before = memory.children()
    loader = DataLoader(wl, batch_size=None, num_workers=WORKERS, persistent_workers=True)
    try:
        t["start1"] = perf_counter()
        e1 = read_epoch(_as_numpy(loader), check, n)
        t["first1"], t["end1"] = e1.first, e1.end
        t["start2"] = perf_counter()
        e2 = read_epoch(_as_numpy(loader), check, n)
        mem = memory.sample(memory.children() - before)
    finally:
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()  # what its __del__ does; explicit so the next one starts clean
        del loader, it
        gc.collect()
        left = memory.wait_gone(memory.children() - before)
    return _result(n, wl.nbytes, t, e2, mem, **({"left_running": left} if left else {}))
