"""Fixtures: every test runs with its own runtime and shared-memory directories, and must leave
no process, segment or socket file behind (checked after each test), not even a process that
outlived its parent."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from dataserver import DataServer

LEFTOVER_GRACE_S = 10.0


def _is_resource_tracker(p: psutil.Process) -> bool:
    """multiprocessing starts one resource tracker per parent process, the first time it spawns;
    it lives exactly as long as that parent (the test run), so it is not a leak of the test."""
    with contextlib.suppress(psutil.Error):
        return any("multiprocessing.resource_tracker" in part for part in p.cmdline())
    return False


def _ours(shmdir: Path, before: set[int]) -> list[psutil.Process]:
    """Live processes this test started: our descendants, and any process anywhere whose
    environment carries this test's DATASERVER_SHM_DIR (every process a test starts inherits
    it), which catches those that outlived their parent and were reparented away from us."""
    me = psutil.Process()
    found = {p.pid: p for p in me.children(recursive=True) if p.pid not in before}
    tag = str(shmdir)
    for p in psutil.process_iter():
        if p.pid in found or p.pid == me.pid or p.pid in before:
            continue
        with contextlib.suppress(psutil.Error):
            if p.environ().get("DATASERVER_SHM_DIR") == tag:
                found[p.pid] = p
    out = []
    for p in found.values():
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE \
                    and not _is_resource_tracker(p):
                out.append(p)
    return out


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    """Private DATASERVER_RUNTIME_DIR and DATASERVER_SHM_DIR (a tmpfs folder) per test; after
    the test: no child processes, no segments, no socket files."""
    runtime = Path(tempfile.mkdtemp(prefix="ds-rt-", dir="/tmp"))
    shm_root = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())
    shmdir = Path(tempfile.mkdtemp(prefix="ds-test-", dir=shm_root))
    monkeypatch.setenv("DATASERVER_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("DATASERVER_SHM_DIR", str(shmdir))
    monkeypatch.delenv("DATASERVER_ENDPOINT", raising=False)
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    try:
        yield {"runtime": runtime, "shm": shmdir}
        deadline = time.monotonic() + LEFTOVER_GRACE_S
        while True:
            procs = _ours(shmdir, before)
            segments = sorted(os.listdir(shmdir))
            sockets = sorted(str(p.relative_to(runtime)) for p in runtime.rglob("*"))
            if not (procs or segments or sockets) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not procs, f"test left processes running: {[(p.pid, p.cmdline()) for p in procs]}"
        assert not segments, f"test left shared-memory segments: {segments}"
        assert not sockets, f"test left files in the runtime directory: {sockets}"
    finally:
        for p in _ours(shmdir, before):
            with contextlib.suppress(psutil.Error):
                p.kill()
        shutil.rmtree(runtime, ignore_errors=True)
        shutil.rmtree(shmdir, ignore_errors=True)


@pytest.fixture
def serve(isolated: dict[str, Path]) -> Iterator[Any]:
    """``serve(seq, **options)`` starts a DataServer on a private endpoint; all are closed
    after the test."""
    servers: list[DataServer] = []

    def start(seq: Any = None, **options: Any) -> DataServer:
        n = len(servers)
        options.setdefault("endpoint", f"ipc://{isolated['runtime']}/t{n}.sock")
        options.setdefault("workers", 2)
        options.setdefault("startup_timeout", 60)
        server = DataServer(seq, **options)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.close()
