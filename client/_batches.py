"""Turning a Ready item into a batch: the client's transport seam.

* :class:`ShmBatches` maps the server's ring (and its one-off segments) read-only and builds
  each batch as views of its slot. The slot stays leased while any view lives; when the last
  one dies a weak-reference callback queues the batch's release, which RemoteSequence sends
  in groups.
* :class:`FrameBatches` reads the server's messages off the socket with each batch's bytes (a
  consumer on another host) and builds the batch over them: a small batch over the ZeroMQ frame
  it came in, a big one (several frames) over a buffer it recycles once the batch's last view
  dies. The server released the slot when it sent the bytes, so there is no lease.

Both take the same Ready items (``[epoch, pos, index, bid, segment, offset, nbytes, layout]``,
frames add the bytes: a zmq.Frame, or a region of a recycled buffer) and have the same surface,
so RemoteSequence does not know which it has.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import weakref
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from dataserver import layout, shm
from dataserver.errors import ProtocolError
from dataserver.protocol import FRAME_CHUNK, FRAMES_SPLIT, Message, Ready, decode

__all__ = ["FrameBatches", "ShmBatches"]


def segment_path(shm_dir: Path, name: str, server_id: str) -> Path:
    """The segment the server named, refused unless it is one of that server's own files:
    a plain name under ``shm_dir`` with the server's prefix (the name comes off a socket)."""
    if not shm.owned_by(server_id, name):
        raise ProtocolError(f"the server named a segment {name!r} that is not one of its own")
    return shm_dir / name


class ShmBatches:
    def __init__(self, shm_dir: Path, ring: str, server_id: str, copy: bool) -> None:
        self.shm_dir = shm_dir
        self.server_id = server_id
        self.copy = copy
        self.ring = (shm.attach(segment_path(shm_dir, ring, server_id), writable=False)
                     if ring else None)
        self.releases: deque[tuple[int, int]] = deque()  # (token, bid), queued by callbacks
        # token -> the weak reference whose callback queues the release, and the batch id (a
        # weakref.ref with a callback costs 0.5 us, weakref.finalize 1.7 us)
        self.live: dict[int, tuple[weakref.ref[Any], int]] = {}
        self._tokens = itertools.count()

    def build(self, item: list[Any]) -> Any:
        _epoch, _pos, _index, bid, segment, offset, nbytes, lay = item[:8]
        if segment:
            mm = shm.attach(segment_path(self.shm_dir, segment, self.server_id),
                            writable=False).mm
        else:
            assert self.ring is not None
            mm = self.ring.mm
        if offset + nbytes > len(mm):
            raise ProtocolError(f"{nbytes} bytes at {offset} lie outside the {len(mm)}-byte "
                                f"segment {segment or 'ring'}")
        # a base of its own (not a slice of one array over the ring: numpy would make the
        # views' base that array, and the callback below would fire at once)
        region = np.frombuffer(mm, np.uint8, count=nbytes, offset=offset)
        batch = layout.build(lay, region, copy=self.copy)
        if self.copy:
            self.releases.append((-1, bid))
        else:
            token = next(self._tokens)
            queue = self.releases.append
            self.live[token] = (weakref.ref(region, lambda _r: queue((token, bid))), bid)
        return batch

    def drop(self, item: list[Any]) -> None:
        """An item never turned into a batch: its lease goes back with the next releases."""
        self.releases.append((-1, item[3]))

    def take_releases(self) -> list[int]:
        bids = []
        while self.releases:
            token, bid = self.releases.popleft()
            self.live.pop(token, None)
            bids.append(bid)
        return bids

    def held(self) -> int:
        return sum(1 for ref, _bid in self.live.values() if ref() is not None)

    def detach(self) -> list[int]:
        """Closing: stop watching the live batches (they keep their slots until this process
        exits; a dropped weak reference calls nothing) and return their ids."""
        held = [bid for ref, bid in self.live.values() if ref() is not None]
        self.live.clear()
        return held


class FrameBatches:
    """Batches that come as frames. A batch of more than ``FRAMES_SPLIT`` bytes is received
    into a buffer kept from an earlier batch: ZeroMQ would receive it into memory it allocates,
    which glibc maps afresh for every allocation of 32 MiB or more, so each such batch cost its
    8k page faults again (about half the time a 32 MiB batch took to arrive)."""

    def __init__(self, copy: bool, keep: int) -> None:
        self.copy = copy
        self.keep = keep  # buffers kept, lent or spare: the batches in flight and in hand
        self.releases: deque[tuple[int, int]] = deque()  # always empty: no leases
        self.live: dict[int, Any] = {}  # always empty: the server holds no slot for us
        self._spare: list[mmap.mmap] = []  # buffers no batch uses now, oldest first
        # token -> the weak reference whose callback makes a buffer spare again
        self._lent: dict[int, weakref.ref[Any]] = {}
        self._tokens = itertools.count()

    def read(self, sock: zmq.Socket[bytes]) -> Message:
        """The next message on ``sock`` (zmq.Again if none), a Ready's items each with its
        batch's bytes appended: checked against the sizes announced, which came off a socket."""
        msg = decode(sock.recv(zmq.NOBLOCK))
        try:
            if isinstance(msg, Ready):
                for item in msg.items:
                    item.append(self._receive(sock, item[6]))
            if sock.getsockopt(zmq.RCVMORE):
                raise ProtocolError(f"frames beyond the batches announced follow a "
                                    f"{type(msg).__name__} message")
        except ProtocolError:
            while sock.getsockopt(zmq.RCVMORE):  # leave the socket at a message's start
                sock.recv()
            raise
        return msg

    def _receive(self, sock: zmq.Socket[bytes], nbytes: int) -> Any:
        if not sock.getsockopt(zmq.RCVMORE):
            raise ProtocolError("batch frames do not match the Ready message")
        if nbytes <= FRAMES_SPLIT:  # one frame: the batch is built over it
            return sock.recv(copy=False)
        region, view = self._buffer(nbytes)
        got = 0
        while got < nbytes:
            if got and not sock.getsockopt(zmq.RCVMORE):
                raise ProtocolError(f"a batch's frames hold {got} of the {nbytes} bytes "
                                    "announced")
            n = sock.recv_into(view[got:])
            if n > nbytes - got:
                raise ProtocolError(f"a batch's frames hold more than the {nbytes} bytes "
                                    "announced")
            got += n
        return region

    def _buffer(self, nbytes: int) -> tuple[np.ndarray[Any, Any], memoryview]:
        """``nbytes`` of a spare buffer (one at most twice as big), else of a new one: the
        batch's region, and a view of it to receive into."""
        for buf in self._spare:
            if nbytes <= len(buf) <= 2 * nbytes:
                # by identity, not index: a batch dropped in another thread may recycle (and
                # let go of the oldest) meanwhile; one let go is ours all the same
                with contextlib.suppress(ValueError):
                    self._spare.remove(buf)
                break
        else:
            try:  # private anonymous memory (huge pages measured slower: compaction)
                buf = mmap.mmap(-1, -(-nbytes // FRAME_CHUNK) * FRAME_CHUNK,
                                flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            except (OSError, OverflowError, ValueError):
                raise ProtocolError(f"cannot make room for a batch of {nbytes} bytes announced"
                                    ) from None
        # a base of its own (numpy makes a view's base the buffer, not another array), so the
        # callback fires when the batch's last view dies
        region = np.frombuffer(buf, np.uint8, count=nbytes)
        token = next(self._tokens)
        self._lent[token] = weakref.ref(region, lambda _r: self._recycle(token, buf))
        return region, memoryview(buf)[:nbytes]

    def _recycle(self, token: int, buf: mmap.mmap) -> None:
        del self._lent[token]
        self._spare.append(buf)
        if len(self._spare) + len(self._lent) > self.keep:
            # let go (not closed: the dying batch's export of it may not be released yet)
            del self._spare[0]

    def build(self, item: list[Any]) -> Any:
        data = item[8]
        region = data if isinstance(data, np.ndarray) else np.frombuffer(data.buffer, np.uint8)
        # read-only, as a ring view is: code that writes into a batch fails the same way
        # whichever transport it runs on (copy=True gives writable arrays of its own)
        region.flags.writeable = False
        return layout.build(item[7], region, copy=self.copy)

    def drop(self, item: list[Any]) -> None:
        pass

    def take_releases(self) -> list[int]:
        return []

    def held(self) -> int:
        return 0

    def detach(self) -> list[int]:
        return []
