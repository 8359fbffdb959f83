"""The benchmark workload and the consumer's check.

``Workload(nbytes, n, cpu_us)[i]`` returns ``(x, y)``: ``x`` a freshly allocated float32 array of
``nbytes`` bytes filled with ``i % 251``, ``y = np.array([i])``. With ``cpu_us`` it first spends
that many microseconds of this thread's CPU time in a pure-Python loop that holds the GIL
(``time.thread_time``, so a thread that is descheduled or waits for the GIL does not get its
work for free, as it would with a wall-clock loop).

:func:`consume` is what every contender does with a batch: a 64-bit checksum that reads every
byte of ``x`` (compared with the value the index implies, so stale or torn data fails) and the
order check ``y[0] == i``. A module of its own so spawned server processes can import it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from dataserver import empty

__all__ = ["BenchError", "Checker", "Workload", "burn"]

FILL_MOD = 251
_MASK64 = (1 << 64) - 1


class BenchError(AssertionError):
    """A batch arrived out of order or with the wrong contents."""


def burn(cpu_us: float) -> None:
    """Spend ``cpu_us`` microseconds of this thread's CPU time in Python, holding the GIL."""
    clock = time.thread_time
    end = clock() + cpu_us * 1e-6
    while clock() < end:
        pass


class Workload:
    """A Keras-style Sequence of ``n`` batches of ``nbytes`` (a multiple of 8) each."""

    def __init__(self, nbytes: int, n: int, cpu_us: float = 0.0, in_slot: bool = False) -> None:
        if nbytes <= 0 or nbytes % 8:
            raise ValueError(f"nbytes must be a positive multiple of 8, got {nbytes}")
        self.nbytes = int(nbytes)
        self.n = int(n)
        self.cpu_us = float(cpu_us)
        self.in_slot = in_slot  # allocate x with dataserver.empty (zero-copy in a worker)

    def zero_copy(self) -> Workload:
        return Workload(self.nbytes, self.n, self.cpu_us, in_slot=True)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        if self.cpu_us:
            burn(self.cpu_us)
        x = (empty if self.in_slot else np.empty)(self.nbytes // 4, np.float32)
        x.fill(i % FILL_MOD)
        return x, np.array([i])

    def __repr__(self) -> str:
        return f"Workload(nbytes={self.nbytes}, n={self.n}, cpu_us={self.cpu_us:g})"


class Checker:
    """Checks batches of one workload: ``checker(x, y, i)`` raises BenchError if wrong."""

    def __init__(self, nbytes: int) -> None:
        words = nbytes // 8
        self.expected = []
        for v in range(FILL_MOD):
            bits = int(np.array([v], np.float32).view(np.uint32)[0])
            self.expected.append((words * (bits | bits << 32)) & _MASK64)

    def __call__(self, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], i: int) -> None:
        total = int(np.add.reduce(x.view(np.uint64)))
        if int(y[0]) != i:
            raise BenchError(f"expected batch {i}, got batch {int(y[0])}")
        if total != self.expected[i % FILL_MOD]:
            raise BenchError(f"batch {i}: checksum {total:#x}, expected "
                             f"{self.expected[i % FILL_MOD]:#x}")
