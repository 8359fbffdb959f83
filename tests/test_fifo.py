"""The FIFO channels beside the sockets (dataserver.fifo): worker answers, and a local
consumer's short messages both ways. Whatever does not fit, or finds a FIFO full, must still
arrive over the socket."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest

import seqs
from dataserver import shm
from dataserver.client import RemoteSequence
from dataserver.fifo import MAX_MESSAGE, Inbox, Outbox
from dataserver.status import fetch_status
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
        assert rs._down is not None, "a local shm consumer reads its FIFO"
        assert any(name.startswith("down-") for name in _fifos(server))
    # the consumer left: its FIFO is gone while the server runs on
    wait_for(lambda: not any(n.startswith("down-") for n in _fifos(server)),
             "the departed consumer's FIFO to be removed")


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
        assert rs._down is None
    with RemoteSequence(server.endpoint) as rs:
        assert [int(y[0]) for _x, y in rs] == list(range(40))
