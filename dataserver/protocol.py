"""Every message that crosses a socket. Each is a small frozen dataclass registered with its
``KIND`` and field types; :mod:`dataserver.codec` encodes them as msgpack and checks every
field of what it decodes (``encode`` and ``decode`` are re-exported here). Nothing is pickled.

Two conversations use it:

* consumer <-> server on the public endpoint (``Hello`` ... ``Bye`` one way, ``Welcome`` ...
  ``Refused`` the other). The consumer sends ``Hello`` first; a server whose ``VERSION``
  differs answers ``Refused`` and the client raises a clear error.
* server <-> worker on a private endpoint inside the server's runtime directory.

Imports only the standard library and msgpack: the client uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import zmq

from dataserver.codec import Message, decode, encode
from dataserver.codec import message as _message

__all__ = [
    "FRAMES_SPLIT",
    "FRAME_CHUNK",
    "VERSION",
    "Alive",
    "Bye",
    "Done",
    "EpochEnd",
    "Exhausted",
    "Failed",
    "Fetch",
    "Hello",
    "Made",
    "Message",
    "OpenPipes",
    "Ping",
    "Pipes",
    "Pong",
    "Raised",
    "Ready",
    "Refused",
    "Release",
    "Stacks",
    "StartFailed",
    "Status",
    "StatusReply",
    "Stop",
    "StreamEnd",
    "Take",
    "Tasks",
    "UseFrames",
    "UseRing",
    "Want",
    "Welcome",
    "WorkerMemory",
    "WorkerReady",
    "decode",
    "encode",
    "frame_chunks",
    "send_tracked",
]

VERSION = 2
#: A batch of more than FRAMES_SPLIT bytes travels as frames of FRAME_CHUNK bytes (the last
#: shorter), to a frames consumer (which receives them into a buffer it recycles) and from a
#: worker that sends frames (the server copies them into the slot): ZeroMQ would receive one
#: frame into memory it allocates, and glibc maps every allocation of 32 MiB or more afresh, so
#: the receiver would fault in 8k pages for every such batch. A smaller batch travels as one
#: frame (glibc keeps those on its heap; another copy would cost more).
FRAMES_SPLIT = 31 << 20
FRAME_CHUNK = 4 << 20


def frame_chunks(data: memoryview) -> list[memoryview]:
    """A batch's bytes as the frames it travels in (see FRAMES_SPLIT)."""
    if data.nbytes <= FRAMES_SPLIT:
        return [data]
    return [data[at : at + FRAME_CHUNK] for at in range(0, data.nbytes, FRAME_CHUNK)]


def send_tracked(sock: zmq.Socket[bytes], parts: list[Any]) -> zmq.MessageTracker:
    """Send ``parts`` as one message without copying the big ones; the tracker says when
    ZeroMQ has let go of all of them, so their memory may be written again. (pyzmq's
    ``send_multipart(track=True)`` tracks only the last part: one small enough to be copied is
    done at once, while the big parts before it are still on their way.)"""
    # (.nbytes or len(): a memoryview() of every part cost 4x the check, ~0.1 us per batch)
    frames = [zmq.Frame(p, track=True)
              if (p.nbytes if type(p) is memoryview else len(p)) >= zmq.COPY_THRESHOLD else p
              for p in parts]
    sock.send_multipart(frames, copy=False)
    return zmq.MessageTracker(*[f for f in frames if isinstance(f, zmq.Frame)])


#: Largest message the server accepts from a consumer: consumer messages are all small.
MAX_CONSUMER_MESSAGE_BYTES = 1 << 20

# --- consumer -> server --------------------------------------------------------------------


@_message(1, "uint", "str", "uint", "uint", "str")
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message of a consumer: protocol version, dataset, and who it is (for lease reclaim)."""

    version: int
    dataset: str
    pid: int
    pidns: int  # inode of /proc/self/ns/pid; equal on both sides means pids are comparable
    name: str


@_message(2, "uint", "uint", "uint", "uint", "bool")
@dataclass(frozen=True, slots=True)
class Want(Message):
    """Produce and announce positions ``range(start, stop, step)`` of ``epoch``'s order (a shard
    of ``world`` ranks reads every ``world``-th position).

    Each position asked for is announced once per Want (a position asked for twice, say when
    an epoch is read again, is announced twice). ``urgent`` says the consumer is blocked on
    ``start``: the server produces it even if every ring slot is held (into a one-off
    segment), so holding batches can never deadlock. An urgent Want for a position the
    consumer is owed already (it waits for it or, a frames consumer, its announcement's frames
    are still leaving the server) only does that: it adds no announcement.
    """

    epoch: int
    start: int
    stop: int
    step: int
    urgent: bool


@_message(3, "uint", "uint")
@dataclass(frozen=True, slots=True)
class Fetch(Message):
    """Random access: produce and announce the batch with ``index`` (not position) in ``epoch``."""

    epoch: int
    index: int


@_message(4, "list[uint]")
@dataclass(frozen=True, slots=True)
class Release(Message):
    """The consumer holds no more references to these batches; their slots may be reused."""

    bids: list[int]


@_message(5, "uint")
@dataclass(frozen=True, slots=True)
class EpochEnd(Message):
    """The consumer finished ``epoch`` and called ``on_epoch_end``."""

    epoch: int


@_message(6)
@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Are you alive? Sent by a waiting consumer when it has heard nothing for a while."""


@_message(7, "list[uint]")
@dataclass(frozen=True, slots=True)
class Bye(Message):
    """The consumer leaves. ``held`` are batches whose arrays are still referenced in it:
    their slots stay leased until its process exits."""

    held: list[int]


@_message(8, "bytes")
@dataclass(frozen=True, slots=True)
class Alive(Message):
    """Heartbeat from a consumer's own thread, naming the consumer's socket identity (sent by
    consumers in another pid namespace, whose pid the server cannot watch)."""

    consumer: bytes


@_message(9)
@dataclass(frozen=True, slots=True)
class Status(Message):
    """Ask for the server's status snapshot (no Hello needed: ``dataserver status`` sends it)."""


@_message(10, "uint")
@dataclass(frozen=True, slots=True)
class Take(Message):
    """From a generator dataset: ``count`` more items, whichever are made first."""

    count: int


@_message(11)
@dataclass(frozen=True, slots=True)
class Stacks(Message):
    """Ask for the status snapshot plus the Python stack of every worker."""


@_message(12)
@dataclass(frozen=True, slots=True)
class UseFrames(Message):
    """The consumer cannot map the server's shared memory (another host, another IPC
    namespace): send each batch's bytes as ZeroMQ frames after its Ready message instead."""


@_message(13)
@dataclass(frozen=True, slots=True)
class OpenPipes(Message):
    """A consumer on the server's host that maps the ring asks for FIFOs (dataserver.fifo)
    beside the socket: its short messages then skip ZeroMQ's I/O threads."""


# --- server -> consumer --------------------------------------------------------------------


@_message(20, "uint", "str", "str", "uint", "bool", "uint", "str", "str", "uint", "uint",
          "uint", "uint", "uint", "float", "bool", "str")
@dataclass(frozen=True, slots=True)
class Welcome(Message):
    version: int
    server_id: str
    dataset: str
    length: int
    shuffle: bool
    seed: int
    shm_dir: str
    ring: str  # file name of the ring segment inside shm_dir
    slot_bytes: int
    slots: int
    prefetch: int
    pid: int
    pidns: int
    heartbeat_s: float
    stream: bool  # a generator dataset: items in the order made, no length
    ring_id: str  # "st_dev:st_ino" of the ring file: a consumer that sees the same file shares it


@_message(21, "list[item]")
@dataclass(frozen=True, slots=True)
class Ready(Message):
    """Batches now readable. Each item is
    ``[epoch, pos, index, bid, segment, offset, nbytes, layout]``; ``pos`` is -1 for a Fetch,
    ``segment`` is "" for the ring (then ``offset`` is the slot's) or a one-off segment's name.
    Each item is one lease, to be given back with ``Release`` (for a consumer that asked for
    frames, each batch's bytes follow in item order: one frame for a batch of up to
    ``FRAMES_SPLIT`` bytes, else frames that add up to ``nbytes``; the server ends the lease
    itself once the frames have left)."""

    items: list[Any]


@_message(22, "int", "int", "uint", "str", "str", "str", "str", "int", "int")
@dataclass(frozen=True, slots=True)
class Failed(Message):
    """Producing a wanted batch failed: ``kind`` is "raised" or "died"."""

    epoch: int
    pos: int
    index: int
    kind: str
    type_name: str
    message: str
    traceback: str
    worker: int
    pid: int


@_message(23)
@dataclass(frozen=True, slots=True)
class Pong(Message):
    pass


@_message(24, "str")
@dataclass(frozen=True, slots=True)
class Refused(Message):
    """The consumer's last message was refused; ``reason`` says why and what to do."""

    reason: str


@_message(25, "bytes")
@dataclass(frozen=True, slots=True)
class StatusReply(Message):
    """The status snapshot, a msgpack map (its schema is documented in docs/status.md)."""

    snapshot: bytes


@_message(26)
@dataclass(frozen=True, slots=True)
class StreamEnd(Message):
    """Every worker's generator is exhausted and every item was handed out: the stream ended."""


@_message(27, "str", "str", "uint")
@dataclass(frozen=True, slots=True)
class Pipes(Message):
    """Read the server's short messages from FIFO ``down`` too; write yours into ``up`` with
    ``token`` (each may still come over the socket: either path, same meaning)."""

    down: str
    up: str
    token: int


# --- server <-> worker ---------------------------------------------------------------------


@_message(40, "str", "uint", "uint")
@dataclass(frozen=True, slots=True)
class UseRing(Message):
    """Attach the ring segment ``ring`` (a file in the shm dir) of ``slots`` x ``slot_bytes``."""

    ring: str
    slot_bytes: int
    slots: int


@_message(41, "list")
@dataclass(frozen=True, slots=True)
class Tasks(Message):
    """Produce these batches, in order. Each item is ``[bid, dataset, epoch, index, slot]``;
    slot -1 means "write into a one-off segment"."""

    items: list[Any]


@_message(42)
@dataclass(frozen=True, slots=True)
class Stop(Message):
    pass


@_message(50, "uint", "uint", "str", "bool", "str")
@dataclass(frozen=True, slots=True)
class WorkerReady(Message):
    """The worker loaded the Sequence. ``secret`` proves the server started it; ``frames``: it
    cannot see the ring and sends batches as ``Made`` + a frame; ``host`` is its node name."""

    worker: int
    pid: int
    secret: str
    frames: bool
    host: str


@_message(51, "uint", "str", "str", "str", "str")
@dataclass(frozen=True, slots=True)
class StartFailed(Message):
    """The worker could not load the Sequence."""

    worker: int
    secret: str
    type_name: str
    message: str
    traceback: str


@_message(52, "uint", "str", "uint", "bytes", "float")
@dataclass(frozen=True, slots=True)
class Done(Message):
    """Batch ``bid`` is written: into its slot (``segment`` "") or a one-off segment;
    making it took ``busy_s`` seconds."""

    bid: int
    segment: str
    nbytes: int
    layout: bytes
    busy_s: float


@_message(55, "uint", "uint", "bytes", "float")
@dataclass(frozen=True, slots=True)
class Made(Message):
    """Batch ``bid`` follows (``nbytes`` bytes: one frame, or frames that add up to it for a
    batch over ``FRAMES_SPLIT``): a worker that cannot see the ring sends it this way, and the
    server places it."""

    bid: int
    nbytes: int
    layout: bytes
    busy_s: float


@_message(56, "uint", "int", "int", "int", "int")
@dataclass(frozen=True, slots=True)
class WorkerMemory(Message):
    """A Ray worker's own memory figures in bytes (-1: unknown), sent every second or so."""

    worker: int
    rss: int
    uss: int
    pss: int
    swap: int


@_message(54, "uint")
@dataclass(frozen=True, slots=True)
class Exhausted(Message):
    """The worker's generator raised StopIteration instead of making batch ``bid``."""

    bid: int


@_message(53, "uint", "str", "str", "str")
@dataclass(frozen=True, slots=True)
class Raised(Message):
    """The Sequence raised producing batch ``bid``."""

    bid: int
    type_name: str
    message: str
    traceback: str
