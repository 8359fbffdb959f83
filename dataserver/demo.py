"""The bundled example Sequence and ``dataserver demo``: a server, a consumer, a summary."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from dataserver.source import Sequence

__all__ = ["SyntheticImages", "run_demo"]


class SyntheticImages(Sequence):
    """Deterministic fake images: batch ``i`` is (x, y) with x float32 [batch, h, w, 3] and
    y int64 [batch]; ``x[0, 0, 0, 0] == i`` and ``y[0] == i`` so order can be checked.
    ``work_ms`` of pure-Python work per batch stands in for decoding."""

    def __init__(self, batches: int = 200, batch_size: int = 32, height: int = 64,
                 width: int = 64, work_ms: float = 2.0) -> None:
        self.batches = batches
        self.shape = (batch_size, height, width, 3)
        self.work_ms = work_ms

    def __len__(self) -> int:
        return self.batches

    def __getitem__(self, index: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        if not 0 <= index < self.batches:
            raise IndexError(index)
        deadline = time.perf_counter() + self.work_ms / 1000
        while time.perf_counter() < deadline:  # decoding stand-in: holds the GIL
            pass
        x = np.empty(self.shape, np.float32)
        x[...] = np.float32(index % 251) / 251
        x[0, 0, 0, 0] = index
        y = (np.arange(self.shape[0], dtype=np.int64) + index) % 10
        y[0] = index
        return x, y


def _worker_memory(endpoint: str) -> list[tuple[int, float | None]]:
    """(pid, USS) of each worker, as the server's status reports them (workers forked from a
    fork server are not the server's children)."""
    from dataserver.status import fetch_status

    return [(w["pid"], w.get("uss")) for w in fetch_status(endpoint)["workers"]]


def run_demo(epochs: int = 2, batches: int = 200, workers: int = 2) -> int:
    """Serve SyntheticImages with process workers, consume it with progress, print a summary."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from dataserver.api import DataServer
    from dataserver.client import RemoteSequence
    from dataserver.shm import format_bytes, private_dir, runtime_root

    console = Console(stderr=False)
    console.print(f"[bold]dataserver demo[/]: {workers} process workers serve SyntheticImages "
                  f"({batches} batches of 32x64x64x3 float32, 2 ms of Python work each)")
    t0 = time.perf_counter()
    endpoint = f"ipc://{private_dir(runtime_root())}/demo-{os.getpid()}.sock"
    with DataServer(spec="dataserver.demo:SyntheticImages", args={"batches": batches},
                    workers=workers, worker_type="process", endpoint=endpoint) as server:
        ready_s = time.perf_counter() - t0
        console.print(f"server ready at {server.endpoint} in {ready_s:.2f} s (pid {server.pid})")
        nbytes = 0
        first_batch_s = 0.0
        with RemoteSequence(server.endpoint) as seq, Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console,
        ) as progress:
            task = progress.add_task("epoch 1", total=len(seq) * epochs, rate="")
            start = time.perf_counter()
            for epoch in range(epochs):
                progress.update(task, description=f"epoch {epoch + 1}/{epochs}")
                for i, (x, y) in enumerate(seq):
                    if not first_batch_s:
                        first_batch_s = time.perf_counter() - start
                    if int(y[0]) != i or int(x[0, 0, 0, 0]) != i:
                        raise SystemExit(f"demo: batch {i} arrived out of order")
                    nbytes += x.nbytes + y.nbytes
                    done = epoch * len(seq) + i + 1
                    rate = done / (time.perf_counter() - start)
                    progress.update(task, advance=1, rate=f"{rate:,.0f} batches/s")
                seq.on_epoch_end()
            elapsed = time.perf_counter() - start
            memory = _worker_memory(server.endpoint)
    total = len(seq) * epochs
    table = Table(title="summary", show_header=False)
    table.add_row("batches", f"{total} in {elapsed:.2f} s, in order, each exactly once")
    gbps = nbytes / elapsed / 1e9
    table.add_row("throughput", f"{total / elapsed:,.1f} batches/s, {gbps:.2f} GB/s")
    table.add_row("first batch", f"{first_batch_s * 1000:.1f} ms after the server was ready")
    for pid, uss in memory:
        table.add_row(f"worker pid {pid}", f"USS {format_bytes(uss)}" if uss is not None
                      else "USS unreadable (no permission)")
    console.print(table)
    return 0
