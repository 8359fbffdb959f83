"""The server's side facing its consumers: their messages (socket and FIFOs), the handshake,
and sending announcements (FIFO, socket, or ZeroMQ frames with the batch bytes).

A mixin of :class:`dataserver.server.Server`, which owns the state these methods use.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import msgpack
import zmq

from dataserver import shm
from dataserver._proc import pid_namespace
from dataserver.errors import ProtocolError
from dataserver.fifo import MAX_MESSAGE, Inbox, Outbox
from dataserver.monitor import STATUS_READS, Monitor
from dataserver.protocol import (
    MAX_CONSUMER_MESSAGE_BYTES,
    VERSION,
    Alive,
    Bye,
    EpochEnd,
    Fetch,
    Hello,
    Message,
    OpenPipes,
    Ping,
    Pipes,
    Pong,
    Ready,
    Refused,
    Release,
    Stacks,
    Status,
    StatusReply,
    Take,
    UseFrames,
    Want,
    Welcome,
    decode,
    encode,
    frame_chunks,
    send_tracked,
)
from dataserver.scheduler import ConsumerState, Scheduler

if TYPE_CHECKING:
    from dataserver.server import Server

__all__ = ["DATASET", "ConsumerSide"]

log = logging.getLogger("dataserver")
DATASET = "default"
HEARTBEAT_S = 1.0
#: A frames consumer's batches travel in messages of about this many bytes: small batches
#: share one, a batch this big or bigger goes alone.
FRAMES_MESSAGE_BYTES = 1 << 20


class ConsumerSide:
    # the Server's state these methods use (set in Server.__init__)
    server_id: str
    shm_dir: Path
    ring: shm.Segment | None
    ring_name: str
    ring_id: str
    prefetch: int
    rundir: Path | None
    clients: zmq.Socket[bytes] | None
    sched: Scheduler | None
    monitor: Monitor
    up: Inbox | None
    _pipes: dict[bytes, tuple[int, Inbox, Outbox]]
    _by_token: dict[int, bytes]
    _next_token: int
    _in_flight_frames: deque[tuple[Any, bytes, list[list[Any]], list[shm.Segment]]]

    def _send_client(self, cid: bytes, data: bytes) -> bool:
        """Send through the consumer's FIFO if it has one and ``data`` fits, else the socket.
        False only when it was too long for the FIFO and the caller may split it. What goes
        this way may arrive out of order (announcements and failures are filed by position);
        StreamEnd, which must come last, goes by socket (see Server._flush)."""
        pipe = self._pipes.get(cid)
        if pipe is not None and pipe[2].send(data):
            return True
        if pipe is not None and len(data) > MAX_MESSAGE:
            return False
        self._send_client_socket(cid, data)
        return True

    def _send_client_socket(self, cid: bytes, data: bytes) -> None:
        assert self.clients is not None
        self.clients.send_multipart([cid, data])

    def _send_ready(self, cid: bytes, items: list[list[Any]]) -> None:
        data = encode(Ready(items))
        if self._send_client(cid, data):
            return
        if len(items) == 1:  # one announcement longer than a FIFO write: the socket
            self._send_client_socket(cid, data)
            return
        half = len(items) // 2
        self._send_ready(cid, items[:half])
        self._send_ready(cid, items[half:])

    def _open_pipes(self, cid: bytes) -> str | None:
        sched = self.sched
        assert sched is not None and self.clients is not None and self.rundir is not None
        c = sched.consumers.get(cid)
        if c is None or not c.same_host or c.frames or self.up is None:
            return "OpenPipes is for a consumer on the server's host that maps the ring"
        self._close_pipes(cid)
        token = self._next_token
        self._next_token += 1
        down = Inbox(str(self.rundir / f"down-{token}.fifo"))  # we own it; the consumer reads
        self._pipes[cid] = (token, down, Outbox(down.path, token))
        self._by_token[token] = cid
        self.clients.send_multipart([cid, encode(Pipes(down.path, self.up.path, token))])
        return None

    def _close_pipes(self, cid: bytes) -> None:
        pipe = self._pipes.pop(cid, None)
        if pipe is not None:
            token, down, out = pipe
            self._by_token.pop(token, None)
            out.close()
            down.close()

    def _on_up(self) -> None:
        """Consumer messages from the up FIFO: the same handling as the socket's."""
        assert self.up is not None
        for token, data in self.up.read():
            cid = self._by_token.get(token)
            if cid is not None:  # else a consumer that left (or a stranger): nothing to answer
                self._on_client_data(cid, data)

    def _send_frames(self, cid: bytes, ready: list[list[Any]]) -> None:
        """Batches in messages of about FRAMES_MESSAGE_BYTES: small ones together, big ones
        alone (ZeroMQ hands over a message whole: two 32 MiB batches in one would keep the
        consumer waiting for the second before it could read the first)."""
        start = total = 0
        for i, item in enumerate(ready):
            total += item[6]
            if total >= FRAMES_MESSAGE_BYTES:
                self._send_frames_message(cid, ready[start : i + 1])
                start, total = i + 1, 0
        if start < len(ready):
            self._send_frames_message(cid, ready[start:])

    def _send_frames_message(self, cid: bytes, ready: list[list[Any]]) -> None:
        """Ready, then each batch's bytes sent from shared memory without a copy (pyzmq
        copy=False), in frames (``frame_chunks``). The leases end when the tracker says the
        frames have left."""
        assert self.clients is not None and self.ring is not None
        views: list[Any] = []
        keep: list[shm.Segment] = []
        for _epoch, _pos, _index, _bid, segment, offset, nbytes, _layout in ready:
            if segment:
                seg = shm.attach(self.shm_dir / segment, writable=False)
                keep.append(seg)
                view = memoryview(seg.mm)[:nbytes]
            else:
                view = memoryview(self.ring.mm)[offset : offset + nbytes]
            views.extend(frame_chunks(view))
        tracker = send_tracked(self.clients, [cid, encode(Ready(ready)), *views])
        self._in_flight_frames.append((tracker, cid, ready, keep))

    def _reap_frames(self) -> None:
        """End the leases of batches whose frames have left."""
        assert self.sched is not None
        while self._in_flight_frames and self._in_flight_frames[0][0].done:
            _tracker, cid, items, keep = self._in_flight_frames.popleft()
            self.sched.sent(cid, items)
            self.sched.release(cid, [item[3] for item in items])
            for seg in keep:
                seg.close()

    def _on_client_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            if frames:
                self._refuse(frames[0], "send one frame per message")
            return
        self._on_client_data(frames[0], frames[1])

    def _on_client_data(self, cid: bytes, data: bytes) -> None:
        """One consumer message, from the socket or the up FIFO: checked, handled, refused
        with the reason when it is bad."""
        try:
            msg = decode(data, MAX_CONSUMER_MESSAGE_BYTES)
        except ProtocolError as exc:
            self.sched.stats["bad_messages"] += 1  # type: ignore[union-attr]
            self._refuse(cid, str(exc))
            return
        reason = self._on_client(cid, msg)
        if reason:
            self._refuse(cid, reason)

    def _refuse(self, cid: bytes, reason: str) -> None:
        assert self.clients is not None
        self.clients.send_multipart([cid, encode(Refused(reason))])

    def _on_client(self, cid: bytes, msg: Message) -> str | None:
        sched = self.sched
        assert sched is not None and self.clients is not None
        c = sched.consumers.get(cid)
        if c is not None:
            c.seen = time.monotonic()
        if isinstance(msg, Alive):
            owner = sched.consumers.get(msg.consumer)
            if owner is not None:
                owner.seen = time.monotonic()
            return None
        if isinstance(msg, Want):
            return sched.want(cid, msg.epoch, msg.start, msg.stop, msg.step, msg.urgent)
        if isinstance(msg, Take):
            return sched.take(cid, msg.count)
        if isinstance(msg, UseFrames):
            if c is None:
                return "UseFrames before Hello; send Hello first"
            c.frames = True
            self._close_pipes(cid)
            return None
        if isinstance(msg, OpenPipes):
            return self._open_pipes(cid)
        if isinstance(msg, Release):
            return sched.release(cid, msg.bids)
        if isinstance(msg, Fetch):
            return sched.fetch(cid, msg.epoch, msg.index)
        if isinstance(msg, Ping):
            self.clients.send_multipart([cid, encode(Pong())])
            return None
        if isinstance(msg, (Status, Stacks)):
            snap = self.monitor.snapshot(cast("Server", self), fresh=STATUS_READS)
            if isinstance(msg, Stacks):
                snap["stacks"] = cast("Server", self)._stacks()
            snapshot = msgpack.packb(snap, use_bin_type=True)
            self.clients.send_multipart([cid, encode(StatusReply(snapshot))])
            return None
        if isinstance(msg, EpochEnd):
            sched.epoch_end(cid, msg.epoch)
            return None
        if isinstance(msg, Bye):
            sched.remove_consumer(cid, msg.held)
            self._close_pipes(cid)
            log.info("consumer %s left", c.name if c else cid.hex())
            return None
        if isinstance(msg, Hello):
            return self._hello(cid, msg)
        return f"{type(msg).__name__} is not a consumer message"

    def _hello(self, cid: bytes, msg: Hello) -> str | None:
        sched = self.sched
        assert sched is not None and self.clients is not None
        if msg.version != VERSION:
            return (f"protocol version {msg.version} is not this server's {VERSION}; install the "
                    "same dataserver version on both sides")
        names = [d.name for d in sched.datasets]
        if msg.dataset in names:
            ds = names.index(msg.dataset)
        elif msg.dataset in ("", DATASET) and len(names) == 1:
            ds = 0
        else:
            return (f"no dataset {msg.dataset!r} here; this server serves "
                    f"{', '.join(map(repr, names))}: pass dataset=NAME")
        d = sched.datasets[ds]
        if cid in sched.consumers:
            sched.remove_consumer(cid)
        self._close_pipes(cid)
        same_host = bool(msg.pidns) and msg.pidns == pid_namespace()
        sched.add_consumer(ConsumerState(cid, msg.pid, same_host, msg.name[:200], ds))
        log.info("consumer %s joined %s", msg.name[:200], d.name)
        self.clients.send_multipart([cid, encode(Welcome(
            VERSION, self.server_id, d.name, d.length, d.shuffle, d.seed,
            str(self.shm_dir), self.ring_name, sched.slot_bytes, sched.slots, self.prefetch,
            os.getpid(), pid_namespace(), HEARTBEAT_S, d.stream, self.ring_id,
        ))])
        return None
