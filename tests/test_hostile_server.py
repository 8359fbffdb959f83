"""A client trusts nothing its server sends: a malformed announcement raises ProtocolError that
names the batch, never an IndexError, a read outside the announced bytes, or a file that is not
one of the server's own segments."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from client._batches import FrameBatches, ShmBatches
from client._channel import Channel
from dataserver import layout
from dataserver.client import ProtocolError, RemoteSequence, SharedMemoryError
from dataserver.fifo import Inbox, Outbox
from dataserver.protocol import (
    FRAME_CHUNK,
    FRAMES_SPLIT,
    VERSION,
    Hello,
    Pipes,
    Pong,
    Ready,
    Want,
    Welcome,
    decode,
    encode,
)

pytestmark = pytest.mark.timeout(120)

SERVER_ID = "abc"
RING = f"dataserver-{SERVER_ID}-ring"
RING_BYTES = 4096
GOOD = layout.plan((np.arange(4, dtype=np.float32), np.array([7])), 0)
REFUSED = (ProtocolError, layout.BatchFormatError)


@pytest.fixture
def ring(tmp_path: Path) -> ShmBatches:
    (tmp_path / RING).write_bytes(np.arange(RING_BYTES, dtype=np.uint8).tobytes())
    (tmp_path / "secret").write_bytes(b"not the server's")
    return ShmBatches(tmp_path, RING, SERVER_ID, copy=False)


def _item(**change: Any) -> list[Any]:
    item = [0, 0, 0, 1, "", 0, GOOD.nbytes, GOOD.layout]
    for i, v in change.items():
        item[int(i[1:])] = v
    return item


@pytest.mark.parametrize("field, bad", [
    (0, "0"), (1, 0.5), (2, -1), (3, -1), (4, b"ring"), (5, -1), (6, -4096), (7, "layout"),
    (8, b"extra"),
])
def test_a_ready_item_with_one_bad_field_is_refused(field: int, bad: Any) -> None:
    item = _item()
    assert isinstance(decode(msgpack.packb([Ready.KIND, [item]])), Ready)
    item[field:field + 1] = [bad]
    with pytest.raises(ProtocolError, match="Ready field 'items'"):
        decode(msgpack.packb([Ready.KIND, [_item(), item]]))


def test_a_well_formed_announcement_builds(ring: ShmBatches) -> None:
    """The control for the refusals below: the same item, unaltered, builds its batch."""
    x, y = ring.build(_item())
    assert x.dtype == np.float32 and x.shape == (4,) and y.shape == (1,)


@pytest.mark.parametrize("change, why", [
    ({"f4": "../secret"}, "not one of its own"),
    ({"f4": "dataserver-other-big-1"}, "not one of its own"),
    ({"f4": f"dataserver-{SERVER_ID}-/../../secret"}, "not one of its own"),
    ({"f5": RING_BYTES - 8}, "lie outside the 4096-byte segment ring"),
    ({"f6": RING_BYTES + 1}, "lie outside"),
    ({"f7": b"\xc1"}, "malformed batch layout"),
    ({"f7": msgpack.packb([0, "<f4"])}, "malformed batch layout"),
    ({"f7": msgpack.packb([0, "<f4", [4096], 0])}, "does not fit its"),
    ({"f7": msgpack.packb([0, "<f4", [-1, -1], 0])}, "array node of shape"),
    ({"f7": msgpack.packb([0, "<f4", [1], -64])}, "array node of shape"),
    ({"f7": msgpack.packb([0, "not a dtype", [1], 0])}, "malformed batch layout"),
    ({"f7": msgpack.packb([5, -1, 3])}, "bytes node"),
    ({"f7": msgpack.packb([5, 0, 999])}, "does not fit its"),
    ({"f7": msgpack.packb([99])}, "unknown layout node"),
])
def test_a_hostile_announcement_is_refused(ring: ShmBatches, change: dict[str, Any],
                                           why: str) -> None:
    with pytest.raises(REFUSED, match=why):
        ring.build(_item(**change))


def test_a_ring_name_outside_the_servers_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"x")
    with pytest.raises(ProtocolError, match="not one of its own"):
        ShmBatches(tmp_path, "secret", SERVER_ID, copy=False)


def test_a_ring_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    """Opening a FIFO to read blocks until someone writes: the client would hang."""
    os.mkfifo(tmp_path / RING)
    with pytest.raises(SharedMemoryError, match="not a shared-memory segment"):
        ShmBatches(tmp_path, RING, SERVER_ID, copy=False)


_scalars = st.one_of(st.integers(-2, 5000), st.text(max_size=4), st.binary(max_size=4),
                     st.none(), st.sampled_from(["<f4", "|u1", "<i8", "|V3"]))
_nodes = st.recursive(
    _scalars, lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.tuples(st.integers(0, 7), st.lists(kids, max_size=3)).map(lambda t: [t[0], *t[1]]),
        st.tuples(st.just(0), st.sampled_from(["<f4", "|u1", "<c8"]),
                  st.lists(st.integers(-2, 3000), max_size=3), st.integers(-64, 5000)).map(list),
    ), max_leaves=10)


@settings(max_examples=400, deadline=None)
@given(tree=_nodes, offset=st.integers(0, 2 * RING_BYTES), nbytes=st.integers(0, RING_BYTES))
def test_fuzzed_layouts_build_or_are_refused(tmp_path_factory: pytest.TempPathFactory,
                                             tree: Any, offset: int, nbytes: int) -> None:
    """Whatever the layout and placement, building either succeeds with arrays inside the
    announced bytes or raises one of the client's errors."""
    tmp = tmp_path_factory.mktemp("ring")
    (tmp / RING).write_bytes(bytes(RING_BYTES))
    for batches, item in (
        (ShmBatches(tmp, RING, SERVER_ID, copy=False),
         _item(f5=offset, f6=nbytes, f7=msgpack.packb(tree))),
        (FrameBatches(copy=False, keep=4),
         [*_item(f6=nbytes, f7=msgpack.packb(tree)), zmq.Frame(bytes(nbytes))]),
    ):
        try:
            batch = batches.build(item)
        except REFUSED:
            continue
        leaves = [batch]
        while leaves:
            leaf = leaves.pop()
            if isinstance(leaf, (list, tuple)):
                leaves.extend(leaf)
            elif isinstance(leaf, dict):
                leaves.extend(leaf.values())
            elif isinstance(leaf, np.ndarray) and leaf.base is not None:
                assert leaf.nbytes <= nbytes


def _fake_server(endpoint: str, ready: list[Any], frames: list[bytes], stop: threading.Event,
                 shm_dir: str = "", ring: str = "") -> tuple[zmq.Context[Any], threading.Thread]:
    """A server that welcomes a consumer and answers its first Want with ``ready``."""
    ctx: zmq.Context[Any] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)

    def serve() -> None:
        try:
            while not stop.is_set():
                if not router.poll(20):
                    continue
                cid, data = router.recv_multipart()
                msg = decode(data)
                if isinstance(msg, Hello):
                    welcome = Welcome(VERSION, SERVER_ID, "default", 4, False, 0, shm_dir, ring,
                                      0, 0, 2, 0, 0, 5.0, False, "")
                    router.send_multipart([cid, encode(welcome)])
                elif isinstance(msg, Want):
                    router.send_multipart([cid, msgpack.packb([Ready.KIND, ready]), *frames])
        finally:
            router.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return ctx, thread


BIG = FRAMES_SPLIT + 1  # travels in several frames, received into a recycled buffer


@pytest.mark.parametrize("ready, frames, why", [
    ([[0, 0, 0, 1, "", 0, 4096, msgpack.packb([0, "<f4", [1024], 0])]], [b"abcd"],
     "batch 0 \\(epoch 0\\) is malformed: batch layout does not fit its 4-byte region"),
    ([[0, 0, 0, 1, "", 0, 4]], [b"abcd"], "Ready field 'items' has a bad value"),
    ([[0, 0, 0, 1, "", 0, 4, GOOD.layout]], [], "batch frames do not match"),
    ([[0, 0, 0, 1, "", 0, 4, GOOD.layout]], [b"abcd", b"more"], "frames beyond the batches"),
    ([[0, 0, 0, 1, "", 0, BIG, GOOD.layout]], [bytes(FRAME_CHUNK)],
     f"a batch's frames hold {FRAME_CHUNK} of the {BIG} bytes announced"),
    ([[0, 0, 0, 1, "", 0, BIG, GOOD.layout]], [bytes(FRAME_CHUNK)] * 8,
     f"a batch's frames hold more than the {BIG} bytes announced"),
    ([[0, 0, 0, 1, "", 0, 1 << 62, GOOD.layout]], [b"ab"],
     f"cannot make room for a batch of {1 << 62} bytes announced"),
])
def test_a_consumer_names_what_a_hostile_server_sent(isolated: dict[str, Path],
                                                     ready: list[Any], frames: list[bytes],
                                                     why: str) -> None:
    endpoint = f"ipc://{isolated['runtime']}/hostile.sock"
    stop = threading.Event()
    ctx, thread = _fake_server(endpoint, ready, frames, stop)
    try:
        with RemoteSequence(endpoint, transport="frames", timeout=5) as seq, \
                pytest.raises(ProtocolError, match=why):
            seq[0]
    finally:
        stop.set()
        thread.join(5)
        ctx.term()
        Path(endpoint.removeprefix("ipc://")).unlink()  # libzmq leaves the socket file


def test_pipes_that_are_not_fifos_are_never_opened_for_writing(isolated: dict[str, Path],
                                                               tmp_path: Path) -> None:
    """A Pipes message names files the client opens, one of them for writing: a server that
    names a regular file (the user's, say) must not get records written into it."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    for make in (lambda: Outbox(str(victim), 1), lambda: Inbox(str(victim), create=False)):
        with pytest.raises(OSError, match="not a FIFO"):
            make()
    channel = Channel(f"ipc://{isolated['runtime']}/nobody.sock", None)
    try:
        channel.open_pipes(Pipes(str(victim), str(victim), 1))
        assert channel.up is None and channel.down is None, "the socket stays the only path"
        channel.send(Want(0, 0, 1, 1, False))
    finally:
        channel.close([])
    assert victim.read_bytes() == b"keep me"


def test_a_welcome_naming_a_ring_not_its_own_is_refused(isolated: dict[str, Path],
                                                         tmp_path: Path) -> None:
    """Refused while connecting: the consumer raises instead of mapping another file."""
    (tmp_path / "secret").write_bytes(b"x")
    endpoint = f"ipc://{isolated['runtime']}/hostile.sock"
    stop = threading.Event()
    ctx, thread = _fake_server(endpoint, [], [], stop, shm_dir=str(tmp_path), ring="secret")
    try:
        with pytest.raises(ProtocolError, match="'secret' that is not one of its own"):
            RemoteSequence(endpoint, transport="shm", timeout=5)
    finally:
        stop.set()
        thread.join(5)
        ctx.term()
        Path(endpoint.removeprefix("ipc://")).unlink()


@pytest.fixture(scope="module")
def pair() -> Any:
    """Two connected inproc sockets: what a server sends, what a frames consumer reads."""
    ctx: zmq.Context[Any] = zmq.Context()
    tx, rx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    tx.bind("inproc://fuzz-frames")
    rx.connect("inproc://fuzz-frames")
    yield tx, rx
    tx.close(0)
    rx.close(0)
    ctx.term()


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fuzzed_batch_frames_arrive_whole_or_are_refused(pair: Any, data: Any) -> None:
    """However a server cuts a batch into frames (right, short, long, extra), the consumer
    gets exactly the bytes announced or one ProtocolError, and the next message reads clean."""
    tx, rx = pair
    big = data.draw(st.booleans())
    nbytes = data.draw(st.integers(FRAMES_SPLIT + 1, FRAMES_SPLIT + 2 * FRAME_CHUNK) if big
                       else st.integers(0, 4096))
    cuts = sorted(data.draw(st.lists(st.integers(0, nbytes), max_size=6 if big else 1)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, nbytes], strict=True)]
    mutate = data.draw(st.sampled_from(["none", "drop", "extra", "longer", "shorter"]))
    if mutate == "drop":
        sizes = sizes[:-1]
    elif mutate == "extra":
        sizes = [*sizes, data.draw(st.integers(0, 8))]
    elif mutate in ("longer", "shorter"):
        i = data.draw(st.integers(0, len(sizes) - 1))
        sizes[i] = max(0, sizes[i] + (5 if mutate == "longer" else -5))
    total = sum(sizes)
    payload = (bytes(range(251)) * (total // 251 + 1))[:total]  # where each byte lands shows
    frames, at = [], 0
    for size in sizes:
        frames.append(payload[at : at + size])
        at += size
    tx.send_multipart([msgpack.packb([Ready.KIND, [[0, 0, 0, 1, "", 0, nbytes, b"\x90"]]]),
                       *frames])
    tx.send(encode(Pong()))  # the next message: must read clean whatever came before
    assert rx.poll(10_000)
    reached = [sum(sizes[: k + 1]) for k in range(len(sizes))]
    whole = (len(sizes) == 1 if not big
             else total == nbytes and (len(sizes) < 2 or reached[-2] < nbytes))
    batches = FrameBatches(copy=False, keep=2)
    try:
        msg = batches.read(rx)
    except ProtocolError:
        assert not whole, f"refused frames {sizes} that make {nbytes} bytes"
    else:
        assert whole, f"accepted frames {sizes} for {nbytes} bytes"
        got = msg.items[0][8]
        body = bytes(got.buffer if isinstance(got, zmq.Frame) else got)
        assert body == payload
    assert rx.poll(10_000)
    assert isinstance(decode(rx.recv()), Pong)
