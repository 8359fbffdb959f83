"""Small helpers shared by the tests (a module of its own, importable like seqs)."""

from __future__ import annotations

import time
from typing import Any

POLL_S = 0.1


def wait_for(condition: Any, what: str, timeout: float = 20.0) -> Any:
    """Poll ``condition()`` until it is truthy (return it) or fail after ``timeout`` seconds,
    naming ``what``. For state the server reaches asynchronously (a reclaimed consumer, a
    replaced worker), never to paper over a race."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(POLL_S)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def worker_pids(endpoint: str) -> list[int]:
    """The pids of the server's running process workers, from its status. Not the server's
    children: with the forkserver start method, workers are the fork server's children."""
    from dataserver.status import fetch_status

    return [w["pid"] for w in fetch_status(endpoint)["workers"]
            if w["state"] != "starting" and w["kind"] == "process"]


def wait_prefetched(endpoint: str, held: int) -> dict[str, Any]:
    """Wait until every worker is idle with at least ``held`` ring slots leased or written
    (the prefetch made and not read); returns that status."""
    from dataserver.status import fetch_status

    def settled() -> dict[str, Any] | None:
        status: dict[str, Any] = fetch_status(endpoint)
        idle = all(w["state"] == "idle" for w in status["workers"])
        return status if idle and status["ring"]["held"] >= held else None

    status: dict[str, Any] = wait_for(settled, "the prefetch to be made")
    return status
