"""Memory figures for the table, read with psutil: worker USS and consumer RSS.

* worker USS: memory private to a worker process (pages it alone maps: what it would give back
  on exit), the median over a contender's worker processes, sampled at the end of the measured
  epoch while the workers are up. Thread workers have none of their own (``None``).
* consumer RSS: the resident set of this process (the consumer) at the same moment. It includes
  whatever the run has imported (Keras and PyTorch are imported up front when peers run, so the
  baseline is the same for every contender) and mapped (shared-memory batches it holds).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterable
from typing import Any

import psutil

__all__ = ["children", "rss", "sample", "uss", "wait_gone"]

#: multiprocessing's resource tracker is a child of whoever spawned first; not a worker.
_HELPERS = ("multiprocessing.resource_tracker",)
WAIT_GONE_S = 10.0
POLL_S = 0.02


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def uss(pid: int) -> int | None:
    with contextlib.suppress(psutil.Error):
        return int(psutil.Process(pid).memory_full_info().uss)
    return None


def children(pid: int | None = None) -> set[int]:
    """Pids of the live child processes of ``pid`` (this process by default), helpers left out."""
    out = set()
    with contextlib.suppress(psutil.Error):
        for k in psutil.Process(pid or os.getpid()).children():
            with contextlib.suppress(psutil.Error):
                if k.status() == psutil.STATUS_ZOMBIE:
                    continue
                if not any(h in " ".join(k.cmdline()) for h in _HELPERS):
                    out.add(k.pid)
    return out


def sample(worker_pids: Iterable[int] = (), server_pid: int | None = None) -> dict[str, Any]:
    """Worker USS (median over ``worker_pids``), consumer RSS and, if given, the server's USS."""
    figures = [u for u in (uss(p) for p in sorted(worker_pids)) if u is not None]
    out: dict[str, Any] = {
        "worker_uss": statistics.median(figures) if figures else None,
        "worker_uss_each": figures,
        "consumer_rss": rss(),
    }
    if server_pid is not None:
        out["server_uss"] = uss(server_pid)
    return out


def wait_gone(pids: Iterable[int], timeout_s: float = WAIT_GONE_S) -> list[int]:
    """Wait for ``pids`` to exit; return those still alive. Polls without reaping: a zombie
    counts as gone, and reaping stays with its owner (multiprocessing joins its own)."""
    procs = []
    for p in pids:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(p))
    deadline = time.monotonic() + timeout_s
    while True:
        procs = [p for p in procs if _alive(p)]
        if not procs or time.monotonic() > deadline:
            return [p.pid for p in procs]
        time.sleep(POLL_S)


def _alive(p: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    return False
