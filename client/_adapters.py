"""RemoteSequence inside the frameworks' own loops: Keras ``fit``/``evaluate``/``predict`` and
PyTorch. Reached through :meth:`RemoteSequence.as_keras` and :meth:`RemoteSequence.as_torch`;
this module is imported only then, and imports a framework only when its adapter is asked for,
so the client keeps working with none of them installed.

Keras 3 (any backend)::

    train = RemoteSequence("ipc:///tmp/train.sock").as_keras()
    val = RemoteSequence("ipc:///tmp/val.sock").as_keras()
    model.fit(train, validation_data=val, epochs=10, shuffle=False)
    model.predict(RemoteSequence("ipc:///tmp/test.sock").as_keras())  # rows in index order

* The adapter is a ``keras.utils.PyDataset`` made with ``workers=1, use_multiprocessing=False``:
  with those, Keras' ``PyDatasetAdapter`` builds no ``OrderedEnqueuer`` (no thread or process
  pool, no per-epoch pool rebuild) and calls ``adapter[i]`` in the training loop itself. The
  server's workers do the work; ``adapter[i]`` is ``rs.at(i)``, served from the prefetched
  stream when Keras asks in order (server-side ``--shuffle`` applies).
* Pass ``shuffle=False`` to ``fit`` and shuffle on the server (``--shuffle``). ``fit``'s
  default ``shuffle=True`` makes Keras ask for the indices in its own random order: still
  correct, but every batch is then made on demand instead of ahead, and the adapter warns once.
* ``on_epoch_end`` reaches the server (``rs.on_epoch_end()``), which then runs the Sequence's
  ``on_epoch_end`` in its workers. Keras also calls ``on_epoch_end`` when it resets an iterator
  before reading anything from it (before every ``evaluate``, and at the start of ``fit``); an
  end with no batch read since the last one is not forwarded, so it does not throw away the
  start of the next epoch that the server has already made.
* ``predict`` returns rows in the order of the served positions: index order, or the server's
  permutation under ``--shuffle`` (so predict over an unshuffled server).

Keras 2 / tf.keras (``fit_generator``, ``evaluate_generator``, ``predict_generator``, or ``fit``
with a Sequence): ``as_keras(keras_module=tf_keras)`` (or ``tf.keras``; the default is
``import keras``, which may itself be Keras 2) returns a ``keras.utils.Sequence`` subclass.
Leave ``fit``'s ``workers=1, use_multiprocessing=False`` defaults (no enqueuer then) and pass
``shuffle=False``. Tested versions: Keras 3.15.1 with the torch backend (CPU), in CI; tf-keras
2.21.0 on TensorFlow 2.21.0 (CPU), by hand (``fit``, ``fit_generator``, ``evaluate_generator``,
``predict_generator``; TensorFlow is not installed in CI).

PyTorch::

    for epoch in range(10):
        for x, y in rs.as_torch(): ...          # tensors sharing the ring's shared memory
    loader = torch.utils.data.DataLoader(rs.as_torch(), batch_size=None, num_workers=0)

* Every numpy array of a batch becomes ``torch.from_numpy(array)``: no copy, the tensor shares
  the slot and keeps it leased while it lives (arrays torch cannot hold, such as strings,
  datetimes, records, non-native byte order, stay numpy arrays). The memory is mapped
  read-only: **never write into these tensors** (an in-place op such as ``x /= 255`` kills the
  process with SIGSEGV); use ``x = x / 255`` or ``x.clone()``, or ``RemoteSequence(copy=True)``.
* ``pin_memory=True`` copies each tensor into page-locked memory for fast, asynchronous
  ``.to("cuda", non_blocking=True)``, and releases the slot at once; with no accelerator it
  warns and stays zero-copy, as the DataLoader does.
* Each pass over it is one epoch of the server's: a complete pass ends the epoch as it finishes
  (so the server starts the next one while you validate); a pass left early is ended when the
  next begins. Do not also call ``rs.on_epoch_end()``.
* Use it with ``num_workers=0`` and ``batch_size=None``: the server's workers do the work and
  batch; DataLoader workers would each need their own connection (it refuses to be pickled).

JAX and NumPy: iterate the RemoteSequence itself (``for x, y in rs:`` then
``rs.on_epoch_end()``). ``jax.device_put(x)`` on the CPU backend aliases the shared memory (no
copy) and keeps the slot leased while the jax array lives; ``jnp.asarray(x)`` copies.
"""

from __future__ import annotations

import functools
import importlib
import operator
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dataserver.client._remote import RemoteSequence

__all__ = ["as_keras", "as_torch"]

#: torch's warning for ``from_numpy`` of a read-only array (see ``_to_torch``).
_TORCH_READONLY_WARNING = "The given NumPy array is not writable"


# --- Keras ----------------------------------------------------------------------------------


class _KerasAdapter:
    """What the Keras adapter classes add to Keras' own ``PyDataset`` (Keras 3) or ``Sequence``
    (Keras 2). Built per Keras module by :func:`_keras_class`."""

    def __init__(self, rs: RemoteSequence, **base_kwargs: Any) -> None:
        super().__init__(**base_kwargs)
        self.rs = rs
        self._expected = 0  # the index that continues the order Keras asks in
        self._read = 0  # batches read since the last epoch end that reached the server
        self._warned = False

    def __len__(self) -> int:
        return len(self.rs)

    def __getitem__(self, index: int) -> Any:
        i = operator.index(index)
        if i < 0:
            i += len(self.rs)
        if i != self._expected and i != 0 and not self._warned:
            self._warned = True
            warnings.warn(
                f"Keras asked for batch {i} after batch {self._expected - 1}: it reorders the "
                "indices itself (fit's default shuffle=True), so batches are made on demand "
                "instead of ahead. Pass shuffle=False to fit() and serve with --shuffle.",
                UserWarning, stacklevel=2,
            )
        batch = self.rs.at(i)
        self._expected = i + 1
        self._read += 1
        return batch

    def on_epoch_end(self) -> None:
        if self._read:
            self.rs.on_epoch_end()
        self._read = 0
        self._expected = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} over {self.rs!r}>"


@functools.cache
def _keras_class(keras: ModuleType) -> tuple[type[_KerasAdapter], dict[str, Any]]:
    """The adapter class for this Keras, and the keyword arguments of its base's __init__."""
    utils = keras.utils
    if hasattr(utils, "PyDataset"):  # Keras 3: workers=1 without multiprocessing -> no enqueuer
        base, kwargs = utils.PyDataset, {"workers": 1, "use_multiprocessing": False}
        name = "RemotePyDataset"
    else:  # Keras 2 / tf.keras: workers are fit() arguments; their defaults build no enqueuer
        base, kwargs, name = utils.Sequence, {}, "RemoteKerasSequence"
    cls = type(name, (_KerasAdapter, base), {
        "__module__": __name__,
        "__doc__": f"A RemoteSequence as a {base.__module__}.{base.__qualname__} (as_keras).",
    })
    return cls, kwargs


def as_keras(rs: RemoteSequence, *, keras_module: ModuleType | None = None) -> Any:
    """``rs`` as a ``keras.utils.PyDataset`` (Keras 3) or ``keras.utils.Sequence`` (Keras 2)
    for ``fit``/``evaluate``/``predict``; see the module docstring.

    Args:
        rs: the RemoteSequence to read; one adapter per RemoteSequence.
        keras_module: the Keras to adapt to (``tf_keras``, ``tf.keras``); default
            ``import keras``.
    """
    keras = keras_module if keras_module is not None else importlib.import_module("keras")
    cls, kwargs = _keras_class(keras)
    return cls(rs, **kwargs)


# --- PyTorch --------------------------------------------------------------------------------


def _to_torch(obj: Any, torch: ModuleType, pin: bool) -> Any:
    """``obj`` with every numpy array that torch can hold turned into a tensor sharing it."""
    if isinstance(obj, np.ndarray):
        try:
            t = torch.from_numpy(obj)
        except (TypeError, ValueError):  # strings, datetimes, records, byte order, strides
            return obj
        return t.pin_memory() if pin else t
    if isinstance(obj, tuple):
        return tuple(_to_torch(x, torch, pin) for x in obj)
    if isinstance(obj, list):
        return [_to_torch(x, torch, pin) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_torch(v, torch, pin) for k, v in obj.items()}
    return obj


class _TorchAdapter:
    """What the PyTorch adapter adds to ``torch.utils.data.IterableDataset``; see as_torch."""

    def __init__(self, rs: RemoteSequence, pin_memory: bool, torch: ModuleType) -> None:
        self.rs = rs
        self.pin_memory = pin_memory
        self._torch = torch
        self._partial = False  # a pass began and was left before its end

    def __len__(self) -> int:
        return len(self.rs)

    def convert(self, batch: Any) -> Any:
        """A batch as this adapter yields it: arrays as tensors (pinned copies if asked)."""
        with warnings.catch_warnings():
            # torch warns that it "does not support non-writable tensors": the arrays are
            # read-only views of shared memory mapped read-only (or of received frames, marked
            # read-only alike), and the tensors share that memory, which must never be written
            # (see the module docstring). The warning says
            # nothing the caller can act on per batch, so it is silenced here, for this
            # message only.
            warnings.filterwarnings("ignore", message=_TORCH_READONLY_WARNING,
                                    category=UserWarning)
            return _to_torch(batch, self._torch, self.pin_memory)

    def __iter__(self) -> Iterator[Any]:
        if self._torch.utils.data.get_worker_info() is not None:
            raise RuntimeError(
                "as_torch() runs in the process that opened the RemoteSequence: use "
                "DataLoader(..., num_workers=0, batch_size=None); the dataserver's workers "
                "already make the batches in parallel"
            )
        return self._epoch()

    def _epoch(self) -> Iterator[Any]:
        rs = self.rs
        if self._partial:
            rs.on_epoch_end()
        self._partial = True
        for pos in range(len(rs)):
            yield self.convert(rs.at(pos))
        self._partial = False
        rs.on_epoch_end()

    def __reduce__(self) -> Any:
        raise TypeError(
            "the as_torch() dataset holds a live connection and cannot be pickled (DataLoader "
            "workers would pickle it): use DataLoader(..., num_workers=0, batch_size=None)"
        )

    def __repr__(self) -> str:
        pin = ", pinned" if self.pin_memory else ""
        return f"<{type(self).__name__} over {self.rs!r}{pin}>"


@functools.cache
def _torch_class(torch: ModuleType) -> type[_TorchAdapter]:
    return type("RemoteIterableDataset", (_TorchAdapter, torch.utils.data.IterableDataset), {
        "__module__": __name__,
        "__doc__": "A RemoteSequence as a torch.utils.data.IterableDataset (as_torch).",
    })


def _accelerator(torch: ModuleType) -> bool:
    acc = getattr(torch, "accelerator", None)
    if acc is not None:
        return bool(acc.is_available())
    return bool(torch.cuda.is_available())


def as_torch(rs: RemoteSequence, pin_memory: bool = False) -> Any:
    """``rs`` as a ``torch.utils.data.IterableDataset`` of batches whose arrays are tensors
    sharing the shared memory (``torch.from_numpy``, no copy); see the module docstring.

    Args:
        rs: the RemoteSequence to read; one adapter per RemoteSequence.
        pin_memory: copy each tensor into page-locked memory (for GPU training); ignored with
            a warning when torch sees no accelerator.
    """
    torch = importlib.import_module("torch")
    if pin_memory and not _accelerator(torch):
        warnings.warn("as_torch(pin_memory=True), but torch sees no accelerator: the tensors "
                      "stay unpinned shared-memory views", UserWarning, stacklevel=3)
        pin_memory = False
    return _torch_class(torch)(rs, pin_memory, torch)
