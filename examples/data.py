"""The examples' Sequence, and a server for it: one started here, or one already running.

Serve it from the repository root, as the README shows (``dataserver serve`` puts the current
directory on the import path, so ``examples.data`` imports)::

    dataserver serve train=examples.data:Regression val=examples.data:Regression \\
        --arg val.seed=1 --arg val.batches=8 --workers 2 --endpoint ipc:///tmp/ds-examples.sock
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

FEATURES = 8
WEIGHTS = np.linspace(-1.0, 1.0, FEATURES, dtype=np.float32)[:, None]
BIAS = np.float32(0.5)


class Regression:
    """Batch i: ``x`` (batch_size, 8) float32 drawn from a generator seeded by (seed, i) and
    ``y = x @ WEIGHTS + BIAS`` plus a little noise: a linear model learns it in a few epochs.
    A real Sequence would read and decode files here; the server's workers run it."""

    def __init__(self, batches: int = 64, batch_size: int = 32, seed: int = 0) -> None:
        self.batches, self.batch_size, self.seed = batches, batch_size, seed

    def __len__(self) -> int:
        return self.batches

    def __getitem__(self, i: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        rng = np.random.default_rng([self.seed, i])
        x = rng.standard_normal((self.batch_size, FEATURES), dtype=np.float32)
        noise = rng.standard_normal((self.batch_size, 1), dtype=np.float32)
        return x, x @ WEIGHTS + BIAS + np.float32(0.01) * noise


@contextlib.contextmanager
def server(endpoint: str | None) -> Iterator[str]:
    """The endpoint of a server with datasets ``train`` and ``val``: ``endpoint`` if given (a
    ``dataserver serve`` started as above), else a DataServer started here and stopped after."""
    if endpoint:
        yield endpoint
        return
    from dataserver import DataServer

    datasets = {"train": Regression(), "val": Regression(batches=8, seed=1)}
    with DataServer(datasets, workers=2) as started:
        yield started.endpoint
