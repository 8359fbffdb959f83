"""The FIFO channels beside the sockets (dataserver.fifo): tasks to each worker, worker
answers, and a local consumer's short messages both ways. Whatever does not fit, or finds a
FIFO full, must still arrive over the socket."""

from __future__ import annotations

import os
import signal
import struct
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zmq

import seqs
from dataserver import shm
from dataserver.client import RemoteSequence
from dataserver.client._channel import Channel
from dataserver.client._receive import Receiver
from dataserver.fifo import MAX_MESSAGE, Inbox, Outbox
from dataserver.protocol import EpochEnd, Release, Tasks, UseRing, Want, decode, encode
from dataserver.status import fetch_status
from dataserver.supervise import WorkerSide
from dataserver.worker import _Worker
from helpers import wait_for

pytestmark = pytest.mark.timeout(120)


def test_records_round_trip_with_their_token(tmp_path: Path) -> None:
    inbox = Inbox(str(tmp_path / "f"))
    a, b = Outbox(inbox.path, 7), Outbox(inbox.path, 9)
    try:
        assert a.send(b"one") and b.send(b"two") and a.send(b"x" * MAX_MESSAGE)
        assert not a.send(b"x" * (MAX_MESSAGE + 1)), "too long for one atomic write"
        assert inbox.read() == [(7, b"one"), (9, b"two"), (7, b"x" * MAX_MESSAGE)]
        assert inbox.read() == []
    finally:
        a.close(), b.close(), inbox.close()
    assert not (tmp_path / "f").exists()


def test_a_full_fifo_refuses_instead_of_blocking(tmp_path: Path) -> None:
    inbox = Inbox(str(tmp_path / "f"))
    out = Outbox(inbox.path, 1)
    try:
        sent = 0
        while out.send(b"y" * 1000):
            sent += 1
            assert sent < 10_000, "a FIFO never filled up"
        records = inbox.read()
        assert len(records) == sent and all(r == (1, b"y" * 1000) for r in records)
        assert out.send(b"again"), "room once read"
    finally:
        out.close(), inbox.close()


def test_garbage_is_dropped_and_end_of_file_is_seen(tmp_path: Path) -> None:
    path = str(tmp_path / "f")
    os.mkfifo(path, 0o600)
    reader = Inbox(path, create=False)
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, struct.pack("<II", 1 << 30, 0) + b"junk")  # a length no writer of ours makes
        assert reader.read() == []
        os.write(fd, struct.pack("<II", 2, 5) + b"ok")
        assert reader.read() == [(5, b"ok")]
        os.close(fd)
        fd = -1
        assert reader.read() == [] and reader.ended
    finally:
        if fd >= 0:
            os.close(fd)
        reader.close()
    assert Path(path).exists(), "an Inbox that did not make the FIFO leaves it"


def _fifos(server: Any) -> list[str]:
    rundir = shm.runtime_root() / fetch_status(server.endpoint)["server"]["id"]
    return sorted(p.name for p in rundir.glob("*.fifo"))


@pytest.mark.parametrize("keys", [8, 40, 120])
def test_announcements_too_long_for_the_fifo_still_arrive_in_order(serve: Any,
                                                                    keys: int) -> None:
    """8 keys: many Ready items per FIFO write; 40: a full window must be split; 120: one
    item alone is longer than a FIFO write and goes over the socket."""
    server = serve(seqs.Wide(48, keys))
    with RemoteSequence(server.endpoint) as rs:
        for _ in range(2):
            for i, batch in enumerate(rs):
                assert len(batch) == keys and all((v == i).all() for v in batch.values())
            rs.on_epoch_end()
        assert rs._channel.down is not None, "a local shm consumer reads its FIFO"
        assert any(name.startswith("down-") for name in _fifos(server))
    # the consumer left: its FIFO is gone while the server runs on
    wait_for(lambda: not any(n.startswith("down-") for n in _fifos(server)),
             "the departed consumer's FIFO to be removed")


def _count_socket_sends(rs: RemoteSequence) -> list[bytes]:
    sent: list[bytes] = []
    send = rs._channel.sock.send

    def spy(data: bytes, *args: Any, **kw: Any) -> Any:
        sent.append(data)
        return send(data, *args, **kw)

    rs._channel.sock.send = spy  # type: ignore[method-assign]
    return sent


def test_a_consumer_sends_everything_by_fifo_once_connected(serve: Any) -> None:
    """A Want sent by socket before the FIFOs opened could reach the server after a later one
    sent through them: a process worker then saw epoch 2's tasks before epoch 1's and ran
    on_epoch_end twice before making epoch 1 (the likely cause of test_core's on_epoch_end test
    failing now and then on a busy machine). The
    FIFOs are granted while connecting, before the first Want."""
    server = serve(seqs.EpochTagged(20))
    with RemoteSequence(server.endpoint) as rs:
        assert rs._channel.up is not None and rs._channel.down is not None
        by_socket = _count_socket_sends(rs)
        for epoch in range(3):
            assert [(int(y[0]), int(y[1])) for _x, y in rs] == [(i, epoch) for i in range(20)]
            rs.on_epoch_end()
        assert by_socket == []


def test_a_stalled_server_makes_the_consumer_wait_for_fifo_room(serve: Any) -> None:
    """With the up FIFO full (the server stopped), a consumer waits for room instead of
    sending by socket, which could overtake what waits in the FIFO."""
    server = serve(seqs.Indexed(30))
    up = shm.runtime_root() / fetch_status(server.endpoint)["server"]["id"] / "up.fifo"
    with RemoteSequence(server.endpoint) as rs:
        by_socket = _count_socket_sends(rs)
        os.kill(server.pid, signal.SIGSTOP)
        resumed = threading.Timer(0.5, os.kill, (server.pid, signal.SIGCONT))
        try:
            stranger = Outbox(str(up), 12345)  # records the server drops, once it reads them
            while stranger.send(b"z" * 1000):
                pass
            stranger.close()
            resumed.start()
            assert [int(y[0]) for _x, y in rs] == list(range(30))
        finally:
            resumed.cancel()
            os.kill(server.pid, signal.SIGCONT)
        assert by_socket == [] and rs._channel.up is not None


class _Sock:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, data: bytes) -> None:
        self.sent.append(decode(data))


def test_a_message_too_long_for_the_fifo_sends_all_after_it_by_socket(tmp_path: Path) -> None:
    """The server handles the FIFO's records before the socket's messages: going back to the
    FIFO after a message went by socket would let the later message overtake it."""
    inbox = Inbox(str(tmp_path / "up"))
    channel = Channel(f"ipc://{tmp_path}/nobody.sock", None)
    real, fake = channel.sock, _Sock()
    channel.up, channel.sock = Outbox(inbox.path, 4), fake  # type: ignore[assignment]
    try:
        channel.send(Want(0, 0, 1, 1, False))
        channel.send(Release(list(range(1 << 40, (1 << 40) + 1000))))  # > one record
        channel.send(EpochEnd(0))
        assert [decode(d) for _t, d in inbox.read()] == [Want(0, 0, 1, 1, False)]
        assert [type(m) for m in fake.sent] == [Release, EpochEnd]
        assert channel.up is None
    finally:
        channel.sock = real
        channel.close([])
        inbox.close()


def test_releases_go_in_messages_that_fit_a_fifo_record() -> None:
    bids = list(range(1 << 40, (1 << 40) + 1000))
    sent: list[Any] = []
    fake = SimpleNamespace(_batches=SimpleNamespace(releases=[1], take_releases=lambda: bids),
                           _send=sent.append)
    Receiver._flush_releases(fake)  # type: ignore[arg-type]
    assert all(len(encode(m)) <= MAX_MESSAGE for m in sent) and len(sent) == 3
    assert [b for m in sent for b in m.bids] == bids


def test_frames_consumers_get_no_fifo_and_strangers_are_ignored(serve: Any) -> None:
    server = serve(seqs.Indexed(40))
    up = shm.runtime_root() / fetch_status(server.endpoint)["server"]["id"] / "up.fifo"
    stranger = Outbox(str(up), 12345)  # a token the server never gave out
    try:
        assert stranger.send(b"\x93\x04\x90\x00")
        assert stranger.send(b"not msgpack at all")
    finally:
        stranger.close()
    with RemoteSequence(server.endpoint, transport="frames") as rs:
        assert [int(y[0]) for _x, y in rs] == list(range(40))
        assert rs._channel.down is None
    with RemoteSequence(server.endpoint) as rs:
        assert [int(y[0]) for _x, y in rs] == list(range(40))


def _tasks_fifos(server: Any) -> set[str]:
    return {n for n in _fifos(server) if n.startswith("tasks-")}


def test_each_worker_has_its_own_task_fifo_and_a_replacement_a_new_one(serve: Any) -> None:
    server = serve(seqs.Indexed(40), workers=2)
    with RemoteSequence(server.endpoint) as rs:
        assert [int(y[0]) for _x, y in rs] == list(range(40))
        before = _tasks_fifos(server)
        assert len(before) == 2, before
        victim = fetch_status(server.endpoint)["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: all(w["pid"] != victim and w["state"] != "starting"
                             for w in fetch_status(server.endpoint)["workers"]),
                 "the killed worker to be replaced")
        rs.on_epoch_end()
        assert [int(y[0]) for _x, y in rs] == list(range(40))
        after = _tasks_fifos(server)
        assert len(after) == 2 and len(after & before) == 1, (before, after)


class _Socket:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send_multipart(self, frames: list[bytes]) -> None:
        self.sent.append(decode(frames[1]))


def test_tasks_the_fifo_cannot_take_go_by_socket_and_so_does_all_after(tmp_path: Path) -> None:
    """The worker handles its FIFO's records before its socket's messages, so the server must
    never go back to the FIFO once something went by socket: then the order of tasks holds."""
    inbox = Inbox(str(tmp_path / "tasks"))
    box = Outbox(inbox.path, 0)
    server = SimpleNamespace(_task_boxes={3: box}, workers_sock=_Socket())
    try:
        filler = Outbox(inbox.path, 9)  # 64-byte records: full pages, 16 of them
        while filler.send(b"z" * 56):
            pass
        filler.close()
        assert len(os.read(inbox.fd, 4096)) == 4096  # one page free: two records of tasks fit
        items = [[(1 << 40) + bid, 0, 0, (1 << 40) + bid, 3] for bid in range(200)]
        WorkerSide._send_worker(server, 3, Tasks(items))  # type: ignore[arg-type]
        WorkerSide._send_worker(server, 3, UseRing("r", 64, 4))  # type: ignore[arg-type]
        by_fifo = [decode(data) for token, data in inbox.read() if token == 0]
        assert by_fifo and all(isinstance(m, Tasks) for m in by_fifo)
        by_socket = server.workers_sock.sent
        assert [type(m) for m in by_socket] == [Tasks, UseRing]
        got = [it for m in by_fifo for it in m.items] + by_socket[0].items
        assert got == items, "every task once, in order"
        assert 3 not in server._task_boxes and box.fd < 0, "no going back to the FIFO"
    finally:
        box.close(), inbox.close()


class _Late:
    """A socket whose one message arrives just after a FIFO record its sender wrote before
    sending it (the record lands between the reader's poll and its reads)."""

    def __init__(self, fifo: Outbox, record: bytes, message: Any) -> None:
        self.fifo, self.pending = fifo, [(record, message)]

    def recv(self, flags: int = 0, copy: bool = True) -> Any:
        if not self.pending:
            raise zmq.Again()
        record, message = self.pending.pop()
        assert self.fifo.send(record)
        return message

    recv_multipart = recv


def test_a_worker_runs_its_tasks_in_the_order_the_server_sent_them(tmp_path: Path) -> None:
    inbox = Inbox(str(tmp_path / "tasks"))
    box = Outbox(inbox.path, 0)
    first, then = encode(Tasks([[1, 0, 0, 0, 0]])), encode(Tasks([[2, 0, 0, 1, 1]]))
    sock = _Late(box, first, then)
    worker: Any = SimpleNamespace(sock=sock, tasks=inbox)
    try:
        assert _Worker.receive(worker, {sock: zmq.POLLIN}) == [first, then]
    finally:
        box.close(), inbox.close()


def test_the_server_handles_a_consumers_requests_in_the_order_sent(tmp_path: Path) -> None:
    from dataserver.consumers import ConsumerSide
    from dataserver.server import Server

    up = Inbox(str(tmp_path / "up"))
    box = Outbox(up.path, 7)
    first, then = encode(EpochEnd(0)), encode(Want(2, 0, 20, 1, False))
    handled: list[bytes] = []
    server: Any = SimpleNamespace(up=up, _by_token={7: b"c1"},
                                  _on_client_data=lambda cid, data: handled.append(data))
    server.clients = _Late(box, first, [b"c1", then])
    for name, cls in (("_drain", Server), ("_on_up", ConsumerSide),
                      ("_on_client_frames", ConsumerSide)):
        setattr(server, name, getattr(cls, name).__get__(server))
    try:
        Server._from_consumers(server, {server.clients: zmq.POLLIN})
        assert handled == [first, then]
    finally:
        box.close(), up.close()
