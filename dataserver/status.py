"""``dataserver status``: ask a server for its snapshot; print it as tables or JSON."""

from __future__ import annotations

import json
import sys
from typing import Any

import msgpack
import zmq

from dataserver.curve import client_keys, secure_client
from dataserver.errors import ProtocolError, ServerUnavailable
from dataserver.protocol import Refused, Stacks, Status, StatusReply, decode, encode
from dataserver.shm import format_bytes

__all__ = ["fetch_status", "render", "run_status"]


def fetch_status(endpoint: str, timeout: float = 3.0, stacks: bool = False,
                 curve_keys: str | None = None) -> dict[str, Any]:
    """The server's snapshot (with every worker's Python stack under "stacks" if ``stacks``),
    or ServerUnavailable if nothing answers within ``timeout``."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        secure_client(sock, client_keys(curve_keys))
        sock.connect(endpoint)
        sock.send(encode(Stacks() if stacks else Status()))
        if not sock.poll(int(timeout * 1000)):
            raise ServerUnavailable(f"no dataserver answered at {endpoint} within {timeout:g} s")
        msg = decode(sock.recv())
        if isinstance(msg, Refused):
            raise ProtocolError(f"the server refused the status request: {msg.reason}")
        if not isinstance(msg, StatusReply):
            raise ProtocolError(f"expected a status reply, got {type(msg).__name__}")
        snapshot: dict[str, Any] = msgpack.unpackb(msg.snapshot, raw=False)
        return snapshot
    finally:
        ctx.destroy(0)


def _mem(v: Any) -> str:
    return "n/a" if v is None else format_bytes(v)


def render(snap: dict[str, Any]) -> Any:
    """The snapshot as rich renderables: server, workers, ring, consumers."""
    from rich.console import Group
    from rich.table import Table

    s = snap["server"]
    head = Table(title=f"dataserver {s['id']} at {s['endpoint']}", show_header=False)
    head.add_row("server", f"pid {s['pid']}, {s['state']}, up {s['uptime_s']:.0f} s, "
                           f"RSS {_mem(s['rss'])}, USS {_mem(s['uss'])}, CPU {s['cpu_percent']}%")
    fs = snap.get("fork_server")
    if fs is not None:
        head.add_row("fork server", f"pid {fs['pid']}, RSS {_mem(fs['rss'])}, USS "
                                    f"{_mem(fs['uss'])}: the modules the workers share")
    for d in snap["datasets"]:
        head.add_row(f"dataset {d['name']}", f"{d['length']} batches"
                     + (f", shuffled (seed {d['seed']})" if d["shuffle"] else ""))
    r = snap["ring"]
    head.add_row("ring", f"{r['slots']} slots x {format_bytes(r['slot_bytes'])} = "
                         f"{format_bytes(r['bytes'])}: {r['held']} held, {r['cached']} cached, "
                         f"{r['free']} free; {r['one_off_segments']} one-off segments "
                         f"({format_bytes(r['one_off_bytes'])})")
    counters = ", ".join(f"{k} {v}" for k, v in sorted(snap["counters"].items()))
    head.add_row("counters", counters or "none yet")
    workers = Table(title="workers")
    for col in ("#", "pid", "kind", "state", "batch", "for s", "RSS", "USS", "PSS", "swap",
                "CPU %", "done", "errors", "age s"):
        workers.add_column(col, justify="right")
    for w in snap["workers"]:
        workers.add_row(str(w["index"]), str(w["pid"]), w["kind"], w["state"],
                        "" if w["batch"] is None else str(w["batch"]),
                        "" if w["batch_seconds"] is None else f"{w['batch_seconds']:.1f}",
                        _mem(w["rss"]), _mem(w["uss"]), _mem(w["pss"]), _mem(w["swap"]),
                        "n/a" if w["cpu_percent"] is None else f"{w['cpu_percent']:.0f}",
                        str(w["done"]), str(w["errors"]), f"{w['age_s']:.0f}")
    consumers = Table(title="consumers")
    for col in ("name", "dataset", "epoch", "position", "held", "batches/s", "MB/s", "silent s"):
        consumers.add_column(col, justify="right")
    for c in snap["consumers"]:
        consumers.add_row(c["name"], c["dataset"], str(c["epoch"]), str(c["position"]),
                          str(c["leases"]), f"{c['batches_per_s']:.1f}",
                          f"{c['bytes_per_s'] / 1e6:.1f}", f"{c['silent_s']:.0f}")
    return Group(head, workers, consumers)


def run_status(endpoint: str, as_json: bool, timeout: float, stacks: bool = False) -> int:
    try:
        snap = fetch_status(endpoint, timeout, stacks)
    except (ServerUnavailable, ProtocolError) as exc:
        print(f"dataserver status: {exc}", file=sys.stderr)
        return 1
    if as_json:
        json.dump(snap, sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    from rich.console import Console

    console = Console()
    console.print(render(snap))
    for worker, text in snap.get("stacks", {}).items():
        console.rule(f"worker {worker}")
        console.print(text.rstrip(), markup=False, highlight=False)
    return 0
