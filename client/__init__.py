"""The consumer library: :class:`RemoteSequence`, a Keras-style Sequence served by a dataserver.

::

    from dataserver.client import RemoteSequence
    train = RemoteSequence()          # endpoint from $DATASERVER_ENDPOINT or the default socket
    for epoch in range(3):
        for x, y in train: ...        # batches 0..len-1, in order, exactly once
        train.on_epoch_end()

Batches come back as read-only numpy views into the server's shared memory: no copy. A batch's
slot goes back to the ring only when the last reference to its arrays is gone, so holding
batches is always safe (it only holds slots); ``copy=True`` returns owned, writable arrays.

This package needs numpy, pyzmq and msgpack only; it never imports the server's modules.
"""

from __future__ import annotations

from dataserver.client._remote import RemoteSequence
from dataserver.errors import (
    BatchError,
    ClosedError,
    DataServerError,
    ProtocolError,
    RemoteError,
    ServerUnavailable,
    SharedMemoryError,
    WorkerDiedError,
)

__all__ = [
    "BatchError",
    "ClosedError",
    "DataServerError",
    "ProtocolError",
    "RemoteError",
    "RemoteSequence",
    "ServerUnavailable",
    "SharedMemoryError",
    "WorkerDiedError",
]
