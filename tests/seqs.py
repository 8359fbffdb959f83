"""Sequences used by the tests. A module of its own so spawned workers can import it."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import threading
import time
from typing import Any

import numpy as np


class Indexed:
    """Batch i is (x, y): x float32 (rows, cols) filled with i, y = [i]."""

    def __init__(self, n: int = 64, rows: int = 16, cols: int = 16, delay: float = 0.0,
                 seed: int = 0) -> None:
        self.n, self.rows, self.cols, self.delay, self.seed = n, rows, cols, delay, seed
        self.epochs = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if self.delay:
            time.sleep(random.Random(self.seed * 100003 + i).uniform(0, self.delay))
        x = np.full((self.rows, self.cols), i, np.float32)
        return x, np.array([i], np.int64)

    def on_epoch_end(self) -> None:
        self.epochs += 1


class EpochTagged(Indexed):
    """y = [i, epochs seen by this worker's Sequence]: shows where on_epoch_end ran."""

    def __getitem__(self, i: int) -> Any:
        x, _ = super().__getitem__(i)
        return x, np.array([i, self.epochs], np.int64)


class Raising(Indexed):
    """Raises ValueError at the indices in ``bad``."""

    def __init__(self, n: int = 16, bad: tuple[int, ...] = (3,)) -> None:
        super().__init__(n)
        self.bad = set(bad)

    def __getitem__(self, i: int) -> Any:
        if i in self.bad:
            helper_that_fails(i)
        return super().__getitem__(i)


def helper_that_fails(i: int) -> None:
    raise ValueError(f"cannot decode record {i}")


class Dies(Indexed):
    """The worker kills itself (SIGKILL) at index ``die_at`` every time it tries."""

    def __init__(self, n: int = 16, die_at: int = 5, how: str = "kill") -> None:
        super().__init__(n)
        self.die_at, self.how = die_at, how

    def __getitem__(self, i: int) -> Any:
        if i == self.die_at:
            if self.how == "segv":
                ctypes.string_at(0)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(i)


class DiesOnce(Indexed):
    """The worker dies at ``die_at`` the first time only (a marker file remembers)."""

    def __init__(self, n: int, die_at: int, marker: str) -> None:
        super().__init__(n)
        self.die_at, self.marker = die_at, marker

    def __getitem__(self, i: int) -> Any:
        if i == self.die_at and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(i)


class Hangs(Indexed):
    """Sleeps forever at ``hang_at`` the first time (marker file), else normal."""

    def __init__(self, n: int, hang_at: int, marker: str) -> None:
        super().__init__(n)
        self.hang_at, self.marker = hang_at, marker

    def __getitem__(self, i: int) -> Any:
        if i == self.hang_at and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            time.sleep(3600)
        return super().__getitem__(i)


class Sized(Indexed):
    """Batch i has ``big`` bytes at the indices in ``big_at``, else ``small`` bytes."""

    def __init__(self, n: int = 12, small: int = 4096, big: int = 1 << 20,
                 big_at: tuple[int, ...] = (5,)) -> None:
        super().__init__(n)
        self.small, self.big, self.big_at = small, big, set(big_at)

    def __getitem__(self, i: int) -> Any:
        size = self.big if i in self.big_at else self.small
        x = np.full(size // 4, i, np.float32)
        return x, np.array([i], np.int64)


class Structured:
    """One batch holding every kind of leaf and nesting the layout supports."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> Any:
        return make_structured(i)


def make_structured(i: int) -> Any:
    rng = np.random.default_rng(i)
    rec = np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8", (2,)), ("c", "S3")])
    rec["a"] = [1, 2, 3]
    rec["c"] = [b"ab", b"cd", b"ef"]
    return {
        "images": rng.random((2, 3, 4), dtype=np.float32),
        "fortran": np.asfortranarray(rng.random((3, 5))),
        "strided": np.arange(40, dtype=np.int16)[::3],
        "bigendian": np.arange(6, dtype=">u4").reshape(2, 3),
        "empty": np.zeros((0, 7), np.float64),
        "zerod": np.array(3.5),
        "bools": np.array([True, False, True]),
        "complex": np.array([1 + 2j, 3 - 4j], np.complex64),
        "f16": np.array([0.5, 1.5], np.float16),
        "u64": np.array([2**64 - 1, 0], np.uint64),
        "dates": np.array(["2026-01-01", "2026-11-24"], "datetime64[D]"),
        "unicode": np.array(["héllo", "wörld"]),
        "records": rec,
        "scalars": [None, True, 7, -(2**63), 2.5, "text", b"raw", np.float32(1.25), np.int8(-3)],
        "bigbytes": bytes(range(256)) * 20,
        "nested": (np.arange(3), [np.ones(2, np.uint8), {"deep": np.eye(2)}]),
        3: "int key",
        "index": i,
    }


class ObjectDtype(Indexed):
    def __getitem__(self, i: int) -> Any:
        return {"img": [np.zeros(2), np.zeros(2), np.zeros(2), np.array([1, "a"], dtype=object)]}


class ReturnsNone(Indexed):
    def __getitem__(self, i: int) -> Any:
        return None


class BadLen:
    def __len__(self) -> int:
        raise RuntimeError("no index file")

    def __getitem__(self, i: int) -> Any:
        return np.zeros(1)


class Empty:
    def __len__(self) -> int:
        return 0

    def __getitem__(self, i: int) -> Any:
        return np.zeros(1)


def make_indexed(n: int = 8) -> Indexed:
    """A factory, as a SPEC may name one."""
    return Indexed(n)


instance = Indexed(10)


class Counting(Indexed):
    """Appends "epoch index" to ``log`` for each batch it makes (O_APPEND): counts production."""

    def __init__(self, n: int, log: str, delay: float = 0.0) -> None:
        super().__init__(n, delay=delay)
        self.log = log

    def __getitem__(self, i: int) -> Any:
        from dataserver import worker_info

        info = worker_info()
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{info.epoch if info else -1} {i}\n".encode())
        finally:
            os.close(fd)
        return super().__getitem__(i)


class Linear:
    """Batch i: x (batch, features) float32 from a generator seeded by (seed, i), y = x @ w + 0.5
    for a fixed w: a regression a small Keras model learns in a few epochs."""

    def __init__(self, n: int = 16, batch: int = 32, features: int = 4, seed: int = 0) -> None:
        self.n, self.batch, self.features, self.seed = n, batch, features, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        x = np.random.default_rng([self.seed, i]).standard_normal(
            (self.batch, self.features), dtype=np.float32)
        w = np.arange(1, self.features + 1, dtype=np.float32) / self.features
        return x, x @ w[:, None] + np.float32(0.5)


class EpochFilled(Indexed):
    """x is filled with i + 1000 * (epochs this worker's Sequence has seen), y = [i]: the value
    a model predicts from x shows both the order and where on_epoch_end ran."""

    def __getitem__(self, i: int) -> Any:
        x, y = super().__getitem__(i)
        return x + np.float32(1000 * self.epochs), y


class Hog(Indexed):
    """Allocates ``mb`` MiB and keeps it at the indices in ``hog_at``; grows ``grow_mb`` per
    batch otherwise (0: not at all)."""

    def __init__(self, n: int, hog_at: tuple[int, ...] = (), mb: int = 200, grow_mb: int = 0,
                 delay: float = 0.0) -> None:
        super().__init__(n)
        self.hog_at, self.mb, self.grow_mb, self.pause = set(hog_at), mb, grow_mb, delay
        self.kept: list[np.ndarray] = []

    def __getitem__(self, i: int) -> Any:
        if i in self.hog_at:
            self.kept.append(np.ones(self.mb << 18, np.float32))  # touched: really resident
        elif self.grow_mb:
            self.kept.append(np.ones(self.grow_mb << 18, np.float32))
        if self.pause:
            time.sleep(self.pause)
        return super().__getitem__(i)


class InPlace(Indexed):
    """Builds x with dataserver.empty (zero-copy) and records whether it landed in a slot."""

    def __getitem__(self, i: int) -> Any:
        from dataserver import empty, zeros

        x = empty((self.rows, self.cols), np.float32)
        x[...] = i
        y = zeros(2, np.int64)
        y[0] = i
        y[1] = int(not x.flags.owndata)  # 1: the array is a view of the slot
        return {"x": x, "y": y, "strided": x[:, ::2]}


class RaisesMemoryError(Indexed):
    def __getitem__(self, i: int) -> Any:
        if i == 2:
            raise MemoryError("cannot allocate 80 GiB for the decoded video")
        return super().__getitem__(i)


def sharded_items(n: int = 40, rows: int = 4) -> Any:
    """A finite generator factory: worker k of K yields items k, k+K, ... below n."""
    from dataserver import worker_info

    info = worker_info()
    k, count = (info.id, info.count) if info else (0, 1)
    for i in range(k, n, count):
        time.sleep(0.002)
        yield np.full((rows, 4), i, np.float32), np.array([i], np.int64)


def endless(rows: int = 4) -> Any:
    """An infinite generator factory (each worker counts from its id, stepping by the count)."""
    from dataserver import worker_info

    info = worker_info()
    i, step = (info.id, info.count) if info else (0, 1)
    while True:
        yield np.full((rows, 4), i, np.float32), np.array([i], np.int64)
        i += step


def dies_once_items(n: int, marker: str) -> Any:
    """Finite and deterministic; the worker making item 7 dies the first time."""
    from dataserver import worker_info

    info = worker_info()
    k, count = (info.id, info.count) if info else (0, 1)
    for i in range(k, n, count):
        if i == 7 and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        yield np.full((4, 4), i, np.float32), np.array([i], np.int64)


class Wide(Indexed):
    """Batch i is a dict of ``keys`` small arrays, each filled with i: a long layout, so Ready
    announcements outgrow a FIFO write (``keys`` ~ 60 and more: one item alone does)."""

    def __init__(self, n: int = 32, keys: int = 8) -> None:
        super().__init__(n)
        self.keys = keys

    def __getitem__(self, i: int) -> Any:
        return {f"feature_{k:04d}_with_a_long_name": np.full(3, i, np.int32)
                for k in range(self.keys)}


_SLOW_STARTED = threading.Event()  # per process: LoggedSlowLast's slow call began


class LoggedSlowLast:
    """No on_epoch_end; for thread workers. Logs "start i" / "end i" per call to ``log``; the
    first call of the last batch takes ``slow`` seconds and is logged "start i slow" / "end i
    slow". A second call of any index (the next epoch) waits until the slow call has begun
    (at most ``slow`` seconds), so the next epoch's calls cannot all be over before it starts."""

    def __init__(self, n: int, log: str, slow: float = 1.0) -> None:
        self.n, self.log, self.slow = n, log, slow
        self.slowed = False
        self.called: set[int] = set()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        slow = i == self.n - 1 and not self.slowed
        self.slowed = self.slowed or slow
        if not slow and i in self.called:
            _SLOW_STARTED.wait(self.slow)
        self.called.add(i)
        tag = " slow" if slow else ""
        with open(self.log, "a") as f:
            f.write(f"start {i}{tag}\n")
        if slow:
            _SLOW_STARTED.set()
            time.sleep(self.slow)
        with open(self.log, "a") as f:
            f.write(f"end {i}{tag}\n")
        return np.array([i])


IMPORTED_BY = os.getpid()  # the process that imported this module


class WhereImported:
    """``y = [index, pid that imported this module, pid that made the batch]``: under the
    forkserver start method the fork server imported it, and the workers share it."""

    def __init__(self, n: int = 10) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return np.zeros(4, np.float32), np.array([index, IMPORTED_BY, os.getpid()])
