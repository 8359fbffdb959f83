"""Start, watch and stop workers (processes or threads)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import psutil

from dataserver import _preload, shm
from dataserver.worker import WorkerSpec, worker_main

__all__ = ["Pool", "WorkerHandle", "describe_exit"]

log = logging.getLogger("dataserver")
JOIN_TIMEOUT_S = 3.0
TERMINATE_TIMEOUT_S = 2.0


def describe_exit(code: int | None) -> str:
    """``-9`` -> "killed by SIGKILL", ``3`` -> "exit code 3"."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class WorkerHandle:
    spec: WorkerSpec
    process: BaseProcess | None = None
    thread: threading.Thread | None = None

    @property
    def sentinel(self) -> int | None:
        return self.process.sentinel if self.process is not None else None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def killable(self) -> bool:
        return self.process is not None

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.is_alive()
        return self.thread is not None and self.thread.is_alive()

    def exit_reason(self) -> str:
        if self.process is not None:
            return describe_exit(self.process.exitcode)
        return "thread ended"


def _drop_task_fifo(spec: WorkerSpec) -> None:
    if spec.tasks:
        shm.unlink(Path(spec.tasks))


class Pool:
    """The worker set. ``start(i)`` starts (or replaces) worker slot ``i`` as a new incarnation."""

    def __init__(self, template: WorkerSpec, start_method: str) -> None:
        self.template = template
        self.mp: Any = multiprocessing.get_context(start_method)
        self.start_method = start_method
        self._fork_server: psutil.Process | None = None
        if start_method == "forkserver":  # workers then share these pages copy-on-write
            os.environ[_preload.ENV] = ",".join(
                dict.fromkeys(m for m in (s.module for s in template.sources) if m))
            os.environ[_preload.PATH_ENV] = os.pathsep.join(p for p in sys.path if p)
            self.mp.set_forkserver_preload(["numpy", "zmq", "msgpack", "dataserver.worker",
                                            "dataserver._preload"])
        self.handles: dict[int, WorkerHandle] = {}  # by incarnation
        self._next = 0

    def fork_server_pid(self) -> int | None:
        """The fork server's pid (start method forkserver, once it started the first worker):
        the process the workers fork from, which holds the modules they share. None else
        (thread workers start none)."""
        if self.start_method != "forkserver" or self.template.kind != "process":
            return None
        fs = self._fork_server
        if fs is not None and fs.is_running():
            return int(fs.pid)
        self._fork_server = None
        for child in psutil.Process().children():
            try:
                if "multiprocessing.forkserver" in " ".join(child.cmdline()):
                    self._fork_server = child
                    return int(child.pid)
            except psutil.Error:
                continue
        return None

    def start(self, index: int, skip: tuple[int, ...] = ()) -> WorkerHandle:
        spec = replace(self.template, worker=index, incarnation=self._next, skip=skip)
        self._next += 1
        if spec.answers:  # its task FIFO, beside the answer FIFO; the worker opens the read end
            spec = replace(spec, tasks=os.path.join(os.path.dirname(spec.answers),
                                                    f"tasks-{spec.incarnation}.fifo"))
            os.mkfifo(spec.tasks, 0o600)
        h = WorkerHandle(spec)
        if spec.kind == "process":
            h.process = self.mp.Process(target=worker_main, args=(spec,),
                                        name=f"dataserver-worker-{index}", daemon=False)
            h.process.start()
        else:
            h.thread = threading.Thread(target=worker_main, args=(spec,),
                                        name=f"dataserver-worker-{index}", daemon=True)
            h.thread.start()
        self.handles[spec.incarnation] = h
        return h

    def forget(self, incarnation: int) -> WorkerHandle | None:
        h = self.handles.pop(incarnation, None)
        if h is not None:
            _drop_task_fifo(h.spec)
        if h is not None and h.process is not None:
            h.process.join(0.1)
            if not h.process.is_alive():
                h.process.close()
        return h

    def kill(self, incarnation: int) -> None:
        h = self.handles.get(incarnation)
        if h is not None and h.process is not None and h.process.is_alive():
            h.process.kill()

    def stop_all(self, send_stop: Callable[[int], None], connected: set[int]) -> None:
        """Ask every connected worker to stop (``send_stop(incarnation)``) and terminate those
        still starting (a message to them would be lost); then escalate: join, SIGTERM, SIGKILL,
        each with a deadline, logging every escalation."""
        for inc, h in self.handles.items():
            if inc in connected:
                send_stop(inc)
            elif h.process is not None and h.process.is_alive():
                h.process.terminate()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for h in self.handles.values():
            remaining = max(0.0, deadline - time.monotonic())
            if h.process is not None:
                h.process.join(remaining)
            elif h.thread is not None:
                h.thread.join(remaining)
        for h in self.handles.values():
            p = h.process
            if p is not None and p.is_alive():
                log.warning("worker %d (pid %s) did not stop in %.0f s; sending SIGTERM",
                            h.spec.worker, p.pid, JOIN_TIMEOUT_S)
                p.terminate()
                p.join(TERMINATE_TIMEOUT_S)
                if p.is_alive():
                    log.warning("worker %d (pid %s) ignored SIGTERM; sending SIGKILL",
                                h.spec.worker, p.pid)
                    p.kill()
                    p.join(TERMINATE_TIMEOUT_S)
            if h.thread is not None and h.thread.is_alive():
                log.warning("worker thread %d is stuck in the Sequence; abandoning it",
                            h.spec.worker)
        for h in self.handles.values():
            _drop_task_fifo(h.spec)
            if h.process is not None and not h.process.is_alive():
                h.process.close()
        self.handles.clear()

    def close(self) -> None:
        """Nothing left to release once stop_all ran (RayPool shuts Ray down here)."""
