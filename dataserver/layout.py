"""How a batch is laid out in a shared-memory region, and rebuilt from it.

A batch is any nesting of tuple, list and dict (string or integer keys) whose leaves are numpy
arrays, numpy scalars, Python scalars (None, bool, int, float, str) and bytes. The worker calls
:func:`plan` to place every array at a 64-byte aligned offset and to describe the structure in a
small msgpack *layout*; :func:`write` copies the arrays into the region (the one copy a batch
costs); the consumer calls :func:`build` to rebuild the same structure as numpy views into the
region. The layout travels in the announcement, never pickled.

Layout nodes (msgpack arrays):

====================================  ===================================================
``[0, descr, shape, offset]``          ndarray; ``descr`` is ``dtype.str`` or a structured descr
``[1, [child, ...]]``                  tuple
``[2, [child, ...]]``                  list
``[3, [[key, child], ...]]``           dict (insertion order kept)
``[4, value]``                         None, bool, int, float, str or small bytes, inline
``[5, offset, length]``                bytes stored in the region
``[6, descr, raw]``                    numpy scalar
====================================  ===================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from dataserver.errors import DataServerError

__all__ = ["ALIGN", "BatchFormatError", "Plan", "build", "plan", "write"]

ALIGN = 64
#: bytes objects up to this size travel inline in the layout; larger ones in the region.
INLINE_BYTES_MAX = 1024
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1

#: Arrays up to this size are copied by a memoryview assignment, which holds the GIL.
SMALL_COPY_BYTES = 256 << 10

_ARRAY, _TUPLE, _LIST, _DICT, _VALUE, _BYTES, _SCALAR = range(7)


class BatchFormatError(DataServerError, TypeError):
    """A batch holds something that cannot travel through shared memory."""


@dataclass
class Plan:
    """Where each piece of one batch goes: ``nbytes`` of region, plus the layout to announce."""

    layout: bytes
    nbytes: int
    arrays: list[tuple[int, np.ndarray[Any, Any]]] = field(default_factory=list)
    blobs: list[tuple[int, bytes]] = field(default_factory=list)
    in_place: int = 0  # arrays already in the slot (made with dataserver.empty): not copied


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def _descr(dtype: np.dtype[Any]) -> Any:
    if dtype.fields is None and dtype.subdtype is None:
        return dtype.str
    return np.lib.format.dtype_to_descr(dtype)


def _dtype(descr: Any) -> np.dtype[Any]:
    dtype = np.dtype(descr) if isinstance(descr, str) else np.lib.format.descr_to_dtype(
        _tuplify(descr)
    )
    if dtype.hasobject:
        raise BatchFormatError(f"layout names an object dtype {descr!r}; refusing to build it")
    return dtype


def _tuplify(descr: Any) -> Any:
    # msgpack turns the (name, format[, shape]) tuples of a structured descr into lists.
    if isinstance(descr, list):
        return [tuple(_tuplify(x) for x in item) if isinstance(item, list) else item
                for item in descr]
    return descr


def _where(index: int, path: tuple[Any, ...]) -> str:
    return f"batch {index}: batch" + "".join(f"[{p!r}]" for p in path)


class _Planner:
    def __init__(self, index: int, inplace: tuple[int, int] | None) -> None:
        self.index = index
        # arrays allocated in the slot by dataserver.empty: (slot address, bytes allocated)
        self.inplace = inplace
        self.offset = inplace[1] if inplace else 0
        self.in_place = 0
        self.arrays: list[tuple[int, np.ndarray[Any, Any]]] = []
        self.blobs: list[tuple[int, bytes]] = []

    def node(self, obj: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(obj, np.ndarray):
            return self.array(obj, path)
        if obj is None or isinstance(obj, (bool, float, str)):
            return [_VALUE, obj]
        if isinstance(obj, int):
            if not _INT64_MIN <= obj <= _UINT64_MAX:
                raise BatchFormatError(
                    f"{_where(self.index, path)} is the integer {obj}, outside 64 bits; "
                    "store it as a string or a numpy array"
                )
            return [_VALUE, obj]
        if isinstance(obj, np.generic):
            if obj.dtype.hasobject:
                raise self.object_error(path)
            return [_SCALAR, _descr(obj.dtype), obj.tobytes()]
        if isinstance(obj, (bytes, bytearray, memoryview)):
            data = bytes(obj)
            if len(data) <= INLINE_BYTES_MAX:
                return [_VALUE, data]
            off = _align(self.offset)
            self.offset = off + len(data)
            self.blobs.append((off, data))
            return [_BYTES, off, len(data)]
        if isinstance(obj, tuple):
            return [_TUPLE, [self.node(v, (*path, i)) for i, v in enumerate(obj)]]
        if isinstance(obj, list):
            return [_LIST, [self.node(v, (*path, i)) for i, v in enumerate(obj)]]
        if isinstance(obj, dict):
            items = []
            for k, v in obj.items():
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise BatchFormatError(
                        f"{_where(self.index, path)} has a key {k!r} of type "
                        f"{type(k).__name__}; dict keys must be str or int"
                    )
                items.append([k, self.node(v, (*path, k))])
            return [_DICT, items]
        if hasattr(obj, "__array__") or hasattr(obj, "__array_interface__"):
            return self.array(np.asarray(obj), path)
        raise BatchFormatError(
            f"{_where(self.index, path)} is a {type(obj).__module__}.{type(obj).__qualname__}; "
            "a batch may hold numpy arrays, scalars, str, bytes and None, nested in "
            "tuples, lists and dicts"
        )

    def object_error(self, path: tuple[Any, ...]) -> BatchFormatError:
        return BatchFormatError(
            f"{_where(self.index, path)} has dtype object, which cannot live in shared memory; "
            "convert it to a numeric or fixed-width string dtype (np.stack the items, or "
            "np.asarray(..., dtype=...)) or return it as a list"
        )

    def array(self, arr: np.ndarray[Any, Any], path: tuple[Any, ...]) -> Any:
        if arr.dtype.hasobject:
            raise self.object_error(path)
        if self.inplace and arr.nbytes and arr.flags.c_contiguous:
            lo, used = self.inplace
            addr = arr.__array_interface__["data"][0]
            if lo <= addr and addr + arr.nbytes <= lo + used:  # already in the slot
                self.in_place += 1
                return [_ARRAY, _descr(arr.dtype), list(arr.shape), addr - lo]
        off = _align(self.offset)
        self.offset = off + arr.nbytes
        if arr.nbytes:
            self.arrays.append((off, arr))
        return [_ARRAY, _descr(arr.dtype), list(arr.shape), off]


#: Plans of batches made only of arrays, by their structure: (layout, nbytes, offsets).
_plans: dict[Any, tuple[bytes, int, list[int]]] = {}
#: Distinct structures kept; batches of one Sequence usually share a handful.
PLAN_CACHE_SIZE = 256


def _shape_of(obj: Any, leaves: list[np.ndarray[Any, Any]]) -> Any:
    """The structure of a batch made only of plain arrays nested in tuples, lists and dicts
    with str keys (its arrays appended to ``leaves`` in the planner's order), or None for any
    other batch: its layout is then a function of this key alone."""
    t = type(obj)
    if t is np.ndarray:
        if obj.dtype.hasobject:
            return None
        leaves.append(obj)
        return (obj.dtype, obj.shape)
    if t is tuple or t is list:
        parts = []
        for v in obj:
            part = _shape_of(v, leaves)
            if part is None:
                return None
            parts.append(part)
        return (t, tuple(parts))
    if t is dict:
        items = []
        for k, v in obj.items():
            if type(k) is not str:
                return None
            part = _shape_of(v, leaves)
            if part is None:
                return None
            items.append((k, part))
        return (t, tuple(items))
    return None


def plan(batch: Any, index: int, inplace: tuple[int, int] | None = None) -> Plan:
    """Place every piece of ``batch`` (the batch at ``index``, named in errors). ``inplace`` is
    (address, bytes used) of a slot whose first bytes ``dataserver.empty`` filled: arrays lying
    there keep their place and are not copied. A batch of plain arrays whose structure (types,
    keys, dtypes, shapes) was planned before reuses that plan."""
    key = None
    leaves: list[np.ndarray[Any, Any]] = []
    if inplace is None:
        key = _shape_of(batch, leaves)
        cached = _plans.get(key) if key is not None else None
        if cached is not None:
            layout, nbytes, offsets = cached
            placed = [arr for arr in leaves if arr.nbytes]  # as the planner places them
            return Plan(layout, nbytes, list(zip(offsets, placed, strict=True)))
    planner = _Planner(index, inplace)
    tree = planner.node(batch, ())
    layout = msgpack.packb(tree, use_bin_type=True)
    out = Plan(layout, max(planner.offset, 0), planner.arrays, planner.blobs, planner.in_place)
    if key is not None:
        if len(_plans) >= PLAN_CACHE_SIZE:
            _plans.clear()
        _plans[key] = (layout, out.nbytes, [off for off, _arr in planner.arrays])
    return out


def write(p: Plan, region: np.ndarray[Any, Any]) -> None:
    """Copy the planned pieces into ``region`` (a writable uint8 array of at least p.nbytes)."""
    out = memoryview(region)  # type: ignore[arg-type]
    for off, arr in p.arrays:
        # small arrays: a memcpy without numpy's per-call overhead (~1 us); big ones through
        # numpy, which lets go of the GIL while it copies (thread workers share one)
        if arr.nbytes <= SMALL_COPY_BYTES and arr.flags.c_contiguous:
            try:
                out[off : off + arr.nbytes] = memoryview(arr).cast("B")  # type: ignore[arg-type]
                continue
            except (ValueError, TypeError):  # a dtype the buffer protocol lacks (datetime64)
                pass
        dst = region[off : off + arr.nbytes].view(arr.dtype).reshape(arr.shape)
        np.copyto(dst, arr, casting="no")
    for off, data in p.blobs:
        region[off : off + len(data)] = np.frombuffer(data, np.uint8)


Builder = Callable[[np.ndarray[Any, Any], bool], Any]
_builders: dict[bytes, Builder] = {}
#: Distinct layouts kept compiled; batches of one Sequence usually share a handful.
BUILDER_CACHE_SIZE = 256


def build(layout: bytes, region: np.ndarray[Any, Any], copy: bool = False) -> Any:
    """Rebuild a batch from its layout as views into ``region`` (owned copies if ``copy``).
    Layouts are compiled once: batches of the same shapes share one builder."""
    builder = _builders.get(layout)
    if builder is None:
        try:
            builder = _compile(msgpack.unpackb(layout, raw=False, strict_map_key=False,
                                               use_list=True))
        except BatchFormatError:
            raise
        except Exception as exc:  # a layout comes off a socket: any malformation lands here
            raise BatchFormatError(
                f"malformed batch layout ({type(exc).__name__}: {exc})") from None
        if len(_builders) >= BUILDER_CACHE_SIZE:
            _builders.clear()
        _builders[layout] = builder
    try:
        return builder(region, copy)
    except (TypeError, ValueError) as exc:  # an array outside the region, a negative shape
        raise BatchFormatError(
            f"batch layout does not fit its {region.nbytes}-byte region ({exc})") from None


def _compile(node: list[Any]) -> Builder:
    tag = node[0]
    if tag == _ARRAY:
        _, descr, shape, off = node
        # numpy would take a negative offset and read before the region
        if type(off) is not int or off < 0 or type(shape) is not list or not all(
                type(d) is int and d >= 0 for d in shape):
            raise BatchFormatError(f"array node of shape {shape!r} at offset {off!r}")
        dtype = _dtype(descr)
        shape = tuple(shape)
        if math.prod(shape) * dtype.itemsize == 0:
            return lambda region, copy: np.empty(shape, dtype)

        def array(region: np.ndarray[Any, Any], copy: bool) -> Any:
            arr = np.ndarray(shape, dtype, buffer=region, offset=off)
            return arr.copy() if copy else arr

        return array
    if tag in (_TUPLE, _LIST):
        kids = [_compile(c) for c in node[1]]
        if tag == _TUPLE:
            return lambda region, copy: tuple([k(region, copy) for k in kids])
        return lambda region, copy: [k(region, copy) for k in kids]
    if tag == _DICT:
        items = [(k, _compile(c)) for k, c in node[1]]
        return lambda region, copy: {k: b(region, copy) for k, b in items}
    if tag == _VALUE:
        value = node[1]
        return lambda region, copy: value
    if tag == _BYTES:
        _, start, n = node
        if type(start) is not int or type(n) is not int or start < 0 or n < 0:
            raise BatchFormatError(f"bytes node at {start!r} of {n!r} bytes")

        def blob(region: np.ndarray[Any, Any], copy: bool) -> bytes:
            if start + n > region.nbytes:
                raise ValueError(f"{n} bytes at {start} lie outside it")
            return region[start : start + n].tobytes()

        return blob
    if tag == _SCALAR:
        _, descr, raw = node
        scalar = np.frombuffer(raw, _dtype(descr))[0]
        return lambda region, copy: scalar
    raise BatchFormatError(f"unknown layout node {tag!r}")
