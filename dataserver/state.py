"""The scheduler's records: a dataset, a batch (:class:`Entry`), a consumer, a worker.

Plain state, kept by :class:`dataserver.scheduler.Scheduler`; an Entry's ``state`` is one of
PENDING (wanted, queued), RUNNING (a worker writes it into a slot), READY (announced).
"""

from __future__ import annotations

import heapq
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["PENDING", "READY", "RUNNING", "ConsumerState", "Dataset", "Entry", "SendOrder",
           "WorkerState"]

PENDING, RUNNING, READY = 0, 1, 2


@dataclass
class Dataset:
    """One served Sequence: its name, length and order."""

    name: str
    length: int
    shuffle: bool = False
    seed: int = 0
    epoch_running: int = 0  # thread workers: the epoch the shared Sequence is in
    orders: OrderedDict[int, Sequence[int]] = field(default_factory=OrderedDict)
    # generator datasets: items in production, made and not yet handed out, made per worker
    # index (a replacement skips that many), and the worker indices whose generator ended
    stream: bool = False
    producing: int = 0
    ready: deque[Entry] = field(default_factory=deque)
    made: Counter[int] = field(default_factory=Counter)
    exhausted: set[int] = field(default_factory=set)
    next_item: int = 0

    def order(self, epoch: int) -> Sequence[int]:
        """Batch indices in the order of ``epoch``: identity, or a permutation derived from the
        seed and the epoch only (so every consumer and every shard agrees)."""
        if not self.shuffle:
            return range(self.length)
        perm = self.orders.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.length).tolist()
            self.orders[epoch] = perm
            while len(self.orders) > 4:
                self.orders.popitem(last=False)
        return perm


class Entry:
    __slots__ = ("attempts", "bid", "ds", "epoch", "index", "keep", "layout", "leases", "nbytes",
                 "pos", "probe", "segment", "slot", "started", "state", "stream", "suspect",
                 "urgent", "waiters", "worker")

    def __init__(self, bid: int, ds: int, epoch: int, index: int) -> None:
        self.bid = bid
        self.ds = ds
        self.epoch = epoch
        self.index = index
        self.state = PENDING
        self.slot = -1
        self.segment = ""
        self.nbytes = 0
        self.layout = b""
        self.attempts = 0
        self.worker = -1
        self.started = 0.0
        self.leases = 0
        self.waiters: list[tuple[bytes, int]] = []
        self.urgent = False
        self.pos = -1  # position in its epoch's order when a Want created it (-1: a Fetch)
        self.stream = False  # an item of a generator dataset: handed to one consumer
        self.keep = False  # produced before anyone asked: kept until first delivered
        self.probe = False  # the slot-sizing batch: cached in its own segment like a slot
        self.suspect = False  # was queued on a worker that died: run it alone next time


class SendOrder:
    """Announcements for a frames consumer leave in its position order.

    A frames consumer gets each batch's bytes with its announcement, over one socket that
    carries them one after another. Sent in the order workers finish them, a batch finished
    early takes the socket's time before the one the consumer is waiting for (at 32 MiB, ~20 ms
    each). So an announcement is held until every position owed to this consumer before it has
    been sent or settled (failed, or dropped at the epoch's end). Held batches keep their
    leases, as an shm consumer holds the slots of batches it reads later.
    """

    __slots__ = ("_floor", "_heap", "_held", "_owed", "_seq")

    def __init__(self) -> None:
        self._owed: Counter[tuple[int, int]] = Counter()
        self._heap: list[tuple[int, int]] = []  # owed keys, lazily deleted
        self._held: list[tuple[tuple[int, int], int, list[Any]]] = []
        self._seq = 0
        self._floor = (-1, -1)  # the consumer is blocked here: nothing before it holds it back

    def owe(self, epoch: int, pos: int) -> None:
        key = (epoch, pos)
        self._owed[key] += 1
        heapq.heappush(self._heap, key)

    def settle(self, epoch: int, pos: int) -> None:
        key = (epoch, pos)
        if self._owed[key] > 1:
            self._owed[key] -= 1
        else:
            self._owed.pop(key, None)

    def blocked_at(self, epoch: int, pos: int) -> None:
        """The consumer waits for this position (an urgent want): it has skipped whatever it
        still owes before it (``at()`` forward), so that no longer holds anything back. Where
        it went back (the epoch read again), the order holds again from here."""
        self._floor = (epoch, pos)

    def hold(self, epoch: int, pos: int, item: list[Any]) -> None:
        heapq.heappush(self._held, ((epoch, pos), self._seq, item))
        self._seq += 1

    def sendable(self) -> list[list[Any]]:
        """Held announcements with nothing owed before them, in position order."""
        heap, owed = self._heap, self._owed
        while heap and heap[0] not in owed:
            heapq.heappop(heap)
        out = []
        while self._held and (not heap or self._held[0][0] <= max(heap[0], self._floor)):
            out.append(heapq.heappop(self._held)[2])
        return out

    def __len__(self) -> int:
        return len(self._held)


@dataclass
class ConsumerState:
    cid: bytes
    pid: int
    same_host: bool
    name: str
    ds: int
    leases: Counter[int] = field(default_factory=Counter)
    waiting: int = 0
    epoch: int = 0
    position: int = 0  # where its latest Want starts
    asked: int = 0  # it asked for every position of ``epoch`` before this (its Want's stop)
    step: int = 1  # its shard's stride (world size) ...
    phase: int = 0  # ... and its rank: it reads the positions p with p % step == phase
    wanted: float = 0.0  # time.monotonic() of its latest Want (0: none yet)
    gone: bool = False  # said Bye but still holds views (leases kept until its pid exits)
    frames: bool = False  # gets batch bytes as ZeroMQ frames (cannot map the ring)
    order: SendOrder = field(default_factory=SendOrder)  # frames only: send in position order
    # frames only: (epoch, position) announced and its frames not all gone (held in ``order``,
    # queued or being sent): what an urgent Want must not announce again
    sending: Counter[tuple[int, int]] = field(default_factory=Counter)
    takes: int = 0  # generator items asked for and not yet handed over
    ended: bool = False  # told that its generator dataset ended
    joined: float = field(default_factory=time.monotonic)
    seen: float = field(default_factory=time.monotonic)  # last message or heartbeat
    delivered: int = 0
    bytes: int = 0


@dataclass
class WorkerState:
    wid: int  # incarnation
    index: int  # stable worker index
    pid: int = 0
    ready: bool = False
    epoch: int = 0
    inflight: dict[int, None] = field(default_factory=dict)  # bids in the order sent; first runs
    isolated: bool = False  # runs a suspect batch alone
    retiring: str = ""  # why it takes no more work and stops once idle (caps); "" if not
    done: int = 0
    errors: int = 0
    started: float = field(default_factory=time.monotonic)
    frames: bool = False  # sends batches as frames (a Ray actor that cannot see the ring)
    host: str = ""  # node name, as the worker reports it
    memory: dict[str, int | None] = field(default_factory=dict)  # as a Ray worker reports it
