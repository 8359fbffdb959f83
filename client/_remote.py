"""RemoteSequence: ordered, prefetched, zero-copy access to a dataserver's batches."""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from dataserver._proc import pid_namespace
from dataserver.config import default_endpoint
from dataserver.errors import (
    ProtocolError,
    RemoteError,
    WorkerDiedError,
)
from dataserver.layout import BatchFormatError
from dataserver.protocol import (
    VERSION,
    Bye,
    EpochEnd,
    Failed,
    Fetch,
    Hello,
    Release,
    Take,
    UseFrames,
    Welcome,
)

from ._batches import FrameBatches, ShmBatches
from ._channel import Channel
from ._positions import Item, Positions
from ._receive import Receiver

__all__ = ["RemoteSequence"]

class RemoteSequence(Receiver):
    """A Sequence whose batches a dataserver makes.

    Args:
        endpoint: where the server listens (``ipc:///path.sock`` or ``tcp://host:port``);
            default ``$DATASERVER_ENDPOINT``, else the server's default socket.
        dataset: which of the server's datasets to read.
        copy: return owned, writable arrays instead of read-only shared-memory views.
        timeout: seconds without any answer from the server before ``ServerUnavailable``.
            A slow batch is not a silent server: the client pings while it waits.
        prefetch: batches requested ahead of the one being read (default: the server's).
        shard: ``(rank, world)`` for data-parallel ranks: this consumer sees positions
            ``rank, rank + world, ...`` of each epoch's order; ``len()`` is the shard's length.
            The shards of one epoch cover every batch exactly once, and every rank sees the
            same permutation when the server shuffles.
        resume: a :meth:`state` saved earlier: continue from exactly the next batch.
        transport: "shm" (map the server's shared memory: zero copies), "frames" (the batch
            bytes travel as ZeroMQ frames: for a consumer on another host or without the
            server's /dev/shm), or "auto" (default: shm if this process sees the server's
            ring file, else frames).
        curve_keys: a folder made by ``dataserver keys`` (default ``$DATASERVER_CURVE_KEYS``)
            for a server started with ``--curve-keys``: encrypted, authenticated.

    States: open -> closed (``close()``, or leaving a ``with`` block). A RemoteSequence is
    used from one thread at a time.
    """

    def __init__(self, endpoint: str | None = None, *, dataset: str = "default",
                 copy: bool = False, timeout: float = 30.0, prefetch: int | None = None,
                 shard: tuple[int, int] | None = None, resume: dict[str, Any] | None = None,
                 transport: str = "auto", curve_keys: str | None = None,
                 name: str = "") -> None:
        dataset, self.shard = _checked_args(dataset, timeout, transport, shard, resume)
        self.endpoint = endpoint or default_endpoint()
        self.copy = copy
        self.timeout = timeout
        self._closed = False
        self._channel = Channel(self.endpoint, curve_keys)
        try:  # connected: whatever fails from here closes the channel again
            label = name or f"{socket.gethostname()}:{os.getpid()}"
            self._welcomed(self._channel.hello(
                Hello(VERSION, dataset, os.getpid(), pid_namespace(), label), self.timeout),
                transport, prefetch)
        except BaseException:
            self._abort()
            raise
        self._resumed = False
        if resume is not None:
            self._resume(resume)

    def _welcomed(self, w: Welcome, transport: str, prefetch: int | None) -> None:
        """Take the server's Welcome: the dataset's geometry, liveness, the transport."""
        rank, world = self.shard
        self.dataset = w.dataset
        self.total = w.length  # batches in the whole epoch; len() is this shard's
        self._len = len(range(rank, w.length, world))
        self.stream = w.stream  # a generator dataset: no length, items in the order made
        self._sbuf: deque[Item] = deque()
        self._outstanding = 0  # generator items asked for and not yet received
        self._ended = False
        if not self._len and not self.stream:
            raise ValueError(f"shard {rank} of {world} is empty: the dataset has only "
                             f"{w.length} batches")
        self.shuffle = w.shuffle
        self.seed = w.seed
        self.server_id = w.server_id
        self.slots = w.slots
        self.slot_bytes = w.slot_bytes
        self.prefetch = prefetch or w.prefetch
        self._heartbeat = w.heartbeat_s
        same_host = bool(w.pidns) and w.pidns == pid_namespace()
        self._server_pid = w.pid if same_host else 0
        if not same_host:  # the server cannot see our pid: tell it we are alive
            self._channel.start_heartbeats(w.heartbeat_s)
        self.transport = self._choose_transport(transport, w)
        self._batches: ShmBatches | FrameBatches
        if self.transport == "shm" and w.ring:
            self._batches = ShmBatches(Path(w.shm_dir), w.ring, w.server_id, self.copy)
            if same_host:
                self._channel.request_pipes(self.timeout)
        else:
            self._batches = FrameBatches(self.copy, keep=self.prefetch + 2)
            self._channel.read_frames = self._batches.read
            self._send(UseFrames())
        self._release_batch = max(1, (self.slots - self.prefetch) // 2)
        self._pos = Positions(self._len, self.shard, self.prefetch)

    def _abort(self) -> None:
        """Construction failed after connecting: leave without a word (nothing is held)."""
        self._closed = True
        self._channel.close([])

    def _choose_transport(self, transport: str, w: Welcome) -> str:
        if transport != "auto":
            return transport
        try:
            st = os.stat(Path(w.shm_dir) / w.ring)
        except OSError:
            return "frames"
        return "shm" if f"{st.st_dev}:{st.st_ino}" == w.ring_id else "frames"

    # --- turning announcements into batches -------------------------------------------------

    def _materialize(self, item: Item) -> Any:
        if isinstance(item, Failed):
            raise _error(item)
        try:
            batch = self._batches.build(item)
        except (BatchFormatError, ProtocolError) as exc:
            raise ProtocolError(f"the server's announcement of batch {item[2]} (epoch "
                                f"{item[0]}) is malformed: {exc}") from None
        if len(self._batches.releases) >= self._release_batch:
            self._flush_releases()
        return batch

    # --- the stream of positions ------------------------------------------------------------

    def _top_up(self) -> None:
        for want in self._pos.top_up():
            self._send(want)

    def _next_item(self) -> Any:
        """The next generator item (StopIteration once the stream ended)."""
        self._check_open()
        self._take_more()
        if not self._sbuf and not self._ended:
            self._wait(lambda: bool(self._sbuf) or self._ended)
        if not self._sbuf:
            raise StopIteration
        item = self._sbuf.popleft()
        self._take_more()
        return self._materialize(item)

    def _take_more(self) -> None:
        if not self._ended and self._outstanding <= self.prefetch // 2:
            count = self.prefetch - self._outstanding
            self._send(Take(count))
            self._outstanding += count

    def _next(self) -> Any:
        pos = self._pos
        g = pos.cursor
        self._top_up()
        item = pos.buffer.pop(g, None)
        if item is None:
            epoch, p = divmod(g, self._len)
            self._wait(lambda: g in pos.buffer, pos.want(epoch, p, p + 1, True))
            item = pos.buffer.pop(g)
        pos.cursor = g + 1
        return self._materialize(item)

    def _skip_to(self, g: int) -> None:
        for item in self._pos.skip_to(g):
            self._drop(item)

    # --- the Sequence interface -------------------------------------------------------------

    def __len__(self) -> int:
        if self.stream:
            raise TypeError(f"dataset {self.dataset!r} is served from generators: it has no "
                            "length; iterate it (items come in the order they are made)")
        return self._len

    @property
    def epoch(self) -> int:
        """The epoch this consumer reads: 0 at first, one more after each on_epoch_end()."""
        return self._pos.epoch

    def __getitem__(self, index: int) -> Any:
        """The batch at ``index``. Reading indices in order (0, 1, 2, ...) is prefetched;
        any other index is fetched on demand."""
        self._check_open()
        if self.stream:
            raise TypeError(f"dataset {self.dataset!r} is served from generators: iterate it")
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"batch index must be an int, not {type(index).__name__}")
        i = int(index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"batch index {index} out of range for {self._len} batches")
        if not self.shuffle or self.shard[1] > 1:
            return self.at(i)
        return self._fetch(i)

    def at(self, position: int) -> Any:
        """The batch at ``position`` of this epoch's order (the server's permutation when
        shuffling; the same as ``seq[position]`` otherwise). Reading positions in order is
        prefetched, as iteration is; this is what framework adapters call."""
        self._check_open()
        if not 0 <= position < self._len:
            raise IndexError(f"position {position} out of range for {self._len} batches")
        g = self._pos.epoch * self._len + position
        if self._pos.cursor <= g < self._pos.cursor + max(self.prefetch, 1) + 1:
            self._skip_to(g)
            return self._next()
        if not self.shuffle:
            return self._fetch(self.shard[0] + position * self.shard[1])
        self._skip_to(g)  # out of sequence under shuffling: restart the stream there
        return self._next()

    def _fetch(self, index: int) -> Any:
        fetched = self._pos.fetched
        key = (self._pos.epoch, index)
        self._send(Fetch(*key))
        self._wait(lambda: bool(fetched.get(key)))
        queue = fetched[key]
        item = queue.popleft()
        if not queue:
            del fetched[key]
        return self._materialize(item)

    def __iter__(self) -> Iterator[Any]:
        """One epoch, in order: positions 0..len-1 (the server's permutation when shuffling).
        Iterating again restarts the epoch, except right after ``resume=``, where the first
        iteration continues from the saved position."""
        self._check_open()
        if self.stream:
            return _StreamIterator(self)
        start = self._pos.epoch * self._len
        if self._pos.cursor != start and not self._resumed:
            if self._pos.cursor > start:  # the same epoch again: stop prefetching the next one
                self._pos.speculate = False
            self._skip_to(start)
        self._resumed = False
        return _EpochIterator(self, self._pos.epoch)

    def on_epoch_end(self) -> None:
        """End this consumer's epoch: the next iteration reads the next epoch's order.
        (A generator dataset has no epochs: nothing happens.)"""
        self._check_open()
        if self.stream:
            return
        epoch = self._pos.epoch
        unneeded = self._pos.end_epoch()
        self._send(EpochEnd(epoch))
        for item in unneeded:
            self._drop(item)

    def state(self) -> dict[str, Any]:
        """Where this consumer is, as a small dict to save beside a checkpoint:
        ``RemoteSequence(..., resume=state)`` continues from exactly the next batch, in the same
        order (same dataset, shard, seed)."""
        epoch, position = divmod(self._pos.cursor, self._len)
        return {"dataset": self.dataset, "epoch": epoch, "position": position,
                "shard": list(self.shard), "length": self._len, "total": self.total,
                "shuffle": self.shuffle, "seed": self.seed}

    def _resume(self, state: dict[str, Any]) -> None:
        for key, have in (("length", self._len), ("total", self.total),
                          ("shuffle", self.shuffle), ("seed", self.seed)):
            if key in state and state[key] != have:
                self.close()
                raise ValueError(f"cannot resume: the saved state has {key}={state[key]!r}, "
                                 f"this server's {self.dataset!r} has {have!r}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self._len:
            self.close()
            raise ValueError(f"cannot resume at epoch {epoch}, position {position}")
        self._pos.resume(epoch, position)
        self._resumed = True  # the first iteration continues from here

    def held(self) -> int:
        """How many batches this process still references (each keeps one slot leased)."""
        return self._batches.held()

    def as_keras(self, **kw: Any) -> Any:
        """This sequence as a ``keras.utils.PyDataset`` (Keras 3; a ``keras.utils.Sequence``
        for Keras 2) for ``fit``/``evaluate``/``predict``, with no Keras worker pool on top.
        ``kw``: ``keras_module``. See ``dataserver.client._adapters``."""
        from dataserver.client import _adapters

        return _adapters.as_keras(self, **kw)

    def as_torch(self, **kw: Any) -> Any:
        """This sequence as a ``torch.utils.data.IterableDataset`` of batches whose arrays are
        tensors sharing the shared memory (no copy); each pass is one epoch. ``kw``:
        ``pin_memory``. See ``dataserver.client._adapters``."""
        from dataserver.client import _adapters

        return _adapters.as_torch(self, **kw)

    # --- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Leave the server. Arrays still referenced stay valid: their slots stay leased until
        this process exits. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for item in [*self._pos.clear(), *self._sbuf]:
            self._drop(item)
        self._sbuf.clear()
        held = self._batches.detach()
        released = self._batches.take_releases()
        self._channel.close([*([Release(released)] if released else []), Bye(held)])

    def __enter__(self) -> RemoteSequence:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"epoch {self._pos.epoch}"
        return f"<RemoteSequence {self.dataset!r} at {self.endpoint}: {self._len} batches, {state}>"


class _StreamIterator:
    """Items of a generator dataset in the order they are made, until every generator ends."""

    def __init__(self, seq: RemoteSequence) -> None:
        self.seq = seq

    def __iter__(self) -> _StreamIterator:
        return self

    def __next__(self) -> Any:
        return self.seq._next_item()


class _EpochIterator:
    def __init__(self, seq: RemoteSequence, epoch: int) -> None:
        self.seq = seq
        self.epoch = epoch
        self.end = (epoch + 1) * len(seq)

    def __iter__(self) -> _EpochIterator:
        return self

    def __next__(self) -> Any:
        seq = self.seq
        if seq._closed or seq._pos.epoch != self.epoch or seq._pos.cursor >= self.end:
            raise StopIteration
        return seq._next()


def _checked_args(dataset: str, timeout: float, transport: str, shard: tuple[int, int] | None,
                  resume: dict[str, Any] | None) -> tuple[str, tuple[int, int]]:
    """RemoteSequence's arguments checked before connecting: the dataset and (rank, world)."""
    if timeout <= 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout}")
    if transport not in ("auto", "shm", "frames"):
        raise ValueError(f"transport must be auto, shm or frames, got {transport!r}")
    if resume is not None:
        dataset = resume.get("dataset", dataset)
        saved = tuple(resume.get("shard", (0, 1)))
        if shard is not None and tuple(shard) != saved:
            raise ValueError(f"shard={shard} differs from the resumed state's {saved}")
        shard = (int(saved[0]), int(saved[1]))
    rank, world = shard or (0, 1)
    if not (isinstance(world, int) and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
    return dataset, (rank, world)


def _error(f: Failed) -> Exception:
    if f.kind == "died":
        return WorkerDiedError(index=f.index, epoch=f.epoch, reason=f.message)
    return RemoteError(index=f.index, epoch=f.epoch, type_name=f.type_name, message=f.message,
                       traceback=f.traceback, worker=f.worker, pid=f.pid)
