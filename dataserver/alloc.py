"""Zero-copy batches: allocate arrays straight in the slot the batch will travel in.

Inside ``__getitem__`` (in a process or thread worker), ``empty(shape, dtype)`` returns an array
that already lives in the ring slot reserved for the batch being made. Fill it and return it (or
a C-contiguous view of it) in the batch: the worker then copies nothing, and the consumer reads
the very bytes you wrote. Anywhere else (inline, in tests, when the slot is full) it returns an
ordinary ``np.empty``, so the same Sequence works everywhere; the batch is then copied once.

An array from ``empty`` belongs to that one batch: do not keep it across ``__getitem__`` calls
(the slot is reused once consumers release the batch).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from dataserver.layout import ALIGN

__all__ = ["empty", "full", "zeros"]

_local = threading.local()


class _Slot:
    __slots__ = ("region", "used")

    def __init__(self, region: np.ndarray[Any, Any]) -> None:
        self.region = region
        self.used = 0


@contextmanager
def slot_allocation(region: np.ndarray[Any, Any] | None) -> Iterator[_Slot | None]:
    """While making one batch: ``empty`` allocates in ``region`` (a writable uint8 slot)."""
    slot = _Slot(region) if region is not None else None
    _local.slot = slot
    try:
        yield slot
    finally:
        _local.slot = None


def empty(shape: int | tuple[int, ...], dtype: Any = np.float32) -> np.ndarray[Any, Any]:
    """An uninitialised C-ordered array placed in the batch's slot (see the module doc)."""
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    dt = np.dtype(dtype)
    slot: _Slot | None = getattr(_local, "slot", None)
    if slot is not None and not dt.hasobject:
        nbytes = math.prod(dims) * dt.itemsize
        off = (slot.used + ALIGN - 1) & ~(ALIGN - 1)
        if nbytes and off + nbytes <= slot.region.size:
            slot.used = off + nbytes
            arr: np.ndarray[Any, Any] = slot.region[off : off + nbytes].view(dt).reshape(dims)
            return arr
    return np.empty(dims, dt)


def zeros(shape: int | tuple[int, ...], dtype: Any = np.float32) -> np.ndarray[Any, Any]:
    """Like :func:`empty`, filled with zeros."""
    return full(shape, 0, dtype)


def full(shape: int | tuple[int, ...], value: Any, dtype: Any = np.float32) -> np.ndarray[Any, Any]:
    """Like :func:`empty`, filled with ``value``."""
    arr = empty(shape, dtype)
    arr.fill(value)
    return arr
