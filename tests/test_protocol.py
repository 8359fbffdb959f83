"""The wire protocol: the codec, the handshake, and a server under hostile input."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqs
from dataserver import layout
from dataserver.client import ProtocolError, RemoteSequence
from dataserver.codec import _BY_KIND, _CHECKS
from dataserver.protocol import (
    VERSION,
    Hello,
    Refused,
    Release,
    Want,
    Welcome,
    decode,
    encode,
)

pytestmark = pytest.mark.timeout(120)


def test_codec_round_trip_and_rejections() -> None:
    msg = Want(3, 10, 20, 2, True)
    assert decode(encode(msg)) == msg
    for bad, why in [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb({"k": 1}), "not a \\[kind"),
        (msgpack.packb([999]), "unknown message kind 999"),
        (msgpack.packb([Want.KIND, 1, 2]), "takes 5 fields, got 2"),
        (msgpack.packb([Want.KIND, 1, -2, 3, 1, False]), "field 'start'"),
        (msgpack.packb([Want.KIND, 1, 2, 3, 1, 1]), "field 'urgent'"),
        (msgpack.packb([Release.KIND, [1, "x"]]), "field 'bids'"),
    ]:
        with pytest.raises(ProtocolError, match=why):
            decode(bad)
    with pytest.raises(ProtocolError, match="larger than"):
        decode(b"\x90" * 100, max_bytes=10)


_values = st.one_of(st.integers(-3, 3), st.booleans(), st.text(max_size=3),
                    st.binary(max_size=3), st.floats(allow_nan=False), st.none(),
                    st.lists(st.integers(-2, 2) | st.text(max_size=1), max_size=3))
_valid_values = {
    "int": st.integers(-5, 5), "uint": st.integers(0, 5), "bool": st.booleans(),
    "str": st.text(max_size=3), "bytes": st.binary(max_size=3),
    "float": st.floats(allow_nan=False) | st.integers(-5, 5),
    "list[uint]": st.lists(st.integers(0, 5), max_size=3), "list": st.lists(_values, max_size=2),
}
_valid_item = st.tuples(
    _valid_values["int"], _valid_values["int"], _valid_values["uint"], _valid_values["uint"],
    _valid_values["str"], _valid_values["uint"], _valid_values["uint"], _valid_values["bytes"],
).map(list)
# a valid Ready item list, or one whose single item has one field (or its length) made wrong
_items = st.lists(_valid_item, max_size=3) | st.builds(
    lambda item, i, v: [[*item[:i], v, *item[i + 1:]]], _valid_item, st.integers(0, 8), _values)
_valid_values["list[item]"] = st.lists(_valid_item, max_size=3)
_type_of = {check: name for name, check in _CHECKS.items()}


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_each_kinds_compiled_check_agrees_with_its_field_checks(data: st.DataObject) -> None:
    """decode checks all fields of a kind with one compiled function; it must accept exactly
    what the per-field checks (which name the bad field) accept. A valid message of each kind,
    then one field (or the field count) made wrong half the time."""
    kind = data.draw(st.sampled_from(sorted(_BY_KIND)))
    _cls, valid, checks = _BY_KIND[kind]
    values = [data.draw(_valid_values[_type_of[c]]) for c in checks]
    if data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(values)))
        if i == len(values):
            values.append(data.draw(_values))
        elif _type_of[checks[i]] == "list[item]":
            values[i] = data.draw(_items | _values)
        else:
            values[i] = data.draw(_values)
    expected = len(values) == len(checks) and all(
        c(v) for c, v in zip(checks, values, strict=True))
    assert valid([kind, *values]) == expected


def test_layout_refuses_unsafe_dtypes_from_a_layout() -> None:
    tree = msgpack.packb([0, "|O", [2], 0])
    with pytest.raises(layout.BatchFormatError, match="object dtype"):
        layout.build(tree, np.zeros(64, np.uint8))


def raw_client(endpoint: str) -> tuple[zmq.Context[Any], zmq.Socket[bytes]]:
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10000)
    sock.connect(endpoint)
    return ctx, sock


_DTYPES = ["f4", "<f8", ">i2", "u1", "?", "c8", "M8[D]", "U3", "S2", "e"]
_arrays = st.builds(lambda dt, shape, seed: np.random.default_rng(seed).integers(
    0, 100, size=shape).astype(dt), st.sampled_from(_DTYPES),
    st.lists(st.integers(0, 4), max_size=3).map(tuple), st.integers(0, 2**16))
_batches = st.recursive(_arrays, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.lists(kids, max_size=3).map(tuple),
    st.dictionaries(st.text("abc", min_size=1, max_size=2), kids, max_size=3)), max_leaves=6)


@settings(max_examples=150, deadline=None)
@given(_batches)
def test_a_cached_plan_is_the_plan(batch: Any) -> None:
    """Batches of plain arrays reuse the plan of the same structure: it must place them where a
    fresh plan would, and rebuild to the same values."""
    layout._plans.clear()
    fresh = layout.plan(batch, 0)
    cached = layout.plan(batch, 0)
    assert layout._plans, "a batch of plain arrays is cached"
    assert (cached.layout, cached.nbytes) == (fresh.layout, fresh.nbytes)
    assert [(off, id(a)) for off, a in cached.arrays] == [(off, id(a)) for off, a in fresh.arrays]
    region = np.zeros(max(cached.nbytes, 1), np.uint8)
    layout.write(cached, region)
    _assert_equal(layout.build(cached.layout, region), batch)


def _assert_equal(got: Any, want: Any) -> None:
    assert type(got) is type(want)
    if isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for k in want:
            _assert_equal(got[k], want[k])
    else:
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _assert_equal(g, w)


def test_batches_with_values_are_planned_afresh_every_time() -> None:
    x = np.zeros(3, np.float32)
    layout._plans.clear()
    for batch in [(x, 3), (x, "label"), {1: x}, (x, None), (x, np.float32(2))]:
        assert layout.plan(batch, 0).layout == layout.plan(batch, 0).layout
    assert not layout._plans, "values may change from batch to batch: never cached"


def test_version_mismatch_is_refused_clearly(serve: Any) -> None:
    server = serve(seqs.Indexed(4), workers=1)
    ctx, sock = raw_client(server.endpoint)
    try:
        sock.send(encode(Hello(VERSION + 1, "default", os.getpid(), 0, "old client")))
        reply = decode(sock.recv())
        assert isinstance(reply, Refused)
        assert f"protocol version {VERSION + 1} is not this server's {VERSION}" in reply.reason
        sock.send(encode(Hello(VERSION, "nosuch", os.getpid(), 0, "x")))
        reply = decode(sock.recv())
        assert isinstance(reply, Refused) and "no dataset 'nosuch'" in reply.reason
    finally:
        ctx.destroy(0)
    with pytest.raises(ProtocolError, match="no dataset 'val'"):
        RemoteSequence(server.endpoint, dataset="val")


def test_a_consumer_cannot_release_what_it_does_not_hold(serve: Any) -> None:
    server = serve(seqs.Indexed(6), workers=1)
    ctx, sock = raw_client(server.endpoint)
    try:
        sock.send(encode(Hello(VERSION, "default", os.getpid(), 0, "raw")))
        assert isinstance(decode(sock.recv()), Welcome)
        sock.send(encode(Release([1, 2, 3])))
        reply = decode(sock.recv())
        assert isinstance(reply, Refused) and "does not hold" in reply.reason
        sock.send(encode(Want(0, 0, 99, 1, False)))
        reply = decode(sock.recv())
        assert isinstance(reply, Refused) and "not a range of positions" in reply.reason
    finally:
        ctx.destroy(0)


junk = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda v: msgpack.packb(v), st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
                  st.text(max_size=8), st.binary(max_size=8)),
        lambda kids: st.lists(kids, max_size=6), max_leaves=12)),
    st.builds(lambda kind, rest: msgpack.packb([kind, *rest]),
              st.sampled_from([1, 2, 3, 4, 5, 6, 7, 20, 21, 40, 41, 52, 99]),
              st.lists(st.one_of(st.integers(-5, 2**40), st.booleans(), st.text(max_size=4),
                                 st.lists(st.integers(-3, 2**33), max_size=4)), max_size=6)),
)


@pytest.mark.timeout(240)
def test_fuzzed_endpoint_never_crashes_or_stalls_the_server(serve: Any,
                                                            isolated: dict[str, Path]) -> None:
    server = serve(seqs.Indexed(30), workers=2)
    ctx, sock = raw_client(server.endpoint)
    good = RemoteSequence(server.endpoint, timeout=10)
    it = iter(good)
    seen: list[int] = []

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(junk, min_size=1, max_size=5))
    def hammer(messages: list[bytes]) -> None:
        for m in messages:
            sock.send(m)
        # the honest consumer keeps being served while the hostile one talks
        seen.append(int(next(it)[1][0]) if len(seen) < 30 else -1)

    try:
        hammer()
        good.on_epoch_end()
        assert [int(y[0]) for _x, y in good] == list(range(30))
    finally:
        good.close()
        ctx.destroy(0)
    assert [s for s in seen if s >= 0] == list(range(min(30, len(seen))))
