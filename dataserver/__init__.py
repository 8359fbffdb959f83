"""dataserver: a standalone data server for Keras-style Sequences.

Workers (processes or threads) write batches into a shared-memory ring; consumers read them in
order, zero-copy, through :class:`dataserver.client.RemoteSequence`.

This package imports its server parts lazily, so ``import dataserver.client`` stays light (no
psutil, no worker pool).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dataserver.errors import (
    BatchError,
    ClosedError,
    ConfigError,
    DataServerError,
    ProtocolError,
    RemoteError,
    ServerUnavailable,
    SharedMemoryError,
    WorkerDiedError,
)

if TYPE_CHECKING:
    from dataserver.alloc import empty, full, zeros
    from dataserver.api import DataServer
    from dataserver.config import ServerConfig
    from dataserver.source import Sequence, WorkerInfo, worker_info

__version__ = "0.1.0"

__all__ = [
    "BatchError",
    "ClosedError",
    "ConfigError",
    "DataServer",
    "DataServerError",
    "ProtocolError",
    "RemoteError",
    "Sequence",
    "ServerConfig",
    "ServerUnavailable",
    "SharedMemoryError",
    "WorkerDiedError",
    "WorkerInfo",
    "__version__",
    "empty",
    "full",
    "worker_info",
    "zeros",
]

_LAZY = {
    "empty": "dataserver.alloc",
    "full": "dataserver.alloc",
    "zeros": "dataserver.alloc",
    "DataServer": "dataserver.api",
    "ServerConfig": "dataserver.config",
    "Sequence": "dataserver.source",
    "WorkerInfo": "dataserver.source",
    "worker_info": "dataserver.source",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dataserver' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
