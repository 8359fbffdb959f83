"""What a RemoteSequence receives: the server's messages, filed by position, and the wait for
them (pings to a quiet server, an urgent want for a blocked batch, releases held back briefly,
a server that exited or went silent).

A mixin of :class:`~dataserver.client._remote.RemoteSequence`, which owns the state these
methods use.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from dataserver._proc import pid_alive
from dataserver.errors import ClosedError, ProtocolError, ServerUnavailable
from dataserver.protocol import (
    Failed,
    Message,
    Ping,
    Pong,
    Ready,
    Refused,
    Release,
    StreamEnd,
    Want,
    decode,
)

from ._batches import FrameBatches, ShmBatches
from ._channel import POLL_SLICE_MS, Channel
from ._positions import Item, Positions

__all__ = ["RELEASE_GRACE_MS", "URGENT_AFTER_S", "Receiver"]

#: Blocked this long on the next batch, ask the server to make it even if every slot is held.
URGENT_AFTER_S = 0.05
#: Waiting for a batch with releases held back, send them after this long without news.
RELEASE_GRACE_MS = 2
#: Batch ids per Release message: a message of 400 fits one FIFO record even as 64-bit ids.
RELEASES_PER_MESSAGE = 400


class Receiver:
    # RemoteSequence's state these methods use (set in its __init__)
    endpoint: str
    timeout: float
    stream: bool
    _closed: bool
    _channel: Channel
    _batches: ShmBatches | FrameBatches
    _pos: Positions
    _sbuf: deque[Item]
    _outstanding: int
    _ended: bool
    _server_pid: int
    _heartbeat: float
    _release_batch: int

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this RemoteSequence is closed; make a new one")

    # --- messages ---------------------------------------------------------------------------

    def _send(self, msg: Message) -> None:
        self._channel.send(msg)

    def _flush_releases(self) -> None:
        if self._batches.releases:
            bids = self._batches.take_releases()
            for start in range(0, len(bids), RELEASES_PER_MESSAGE):  # each fits a FIFO record
                self._send(Release(bids[start : start + RELEASES_PER_MESSAGE]))

    def _handle(self, data: bytes | Message) -> None:
        """One message from the server (decoded already if it came with batch frames)."""
        msg = decode(data) if isinstance(data, bytes) else data
        if self.stream and isinstance(msg, (Ready, Failed)):
            items = msg.items if isinstance(msg, Ready) else [msg]
            self._sbuf.extend(items)
            self._outstanding -= len(items)
        elif isinstance(msg, StreamEnd):
            self._ended = True
        elif isinstance(msg, Ready):
            for item in msg.items:
                self._route(item[0], item[1], item[2], item)
        elif isinstance(msg, Failed):
            self._route(msg.epoch, msg.pos, msg.index, msg)
        elif isinstance(msg, Refused):
            raise ProtocolError(f"the server refused a request: {msg.reason}")
        elif not isinstance(msg, Pong):
            raise ProtocolError(f"unexpected {type(msg).__name__} from the server")

    def _route(self, epoch: int, pos: int, index: int, item: Item) -> None:
        unneeded = self._pos.route(epoch, pos, index, item)
        if unneeded is not None:
            self._drop(unneeded)

    def _drop(self, item: Item) -> None:
        if not isinstance(item, Failed):
            self._batches.drop(item)

    def _wait(self, ready: Callable[[], bool], urgent: Want | None = None) -> None:
        """Receive until ``ready()``; ping a quiet server; give up after ``timeout`` of silence.
        Releases fewer than a batch of them wait for the next (the server does not need them
        yet: the ring has that much slack), unless nothing arrives for RELEASE_GRACE_MS or this
        consumer holds more batches than that slack allows (it keeps some alive)."""
        self._check_open()
        batches, channel = self._batches, self._channel
        if len(batches.live) > self._release_batch:
            self._flush_releases()
        start = heard = time.monotonic()
        pinged = 0.0
        while not ready():
            if channel.poll(RELEASE_GRACE_MS if batches.releases else POLL_SLICE_MS):
                for data in channel.receive():
                    self._handle(data)
                heard = time.monotonic()
                continue
            now = time.monotonic()
            if batches.releases:  # the grace ran out: send them, then wait the usual slice
                self._flush_releases()
                continue
            if urgent is not None and now - start > URGENT_AFTER_S:
                self._send(urgent)
                urgent = None
            if self._server_pid and not pid_alive(self._server_pid):
                raise ServerUnavailable(
                    f"the dataserver at {self.endpoint} (pid {self._server_pid}) exited"
                )
            if now - heard > self.timeout:
                raise ServerUnavailable(
                    f"the dataserver at {self.endpoint} did not answer for {self.timeout:g} s"
                )
            if now - heard > self._heartbeat and now - pinged > self._heartbeat:
                self._send(Ping())
                pinged = now

