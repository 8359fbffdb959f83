"""Shared-memory segments: create (owner-only, reserved up front), attach, unlink, sweep.

Every segment is a file in the shm directory (``/dev/shm``, or ``$DATASERVER_SHM_DIR``) named
``dataserver-<server id>-<what>``. The server owns all of its segments: workers and consumers
attach and never unlink. Each server holds an exclusive ``flock`` on its lock file
``dataserver-<server id>.lock`` for its whole life; a segment whose server holds no lock is
stale, and :func:`sweep` removes it (every server start and ``dataserver cleanup`` call it).
flock, not a pid check, decides: it works across pid namespaces (a sidecar container sharing
/dev/shm but not pids) and never mistakes a reused pid for a live server.

Space is reserved with ``posix_fallocate`` when a segment is made, so a /dev/shm that is too
small fails at that moment with a clear message instead of with SIGBUS mid-training.

Imports only the standard library and numpy: the client uses it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dataserver.errors import SharedMemoryError

__all__ = [
    "PREFIX",
    "ServerLock",
    "attach",
    "create",
    "format_bytes",
    "owned_by",
    "runtime_root",
    "shm_dir",
    "sweep",
    "write_one_off",
]

PREFIX = "dataserver-"
_NAME_RE = re.compile(r"^dataserver-([0-9a-f]+-[0-9a-f]+)[-.]")
_SERVER_ID_RE = re.compile(r"^[0-9a-f]+-[0-9a-f]+$")


def shm_dir() -> Path:
    """Where segments live: ``$DATASERVER_SHM_DIR`` or ``/dev/shm``."""
    return Path(os.environ.get("DATASERVER_SHM_DIR") or "/dev/shm")


def runtime_root() -> Path:
    """Owner-only directory for socket files: ``$DATASERVER_RUNTIME_DIR``,
    ``$XDG_RUNTIME_DIR/dataserver`` or ``/tmp/dataserver-<uid>``."""
    explicit = os.environ.get("DATASERVER_RUNTIME_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "dataserver"
    return Path(tempfile.gettempdir()) / f"dataserver-{os.getuid()}"


def private_dir(path: Path) -> Path:
    """Make ``path`` (mode 0700) if missing; refuse one we don't own, close one others can enter."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SharedMemoryError(
            f"cannot create the directory {path} ({exc.strerror}); set DATASERVER_RUNTIME_DIR "
            "to a writable directory"
        ) from None
    st = path.stat()
    if st.st_uid != os.getuid():
        raise SharedMemoryError(
            f"{path} belongs to uid {st.st_uid}, not to you; remove it or set "
            "DATASERVER_RUNTIME_DIR to a directory of your own"
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _too_small(path: Path, size: int, what: str) -> SharedMemoryError:
    try:
        st = os.statvfs(path.parent)
        free = format_bytes(st.f_bavail * st.f_frsize)
        total = format_bytes(st.f_blocks * st.f_frsize)
    except OSError:
        free = total = "unknown"
    return SharedMemoryError(
        f"cannot reserve {format_bytes(size)} of shared memory for {what} in {path.parent} "
        f"({free} free of {total}). Lower --slots or --slot-bytes, or give the container more: "
        "docker run --shm-size=<size>, compose shm_size:, Kubernetes an emptyDir "
        "{medium: Memory, sizeLimit: <size>} mounted at /dev/shm"
    )


@dataclass
class Segment:
    """A mapped segment file. ``mm`` is the mapping; it outlives close() while views exist."""

    path: Path
    size: int
    mm: mmap.mmap

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # views still alive: the map goes with them
            self.mm.close()


def create(path: Path, size: int, what: str) -> Segment:
    """Create ``path`` owner-only, reserve ``size`` bytes of memory for it, map it writable."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SharedMemoryError(
            f"cannot create shared-memory segment {path}: {exc.strerror}"
        ) from None
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise _too_small(path, size, what) from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, size)  # filesystem without fallocate: size it, unreserved
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    return Segment(path, size, mm)


def attach(path: Path, writable: bool) -> Segment:
    """Map an existing segment (read-only for consumers)."""
    try:
        # O_NONBLOCK: a name off a socket could be a FIFO, whose open would block
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
                     | os.O_NONBLOCK)
    except OSError as exc:
        raise SharedMemoryError(
            f"cannot open shared-memory segment {path}: {exc.strerror}. The consumer must see "
            "the server's shared memory: same host, and in containers a shared /dev/shm "
            "(docker --ipc=container:<server>, or one Kubernetes pod)"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SharedMemoryError(f"{path} is not a shared-memory segment (not a file)")
        size = st.st_size
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
    finally:
        os.close(fd)
    return Segment(path, size, mm)


def owned_by(server_id: str, name: str) -> bool:
    """Is ``name`` one of that server's segments (its ring, its one-off segments)? A plain
    file name with the server's prefix: the server unlinks these at close, and a consumer
    maps nothing else it is told to (the name comes off a socket)."""
    return "/" not in name and "\0" not in name and name.startswith(f"{PREFIX}{server_id}-")


def write_one_off(directory: Path, server_id: str, bid: int, nbytes: int,
                  fill: Callable[[np.ndarray[Any, Any]], None]) -> str:
    """A one-off segment for batch ``bid`` (one that does not fit its slot), named under the
    server that owns and unlinks it; ``fill`` writes its ``nbytes`` bytes. Returns the name."""
    name = f"{PREFIX}{server_id}-big-{bid}"
    try:
        seg = create(directory / name, max(nbytes, 1), f"batch of {nbytes} bytes")
    except SharedMemoryError as exc:
        raise SharedMemoryError(f"one-off segment for an oversize batch: {exc}") from None
    try:
        fill(np.frombuffer(seg.mm, np.uint8, nbytes))
    finally:
        seg.close()
    return name


def unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class ServerLock:
    """The flock that marks a server alive. Created under a temporary name, locked, then renamed,
    so no sweeper ever sees it unlocked."""

    def __init__(self, directory: Path, server_id: str) -> None:
        self.path = directory / f"{PREFIX}{server_id}.lock"
        tmp = directory / f".{PREFIX}{server_id}.lock.tmp"
        try:
            self.fd: int | None = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                          0o600)
        except OSError as exc:
            raise SharedMemoryError(
                f"cannot create {tmp}: {exc.strerror}; is {directory} a writable tmpfs? "
                "(set DATASERVER_SHM_DIR to change it)"
            ) from None
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        os.rename(tmp, self.path)

    def release(self) -> None:
        if self.fd is not None:
            unlink(self.path)
            os.close(self.fd)
            self.fd = None


def _alive(directory: Path, server_id: str) -> bool:
    try:
        fd = os.open(directory / f"{PREFIX}{server_id}.lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def sweep(directory: Path | None = None, runtime: Path | None = None) -> list[str]:
    """Remove the segments and runtime directories of servers that are no longer alive."""
    directory = directory or shm_dir()
    runtime = runtime or runtime_root()
    removed: list[str] = []
    verdict: dict[str, bool] = {}

    def dead(server_id: str) -> bool:
        if server_id not in verdict:
            verdict[server_id] = not _alive(directory, server_id)
        return verdict[server_id]

    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            m = _NAME_RE.match(entry.name)
            if m and entry.is_file(follow_symlinks=False) and dead(m.group(1)):
                unlink(Path(entry.path))
                removed.append(entry.path)
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(runtime):
            if (_SERVER_ID_RE.match(entry.name) and entry.is_dir(follow_symlinks=False)
                    and dead(entry.name)) or (
                    stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode)
                    and not socket_listening(entry.path)):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    unlink(Path(entry.path))
                removed.append(entry.path)
    return removed


def socket_listening(path: str) -> bool:
    """Whether a process accepts connections on the unix socket file ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True
