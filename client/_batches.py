"""Turning a Ready item into a batch: the client's transport seam.

* :class:`ShmBatches` maps the server's ring (and its one-off segments) read-only and builds
  each batch as views of its slot. The slot stays leased while any view lives; when the last
  one dies a weak-reference callback queues the batch's release, which RemoteSequence sends
  in groups.
* :class:`FrameBatches` builds each batch over the ZeroMQ frame its bytes came in (a consumer
  on another host); the server released the slot when it sent them, so there is no lease.

Both take the same Ready items (``[epoch, pos, index, bid, segment, offset, nbytes, layout]``,
frames add the frame) and have the same surface, so RemoteSequence does not know which it has.
"""

from __future__ import annotations

import itertools
import weakref
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from dataserver import layout, shm
from dataserver.errors import ProtocolError

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
    def __init__(self, copy: bool) -> None:
        self.copy = copy
        self.releases: deque[tuple[int, int]] = deque()  # always empty: no leases
        self.live: dict[int, Any] = {}

    def build(self, item: list[Any]) -> Any:
        return layout.build(item[7], np.frombuffer(item[8].buffer, np.uint8), copy=self.copy)

    def drop(self, item: list[Any]) -> None:
        pass

    def take_releases(self) -> list[int]:
        return []

    def held(self) -> int:
        return 0

    def detach(self) -> list[int]:
        return []
