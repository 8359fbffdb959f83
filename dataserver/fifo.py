"""FIFO channels: short messages between processes of one host, without ZeroMQ's threads.

The most frequent messages are short and local: the server's ``Tasks`` to a worker and the
worker's answer for each batch (``Done``, ``Raised``, ``Exhausted``), the server's ``Ready`` to
a consumer that maps the ring, and that consumer's ``Release`` and ``Want``. Over ZeroMQ each
costs two thread hops on each side (the sender's I/O thread, then the receiver's), which on a
busy machine is most of a small batch's cost. A write of at most ``PIPE_BUF`` bytes into a FIFO
is atomic and wakes the reader directly, so many writers can share one FIFO and a reader takes
many messages with one ``read``.

A record is ``<u32 length><u32 token>`` then one encoded message; the token says who wrote it
(a worker's incarnation, a consumer's number). A writer whose message is longer, or who finds
the FIFO full, sends it over its ZeroMQ socket instead, so a FIFO is only ever a faster path
beside the socket, never the only one. Where order matters (tasks to a worker, a consumer's
requests) the writer then stays on the socket, and the reader, once it has taken the socket's
messages, reads the FIFO and handles its records first, so nothing sent later overtakes what
was written here.
The FIFOs live in the server's private runtime directory (0700), like its sockets, and
whatever is read from them is checked like socket messages.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import stat
import struct
import time

__all__ = ["MAX_MESSAGE", "Inbox", "Outbox"]

_HEADER = struct.Struct("<II")
#: Longest message a FIFO carries; longer ones go over ZeroMQ.
MAX_MESSAGE = getattr(select, "PIPE_BUF", 512) - _HEADER.size
_READ_BYTES = 1 << 16


def _open_fifo(path: str, flags: int) -> int:
    """Open ``path`` only if it is a FIFO: its name may come off a socket, and writing records
    into a regular file (or opening a device) named by a hostile server would do harm."""
    if not stat.S_ISFIFO(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, f"{path} is not a FIFO")
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):  # swapped since the check
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a FIFO")
    return fd


class Inbox:
    """The reading end. ``create``: make the FIFO (and unlink it on close); else open one
    another process made. ``keep`` (the default when creating): hold a write end of our own,
    so the FIFO never reads as closed (nor polls as hung up) while no writer has it open."""

    def __init__(self, path: str, create: bool = True, keep: bool | None = None) -> None:
        self.path = path
        self.created = create
        if create:
            os.mkfifo(path, 0o600)
        self.fd = _open_fifo(path, os.O_RDONLY)
        keep = create if keep is None else keep
        self._keep = _open_fifo(path, os.O_WRONLY) if keep else -1
        self._rest = b""
        self.ended = False  # every writer closed it (only when not created here)

    def read(self) -> list[tuple[int, bytes]]:
        """Every complete record waiting: (token, message bytes)."""
        data = self._rest
        while True:
            try:
                chunk = os.read(self.fd, _READ_BYTES)
            except BlockingIOError:
                break
            if not chunk:  # end of file: the writers are gone
                self.ended = True
                break
            data += chunk
            if len(chunk) < _READ_BYTES:
                break
        out = []
        off, end = 0, len(data)
        while end - off >= _HEADER.size:
            length, token = _HEADER.unpack_from(data, off)
            if length > MAX_MESSAGE:  # not written by one of ours: drop what we have
                off = end
                break
            if end - off - _HEADER.size < length:
                break
            start = off + _HEADER.size
            out.append((token, data[start : start + length]))
            off = start + length
        self._rest = data[off:]
        return out

    def close(self) -> None:
        for fd in (self.fd, self._keep):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self._keep = -1
        if self.created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class Outbox:
    """A writing end. ``send`` returns False when the caller must use its socket instead."""

    def __init__(self, path: str, token: int) -> None:
        self.fd = _open_fifo(path, os.O_WRONLY)
        self.token = token

    def send(self, data: bytes, wait_s: float = 0.0) -> bool:
        """Write one record; False when it is too long, the reader is gone, or the FIFO is
        still full after ``wait_s`` seconds (nothing was written then)."""
        if len(data) > MAX_MESSAGE or self.fd < 0:
            return False
        record = _HEADER.pack(len(data), self.token) + data
        deadline = None
        while True:
            try:
                os.write(self.fd, record)
                return True
            except BlockingIOError:  # full (the reader is behind): nothing was written
                if wait_s <= 0:
                    return False
                now = time.monotonic()
                deadline = now + wait_s if deadline is None else deadline
                if now >= deadline:
                    return False
                poller = select.poll()
                poller.register(self.fd, select.POLLOUT)
                poller.poll(max(1, int((deadline - now) * 1000)))
            except OSError:  # the reader is gone (EPIPE): the socket will say why
                self.close()
                return False

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd = -1
