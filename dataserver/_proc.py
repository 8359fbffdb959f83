"""Process facts both sides need: is a pid alive, and which pid namespace are we in.
Standard library only: the client uses it."""

from __future__ import annotations

import os

__all__ = ["pid_alive", "pid_namespace"]


def pid_namespace() -> int:
    """Inode of this process's pid namespace: equal on both sides means pids are comparable."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, not yet reaped by its parent) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")
