"""Consumers that cannot map the server's shared memory get batch bytes as ZeroMQ frames."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import seqs
from dataserver.client import RemoteSequence
from dataserver.status import fetch_status
from helpers import wait_for

pytestmark = pytest.mark.timeout(90)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("endpoint_kind", ["ipc", "tcp"])
def test_frames_transport_has_the_same_semantics(serve: Any, endpoint_kind: str,
                                                 isolated: dict[str, Path]) -> None:
    endpoint = (f"tcp://127.0.0.1:{free_port()}" if endpoint_kind == "tcp"
                else f"ipc://{isolated['runtime']}/frames.sock")
    server = serve({"train": seqs.Indexed(40, delay=0.005), "big": seqs.Sized(6, big_at=(2,))},
                   endpoint=endpoint, shuffle=True, seed=2, workers=2)
    order = [np.random.default_rng([2, e]).permutation(40).tolist() for e in range(2)]
    with RemoteSequence(server.endpoint, dataset="train", transport="frames") as seq, \
            RemoteSequence(server.endpoint, dataset="train", shard=(1, 2),
                           transport="frames") as shard:
        assert seq.transport == "frames"
        for epoch in range(2):
            got = [(int(y[0]), float(x[3, 3])) for x, y in seq]
            assert got == [(i, float(i)) for i in order[epoch]]
            assert [int(y[0]) for _x, y in shard] == order[epoch][1::2]
            seq.on_epoch_end()
            shard.on_epoch_end()
        assert int(seq[7][1][0]) == 7  # random access by index
        assert seq.held() == 0  # frames hold no slot on the client
    with RemoteSequence(server.endpoint, dataset="big", transport="frames") as big:
        sizes = [x.nbytes for x, _y in big]  # the oversize batch travels too
        assert sizes[2] == 1 << 20 and sizes[0] == 4096
    # the server ends frame leases once the frames have left (and batches prefetched for the
    # closed consumers finish being made): no slot stays held
    wait_for(lambda: fetch_status(server.endpoint)["ring"]["held"] == 0, "every slot released")


@pytest.mark.parametrize("transport", ["shm", "frames"])
def test_a_slow_batch_is_announced_once(serve: Any, transport: str) -> None:
    """Every batch takes longer than the client waits before its urgent want, which only
    moves the batch forward: no position is announced twice (for a frames consumer that was
    every such batch's bytes sent twice)."""
    from dataserver.client._receive import URGENT_AFTER_S

    server = serve(seqs.Indexed(5, delay=3 * URGENT_AFTER_S), workers=1)
    with RemoteSequence(server.endpoint, transport=transport, prefetch=2) as seq:
        routed: list[tuple[int, int]] = []
        route = seq._route

        def counting(epoch: int, pos: int, index: int, item: Any) -> None:
            routed.append((epoch, pos))
            route(epoch, pos, index, item)

        seq._route = counting  # type: ignore[method-assign]
        assert [int(y[0]) for _x, y in seq] == list(range(5))
        assert len(routed) == len(set(routed)) and len(routed) >= 4, routed


def test_an_unknown_transport_is_refused_before_connecting() -> None:
    with pytest.raises(ValueError, match="transport must be auto, shm or frames, got 'udp'"):
        RemoteSequence("ipc:///nonexistent", transport="udp", timeout=0.1)


def test_auto_picks_shared_memory_on_the_same_host(serve: Any) -> None:
    server = serve(seqs.Indexed(5))
    with RemoteSequence(server.endpoint) as seq:
        assert seq.transport == "shm"
        assert [int(y[0]) for _x, y in seq] == list(range(5))


def test_auto_falls_back_to_frames_without_the_servers_shm(serve: Any, isolated: dict[str, Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    server = serve(seqs.Indexed(8))
    import os

    real_stat = os.stat

    def stat(path: Any, *a: Any, **k: Any) -> Any:  # as if /dev/shm were another tmpfs
        if str(path).endswith("-ring"):
            raise FileNotFoundError(path)
        return real_stat(path, *a, **k)

    monkeypatch.setattr(os, "stat", stat)
    with RemoteSequence(server.endpoint) as seq:
        assert seq.transport == "frames"
        assert [int(y[0]) for _x, y in seq] == list(range(8))


def test_curve_keys_encrypt_and_authenticate(isolated: dict[str, Path], tmp_path: Path,
                                             serve: Any) -> None:
    import subprocess
    import sys

    from dataserver.client import ServerUnavailable
    from dataserver.errors import ConfigError

    keys = tmp_path / "keys"
    out = subprocess.run([sys.executable, "-m", "dataserver", "keys", str(keys)],
                         capture_output=True, text=True, timeout=60, check=True)
    assert "server and consumer keys" in out.stdout
    assert (keys / "server.key_secret").stat().st_mode & 0o077 == 0
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = serve(seqs.Indexed(12), endpoint=endpoint, curve_keys=str(keys), workers=1)
    with RemoteSequence(endpoint, curve_keys=str(keys), transport="frames") as seq:
        assert [int(y[0]) for _x, y in seq] == list(range(12))
    assert fetch_status(endpoint, curve_keys=str(keys))["ring"]["slots"] > 0
    with pytest.raises(ServerUnavailable):  # no keys: the handshake never completes
        RemoteSequence(endpoint, timeout=1.5)
    stranger = tmp_path / "stranger"
    subprocess.run([sys.executable, "-m", "dataserver", "keys", str(stranger)],
                   capture_output=True, timeout=60, check=True)
    (stranger / "server.key").write_bytes((keys / "server.key").read_bytes())
    with pytest.raises(ServerUnavailable):  # a key the server did not authorize
        RemoteSequence(endpoint, curve_keys=str(stranger), timeout=1.5)
    with pytest.raises(ConfigError, match="--curve-keys"):
        serve(seqs.Indexed(4), endpoint="tcp://10.0.0.1:5555")
    server.close()


def test_frames_consumer_jumping_ahead_gets_its_batch(serve: Any) -> None:
    """Batches reach a frames consumer in its order; one that jumps ahead (``at()`` under
    shuffling) is not held back by the positions it skipped."""
    server = serve(seqs.Indexed(60, delay=0.002), shuffle=True, seed=5, workers=2, slots=6)
    order = np.random.default_rng([5, 0]).permutation(60).tolist()
    with RemoteSequence(server.endpoint, transport="frames", prefetch=4) as seq:
        assert [int(seq.at(p)[1][0]) for p in range(3)] == order[:3]
        jumps = (40, 41, 50, 2)
        assert [int(seq.at(p)[1][0]) for p in jumps] == [order[p] for p in jumps]
        assert [int(y[0]) for _x, y in seq] == order
    wait_for(lambda: fetch_status(server.endpoint)["ring"]["held"] == 0, "every slot released")


def _send_big(sock: Any, value: int, nbytes: int) -> None:
    """A Ready for one batch of ``nbytes`` of ``value``, its bytes in frames of FRAME_CHUNK."""
    from dataserver import layout
    from dataserver.protocol import FRAME_CHUNK, Ready, encode

    plan = layout.plan((np.full(nbytes, value, np.uint8),), 0)
    data = np.full(plan.nbytes, value, np.uint8).tobytes()
    chunks = [data[at : at + FRAME_CHUNK] for at in range(0, len(data), FRAME_CHUNK)]
    sock.send_multipart([encode(Ready([[0, value, value, value, "", 0, plan.nbytes,
                                        plan.layout]])), *chunks])


def test_big_frames_batches_reuse_buffers_no_batch_holds() -> None:
    """A batch bigger than FRAMES_SPLIT is received into a buffer recycled once the batch's
    last view dies, never into one a batch still uses."""
    import zmq

    from client._batches import FrameBatches
    from dataserver.protocol import FRAMES_SPLIT

    nbytes = FRAMES_SPLIT + 4096
    ctx: zmq.Context[Any] = zmq.Context()
    tx, rx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    tx.bind("inproc://big")
    rx.connect("inproc://big")
    try:
        batches = FrameBatches(copy=False, keep=2)

        def receive(value: int) -> Any:
            _send_big(tx, value, nbytes)
            assert rx.poll(10_000)
            (item,) = batches.read(rx).items
            (x,) = batches.build(item)
            assert x.nbytes == nbytes and x[0] == x[-1] == value
            return x

        def buffer_of(x: Any) -> Any:  # the batch's region is over a memoryview of an mmap
            return x.base.base.obj

        held = receive(1)
        first = buffer_of(held)
        dropped = receive(2)
        second = buffer_of(dropped)
        assert second is not first
        del dropped  # its buffer is spare now
        assert buffer_of(receive(3)) is second  # reused (this batch dies at once: spare again)
        assert buffer_of(receive(4)) is second
        assert int(held.min()) == int(held.max()) == 1  # the held batch was never written over
        del held
        # two kept, lent or spare: a third buffer is let go, not kept
        a, b, c = receive(5), receive(6), receive(7)
        assert len({id(buffer_of(a)), id(buffer_of(b)), id(buffer_of(c))}) == 3
        del a, b, c
        assert len(batches._spare) == 2
    finally:
        tx.close(0)
        rx.close(0)
        ctx.term()


@pytest.mark.parametrize("copy", [False, True])
def test_a_frames_consumer_reads_batches_bigger_than_a_frame(serve: Any, copy: bool) -> None:
    """Big batches come in several frames into recycled buffers: views of them or, with
    copy=True, arrays of the consumer's own."""
    from dataserver.protocol import FRAMES_SPLIT

    big = FRAMES_SPLIT + (4 << 20)
    server = serve(seqs.Sized(6, big=big, big_at=(1, 2, 4)), workers=2)
    with RemoteSequence(server.endpoint, transport="frames", copy=copy) as seq:
        for _epoch in range(2):
            got = [(x.nbytes, bool((x == i).all()), int(y[0]), x.base is None,
                    x.flags.writeable, y.flags.writeable) for i, (x, y) in enumerate(seq)]
            # views are read-only, as ring views are; copies are the consumer's own
            assert got == [(big if i in (1, 2, 4) else 4096, True, i, copy, copy, copy)
                           for i in range(6)]
            seq.on_epoch_end()
    wait_for(lambda: fetch_status(server.endpoint)["ring"]["held"] == 0, "every slot released")


def test_a_frames_channel_hands_over_one_message_at_a_time(tmp_path: Path) -> None:
    """Reading a big batch copies it: the first batch waiting must not wait for the copies of
    all the others behind it."""
    import zmq

    from client._batches import FrameBatches
    from client._channel import Channel
    from dataserver.protocol import FRAMES_SPLIT, Ready

    endpoint = f"ipc://{tmp_path}/one.sock"
    ctx: zmq.Context[Any] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint)
    channel = Channel(endpoint, None)
    try:
        channel.read_frames = FrameBatches(copy=False, keep=4).read
        channel.sock.send(b"hi")  # the router learns the channel's identity
        assert router.poll(10_000)
        router.recv_multipart()
        for value in (1, 2, 3):
            router.send(channel.identity, zmq.SNDMORE)
            _send_big(router, value, FRAMES_SPLIT + 8)
        got = []
        while len(got) < 3:
            assert channel.poll(10_000)
            msgs = channel.receive()
            assert len(msgs) == 1
            got.extend(msgs)
        assert [msg.items[0][2] for msg in got if isinstance(msg, Ready)] == [1, 2, 3]
    finally:
        channel.close([])
        router.close(0)
        ctx.term()


def test_send_tracked_says_done_only_once_every_part_has_left(tmp_path: Path) -> None:
    """A batch's frames come from a slot (or a buffer) written again once they have left. pyzmq
    tracks only a message's last part, and a small last part is copied and done at once while
    the big ones before it still wait in the queue: send_tracked waits for all of them."""
    import zmq

    from dataserver.protocol import send_tracked

    ctx: zmq.Context[Any] = zmq.Context()
    tx, rx = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    tx.bind(f"ipc://{tmp_path}/tracked.sock")
    rx.connect(f"ipc://{tmp_path}/tracked.sock")
    big = np.ones(64 << 20, np.uint8)  # far more than the socket buffers hold unread
    try:
        naive = tx.send_multipart([memoryview(big), b"tail"], copy=False, track=True)
        assert naive is not None and naive.done  # the trap: the big part is still queued
        tracked = send_tracked(tx, [memoryview(big), b"tail"])
        assert not tracked.done
        for _ in range(2):
            assert rx.poll(10_000)
            assert [len(part) for part in rx.recv_multipart(copy=False)] == [64 << 20, 4]
        wait_for(lambda: tracked.done, "ZeroMQ to let go of the big part")
    finally:
        tx.close(0)
        rx.close(0)
        ctx.term()


def test_a_spare_buffer_recycled_meanwhile_is_lent_once() -> None:
    """A batch dropped in another thread recycles its buffer from a weak-reference callback,
    which may let go of the oldest spare while the consumer's thread picks one: the buffer it
    picks must leave the spare list, and no other with it."""
    from client._batches import FrameBatches

    batches = FrameBatches(copy=False, keep=4)
    small, other = bytearray(10), bytearray(120)

    class Picked(bytearray):
        def __len__(self) -> int:  # looked at while picking: "another thread" lets go of
            if batches._spare and batches._spare[0] is small:  # the oldest spare now
                del batches._spare[0]
            return super().__len__()

    picked = Picked(150)
    batches._spare = [small, picked, other]  # type: ignore[list-item]
    region, _view = batches._buffer(100)
    assert region.base.obj is picked
    assert batches._spare == [other] and batches._spare[0] is other
