"""Every error dataserver raises, in one tree.

::

    DataServerError                      the base
    ├── ConfigError (ValueError)         a bad option, SPEC or Sequence, found at start
    ├── ProtocolError                    a message that is malformed, of an unknown kind or version
    ├── SharedMemoryError (OSError)      /dev/shm too small, a segment that cannot be made or opened
    ├── ClosedError (RuntimeError)       a server or client used after close()
    ├── ServerUnavailable (ConnectionError)
    │                                    no server answers at the endpoint (not started, died, hung)
    └── BatchError                       producing one batch failed; carries .index and .epoch
        ├── RemoteError                  the Sequence raised: .type_name, .message, .traceback
        └── WorkerDiedError              its worker died (signal, exit code), retries spent

This module imports nothing beyond the standard library: the client uses it.
"""

from __future__ import annotations

__all__ = [
    "BatchError",
    "ClosedError",
    "ConfigError",
    "DataServerError",
    "ProtocolError",
    "RemoteError",
    "ServerUnavailable",
    "SharedMemoryError",
    "WorkerDiedError",
]


class DataServerError(Exception):
    """Base class of every error raised by dataserver."""


class ConfigError(DataServerError, ValueError):
    """An option, SPEC or Sequence is not usable; the message names it and the fix."""


class ProtocolError(DataServerError):
    """A message that does not follow the wire protocol (malformed, unknown kind, wrong version)."""


class SharedMemoryError(DataServerError, OSError):
    """Shared memory could not be reserved, created or attached."""


class ClosedError(DataServerError, RuntimeError):
    """The server or client was used after close()."""


class ServerUnavailable(DataServerError, ConnectionError):
    """No dataserver answers at the endpoint within the timeout."""


class BatchError(DataServerError):
    """Producing the batch at ``index`` (of epoch ``epoch``) failed."""

    def __init__(self, message: str, *, index: int, epoch: int) -> None:
        super().__init__(message)
        self.index = index
        self.epoch = epoch


class RemoteError(BatchError):
    """The Sequence raised while producing a batch; the worker's traceback is attached.

    ``type_name`` is the original exception's qualified type name (the exception object itself
    never crosses the process boundary: nothing is unpickled), ``message`` its ``str()``, and
    ``traceback`` the worker's formatted traceback.
    """

    def __init__(
        self,
        *,
        index: int,
        epoch: int,
        type_name: str,
        message: str,
        traceback: str,
        worker: int,
        pid: int,
    ) -> None:
        super().__init__(
            f"batch {index}: {type_name}: {message} (raised in worker {worker}, pid {pid})",
            index=index,
            epoch=epoch,
        )
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        self.worker = worker
        self.pid = pid

    def __str__(self) -> str:
        head = super().__str__()
        if not self.traceback:
            return head
        return f"{head}\n\nWorker traceback:\n{self.traceback.rstrip()}"


class WorkerDiedError(BatchError):
    """Every attempt to produce a batch ended with its worker dying (signal, exit, hang)."""

    def __init__(self, *, index: int, epoch: int, reason: str) -> None:
        super().__init__(
            f"batch {index}: the worker died producing it ({reason}). Run the Sequence inline "
            f"(seq[{index}]) to debug it, or raise --max-retries",
            index=index,
            epoch=epoch,
        )
        self.reason = reason
