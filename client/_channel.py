"""The consumer's line to the server: one ZeroMQ DEALER socket, the FIFOs beside it once the
server grants them (``OpenPipes`` -> ``Pipes``: a local consumer's short messages both ways,
see dataserver.fifo), and a heartbeat thread for a consumer whose pid the server cannot watch.

It moves encoded messages and nothing else: what they mean is RemoteSequence's business. It
keeps their order, which matters (a Want for epoch 1 handled after one for epoch 2 makes
process workers run ``on_epoch_end`` twice before epoch 1's batches): the FIFOs are granted
before anything else is sent; a message goes by FIFO, waiting while the server drains a full
one; once one cannot (too long, or the server stalled past the timeout), every later one goes
by socket. The server handles what the FIFO holds before the socket's messages it took, so
nothing sent later overtakes.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from dataserver.curve import client_keys, secure_client
from dataserver.errors import ProtocolError, ServerUnavailable
from dataserver.fifo import Inbox, Outbox
from dataserver.protocol import (
    VERSION,
    Alive,
    Hello,
    Message,
    OpenPipes,
    Pipes,
    Refused,
    Welcome,
    decode,
    encode,
)

__all__ = ["Channel"]

#: The longest a wait on the socket blocks before its caller looks at the clock again.
POLL_SLICE_MS = 50


def _close_socket(sock: zmq.Socket[bytes], ctx: zmq.Context[zmq.Socket[bytes]],
                  beating: threading.Event) -> None:
    beating.set()  # stops the heartbeat thread, which closes its own socket
    sock.close(0)
    ctx.term()


def _heartbeats(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, identity: bytes,
                interval: float, stop: threading.Event, curve: Any) -> None:
    """Tell the server this consumer lives, from a thread of its own: a training step may keep
    the main thread away from the client for minutes."""
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    secure_client(sock, curve)
    sock.connect(endpoint)
    try:
        while not stop.wait(interval):
            sock.send(encode(Alive(identity)))
    finally:
        sock.close(0)


class Channel:
    """``send`` a message; ``poll`` for news; ``receive`` what came, FIFO records first (a
    record written before a socket message was sent is read with it, and goes first).
    ``read_frames``: batch bytes follow Ready messages on the socket; it reads one message
    with them (zmq.Again if none)."""

    def __init__(self, endpoint: str, curve_keys: str | None) -> None:
        self.endpoint = endpoint
        self.read_frames: Callable[[zmq.Socket[bytes]], Message] | None = None
        self.down: Inbox | None = None
        self.up: Outbox | None = None
        self._poller: zmq.Poller | None = None
        self.fifo_wait_s = 0.0  # how long a send waits for room in a full FIFO
        self._early: list[bytes] = []  # what came while waiting for Pipes
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        self.identity = b"c" + os.urandom(8)
        self.sock.setsockopt(zmq.IDENTITY, self.identity)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self._curve = client_keys(curve_keys)
        secure_client(self.sock, self._curve)
        self.sock.connect(endpoint)
        self._beating = threading.Event()
        self._finalizer = weakref.finalize(self, _close_socket, self.sock, self._ctx,
                                           self._beating)

    def hello(self, hello: Hello, timeout: float) -> Welcome:
        """Say Hello; the server's Welcome, or a clear error within ``timeout`` seconds."""
        self.send(hello)
        for data in self._replies(timeout):
            msg = decode(data)
            if isinstance(msg, Welcome):
                if msg.version != VERSION:
                    raise ProtocolError(
                        f"server speaks protocol {msg.version}, this client {VERSION}; "
                        "install the same dataserver version on both sides"
                    )
                return msg
            if isinstance(msg, Refused):
                raise ProtocolError(f"the server refused this client: {msg.reason}")
        raise ServerUnavailable(
            f"no dataserver answered at {self.endpoint} within {timeout:g} s; start one "
            "with `dataserver serve MODULE:SEQUENCE` (or check --endpoint / DATASERVER_ENDPOINT)"
        )

    def _replies(self, timeout: float) -> Iterator[bytes]:
        """The socket's messages as they come, for ``timeout`` seconds: a request's answer is
        among them (the caller stops there, and says what did not answer if none came)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(POLL_SLICE_MS):
                yield self.sock.recv()

    def start_heartbeats(self, interval: float) -> None:
        threading.Thread(target=_heartbeats, name="dataserver-heartbeat", daemon=True,
                         args=(self._ctx, self.endpoint, self.identity, interval,
                               self._beating, self._curve)).start()

    def send(self, msg: Message) -> None:
        data = encode(msg)
        if self.up is not None:
            if self.up.send(data, self.fifo_wait_s):
                return
            # too long for one record, or the server stalled: the socket from now on
            self.up.close()
            self.up = None
        self.sock.send(data)

    def request_pipes(self, timeout: float) -> None:
        """Ask for the FIFOs and take the answer before anything else is sent (a message sent
        by socket first could reach the server after later ones sent through them). Refused
        (the server has none), the socket stays the only path."""
        self.fifo_wait_s = timeout
        self.send(OpenPipes())
        for data in self._replies(timeout):
            msg = decode(data)
            if isinstance(msg, Pipes):
                self.open_pipes(msg)
                return
            if isinstance(msg, Refused):
                return
            self._early.append(data)  # handed over by receive()
        raise ServerUnavailable(f"the dataserver at {self.endpoint} did not answer OpenPipes "
                                f"within {timeout:g} s")

    def open_pipes(self, msg: Pipes) -> None:
        """The server granted FIFOs: read its short messages there too, write ours there."""
        try:
            down = Inbox(msg.down, create=False)
        except OSError:  # another user, another mount namespace: the socket it is
            return
        try:
            self.up = Outbox(msg.up, msg.token)
        except OSError:
            down.close()
            return
        self.down = down
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._poller.register(down.fd, zmq.POLLIN)

    def close_pipes(self) -> None:
        if self.down is not None:
            self.down.close()
        if self.up is not None:
            self.up.close()
        self.down = self.up = self._poller = None

    def poll(self, timeout_ms: int) -> bool:
        if self._early:
            return True
        return bool(self._poller.poll(timeout_ms) if self._poller is not None
                    else self.sock.poll(timeout_ms))

    def receive(self) -> list[bytes | Message]:
        """Everything waiting, FIFO records first; or, with ``read_frames``, the next message,
        decoded with its batches' bytes."""
        got: list[bytes | Message] = []
        if self.read_frames is not None:  # one message: it may hold a batch's 32 MiB to copy,
            try:  # and the batch wanted now comes first (there are no FIFOs to read after it)
                return [self.read_frames(self.sock)]
            except zmq.Again:
                return got
        while True:
            try:
                got.append(self.sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
        if self.down is not None:
            # read after the socket: whatever the FIFO holds was written before those
            got = [*(data for _token, data in self.down.read()), *got]
            if self.down.ended:  # the server closed our FIFO: the socket only, both ways
                self.close_pipes()
        if self._early:  # came before the FIFOs existed: before everything else
            got = [*self._early, *got]
            self._early.clear()
        return got

    def close(self, last: list[Message]) -> None:
        """Send ``last`` (the goodbyes), then close everything. Safe to call twice."""
        try:
            if self._finalizer.alive:
                self.fifo_wait_s = 0.0  # leaving: a stalled server gets these by socket
                for msg in last:
                    self.send(msg)
                self.sock.close(linger=1000)
        finally:
            self.close_pipes()
            self._finalizer()
