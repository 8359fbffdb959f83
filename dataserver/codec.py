"""The one codec for every message (:mod:`dataserver.protocol` declares them): a message is a
small frozen dataclass with a numeric ``KIND``, on the wire the msgpack array ``[KIND, field,
field, ...]`` in declaration order. :func:`decode` trusts nothing: it checks the array shape,
the kind, the field count and each field's type before building the object, and raises
:class:`~dataserver.errors.ProtocolError` otherwise. Nothing is pickled.

Imports only the standard library and msgpack: the client uses it.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import msgpack

from dataserver.errors import ProtocolError

__all__ = ["Message", "decode", "encode", "message"]

Check = Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_uint(v: Any) -> bool:
    return type(v) is int and v >= 0


def _is_bool(v: Any) -> bool:
    return type(v) is bool


def _is_str(v: Any) -> bool:
    return type(v) is str


def _is_bytes(v: Any) -> bool:
    return type(v) is bytes


def _is_float(v: Any) -> bool:
    return type(v) in (float, int)


def _is_uint_list(v: Any) -> bool:
    return type(v) is list and all(type(x) is int and x >= 0 for x in v)


def _is_list(v: Any) -> bool:
    return type(v) is list


def _is_item(x: Any) -> bool:
    return (type(x) is list and len(x) == 8 and type(x[0]) is int and type(x[1]) is int
            and type(x[2]) is int and x[2] >= 0 and type(x[3]) is int and x[3] >= 0
            and type(x[4]) is str and type(x[5]) is int and x[5] >= 0 and type(x[6]) is int
            and x[6] >= 0 and type(x[7]) is bytes)


def _is_item_list(v: Any) -> bool:
    """Ready's items: ``[epoch, pos, index, bid, segment, offset, nbytes, layout]`` each."""
    return type(v) is list and all(map(_is_item, v))


#: Each field type as one Python expression over ``{v}``: compiled per message kind into one
#: function that checks all its fields at once (a call per field cost ~1.5 us per message).
_EXPRESSIONS = {
    "int": "type({v}) is int",
    "uint": "(type({v}) is int and {v} >= 0)",
    "bool": "type({v}) is bool",
    "str": "type({v}) is str",
    "bytes": "type({v}) is bytes",
    "float": "type({v}) in _NUMBERS",
    "list[uint]": "_is_uint_list({v})",
    "list": "type({v}) is list",
    "list[item]": "_is_item_list({v})",
}


def _compile_checks(fields: tuple[str, ...]) -> Callable[[list[Any]], bool]:
    """One function: does the array ``[KIND, *values]`` hold exactly these field types?"""
    conds = [f"len(a) == {len(fields) + 1}"]
    conds += [_EXPRESSIONS[t].format(v=f"a[{i + 1}]") for i, t in enumerate(fields)]
    namespace: dict[str, Any] = {"_is_uint_list": _is_uint_list, "_is_item_list": _is_item_list,
                              "_NUMBERS": (float, int)}
    exec(f"def check(a):\n    return {' and '.join(conds)}\n", namespace)
    check: Callable[[list[Any]], bool] = namespace["check"]
    return check


_CHECKS: dict[str, Check] = {
    "int": _is_int,
    "uint": _is_uint,
    "bool": _is_bool,
    "str": _is_str,
    "bytes": _is_bytes,
    "float": _is_float,
    "list[uint]": _is_uint_list,
    "list": _is_list,
    "list[item]": _is_item_list,
}


class Message:
    """Base of every message: ``KIND`` tags it on the wire; ``NAMES`` are its fields in wire
    order (their checks are kept in the codec's table)."""

    KIND: ClassVar[int]
    NAMES: ClassVar[tuple[str, ...]]


_BY_KIND: dict[int, tuple[type[Message], Callable[[list[Any]], bool], tuple[Check, ...]]] = {}
M = TypeVar("M", bound=type[Message])


def message(kind: int, *fields: str) -> Callable[[M], M]:
    """Class decorator: register a message dataclass as ``kind`` with these field types."""

    def register(cls: M) -> M:
        assert kind not in _BY_KIND, kind
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        assert len(names) == len(fields), (cls, names, fields)
        cls.KIND = kind
        cls.NAMES = tuple(names)
        _BY_KIND[kind] = (cls, _compile_checks(fields), tuple(_CHECKS[f] for f in fields))
        return cls

    return register


_packer = msgpack.Packer(use_bin_type=True)


def encode(msg: Message) -> bytes:
    """Encode a message as ``[KIND, *fields]`` msgpack."""
    data: bytes = _packer.pack([msg.KIND, *[getattr(msg, name) for name in msg.NAMES]])
    return data


def decode(data: bytes, max_bytes: int = sys.maxsize) -> Message:
    """Decode and check one message; raise ProtocolError on anything unexpected."""
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes is larger than the {max_bytes} allowed")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"message is not valid msgpack ({type(exc).__name__})") from None
    if type(obj) is not list or not obj or type(obj[0]) is not int:
        raise ProtocolError("message is not a [kind, fields...] array")
    entry = _BY_KIND.get(obj[0])
    if entry is None:
        raise ProtocolError(f"unknown message kind {obj[0]}")
    cls, valid, checks = entry
    if valid(obj):
        return cls(*obj[1:])
    # not valid: find what is wrong, field by field, for the message
    fields = obj[1:]
    if len(fields) != len(checks):
        raise ProtocolError(
            f"{cls.__name__} takes {len(checks)} fields, got {len(fields)}"
        )
    for i, (value, check) in enumerate(zip(fields, checks, strict=True)):
        if not check(value):
            raise ProtocolError(
                f"{cls.__name__} field {cls.NAMES[i]!r} has a bad value of type "
                f"{type(value).__name__}"
            )
    return cls(*fields)
