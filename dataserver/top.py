"""``dataserver top``: the ``status`` view refreshed live in the terminal, plus a memory trend.

Every ``--interval`` seconds it asks the server for a snapshot (``fetch_status``) and redraws
``status.render(snapshot)`` with a table below it: for the server process and each process
worker, a sparkline of its USS (RSS where USS cannot be read) over the last TREND_POINTS
refreshes and how much it changed over them, so a worker that keeps growing stands out.
Thread workers have no memory of their own; their cost is in the server's row.

Exit codes: 0 on Ctrl-C (SIGINT); 1 with one line on stderr when no server answers the very
first request (a wrong endpoint should not leave a blank screen). Once the server has answered,
a server that stops answering is shown in red above the last view it gave, and ``top`` keeps
asking every interval until it answers again or Ctrl-C.

On a terminal the view is redrawn in place (rich ``Live``); when stdout is not a terminal, rich
prints only the last view, at exit.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from dataserver.errors import ConfigError, ProtocolError, ServerUnavailable
from dataserver.shm import format_bytes
from dataserver.status import fetch_status, render

__all__ = ["MemoryTrend", "run_top", "sparkline"]

#: Refreshes of memory history drawn per worker.
TREND_POINTS = 40
#: A window whose memory varies less than this is drawn flat (page-level noise is not a trend).
TREND_FLOOR_BYTES = 1 << 20
BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], floor: float = TREND_FLOOR_BYTES) -> str:
    """One block character per value, scaled from the window's minimum over
    ``max(max - min, floor)``: ``sparkline([1, 2, 3], floor=0) == "▁▅█"``."""
    if not values:
        return ""
    lo = min(values)
    span = max(max(values) - lo, floor, 1e-12)
    top = len(BLOCKS) - 1
    return "".join(BLOCKS[min(top, round((v - lo) / span * top))] for v in values)


def _figure(proc: dict[str, Any]) -> tuple[str, int] | None:
    """(kind, bytes): USS, or RSS where USS cannot be read; None when neither can."""
    for kind in ("uss", "rss"):
        if proc.get(kind) is not None:
            return kind, int(proc[kind])
    return None


class MemoryTrend:
    """The memory of the server and of each process worker over the last ``points`` snapshots,
    keyed by pid (a replaced worker starts a new line)."""

    def __init__(self, points: int = TREND_POINTS) -> None:
        self.points = points
        self._series: dict[int, tuple[str, deque[int]]] = {}

    def add(self, snap: dict[str, Any]) -> None:
        procs = [snap["server"], *(w for w in snap["workers"] if w["kind"] == "process")]
        alive = set()
        for proc in procs:
            pid, figure = proc["pid"], _figure(proc)
            if not pid or figure is None:
                continue
            alive.add(pid)
            kind, value = figure
            known = self._series.get(pid)
            if known is None or known[0] != kind:
                known = self._series[pid] = (kind, deque(maxlen=self.points))
            known[1].append(value)
        for pid in set(self._series) - alive:
            del self._series[pid]

    def history(self, pid: int) -> tuple[str, list[int]]:
        """(kind, values oldest first) of ``pid``; ("", []) when there is none."""
        kind, values = self._series.get(pid, ("", deque()))
        return kind, list(values)

    def table(self, snap: dict[str, Any], interval: float) -> Any:
        from rich.table import Table

        table = Table(title=f"memory trend (last {self.points} refreshes, every {interval:g} s)")
        for col, justify in (("", "left"), ("pid", "right"), ("kind", "left"), ("now", "right"),
                             ("trend", "left"), ("change", "right")):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        rows = [("server", snap["server"]["pid"])]
        rows += [(f"worker {w['index']}", w["pid"]) for w in snap["workers"]
                 if w["kind"] == "process"]
        for label, pid in rows:
            kind, values = self.history(pid)
            if not values:
                table.add_row(label, str(pid), "n/a", "n/a", "", "")
                continue
            change = values[-1] - values[0]
            sign = "+" if change > 0 else ("-" if change < 0 else "±")
            table.add_row(label, str(pid), kind.upper(), format_bytes(values[-1]),
                          sparkline(values), f"{sign}{format_bytes(abs(change))}")
        if any(w["kind"] == "thread" for w in snap["workers"]):
            table.caption = "thread workers share the server process's memory: see its row"
        return table


def _frame(endpoint: str, interval: float, snap: dict[str, Any], trend: MemoryTrend,
           trouble: str | None, last_ok: float) -> Any:
    from rich.console import Group
    from rich.text import Text

    when = time.strftime("%H:%M:%S", time.localtime(last_ok))
    if trouble is None:
        head = Text(f"dataserver top: {endpoint} at {when}, every {interval:g} s; "
                    "Ctrl-C to quit", style="bold")
    else:
        head = Text(f"{trouble}; below is its last answer, from {when}; retrying every "
                    f"{interval:g} s, Ctrl-C to quit", style="bold red")
    return Group(head, render(snap), trend.table(snap, interval))


def run_top(endpoint: str, interval: float, timeout: float, console: Any = None) -> int:
    """Redraw the status view every ``interval`` seconds until Ctrl-C (exit 0); exit 1 when
    the first request gets no answer within ``timeout``."""
    if not interval > 0:
        raise ConfigError(f"--interval must be positive seconds, got {interval:g}")
    try:
        snap = fetch_status(endpoint, timeout)
    except (ServerUnavailable, ProtocolError) as exc:
        print(f"dataserver top: {exc}", file=sys.stderr)
        return 1
    from rich.console import Console
    from rich.live import Live

    if threading.current_thread() is threading.main_thread():
        # Ctrl-C quits even when started with SIGINT ignored (`top &` from a script, or from a
        # parent that was inside system() when it forked): top is interactive
        signal.signal(signal.SIGINT, signal.default_int_handler)
    trend = MemoryTrend()
    trend.add(snap)
    last_ok, trouble = time.time(), None
    try:
        with Live(_frame(endpoint, interval, snap, trend, None, last_ok),
                  console=console or Console(), auto_refresh=False) as live:
            next_at = time.monotonic()
            while True:
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))
                try:
                    snap = fetch_status(endpoint, timeout)
                except (ServerUnavailable, ProtocolError) as exc:
                    trouble = str(exc)
                else:
                    trend.add(snap)
                    last_ok, trouble = time.time(), None
                next_at = max(next_at, time.monotonic())  # no burst of requests after a stall
                live.update(_frame(endpoint, interval, snap, trend, trouble, last_ok),
                            refresh=True)
    except KeyboardInterrupt:
        return 0
