"""Observability: ``status --json`` against its documented schema, status figures against psutil,
Prometheus metrics scraped over HTTP, JSON logs, and ``top`` on a terminal."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

import seqs
from dataserver.client import RemoteSequence
from dataserver.errors import ConfigError
from dataserver.metrics import METRIC_NAMES, MetricsExporter
from dataserver.monitor import SCHEMA_VERSION
from dataserver.procmem import segment_prefix, segments_memory
from dataserver.shm import shm_dir as isolated_shm_dir
from dataserver.status import fetch_status
from dataserver.top import sparkline
from helpers import wait_prefetched

HERE = Path(__file__).parent
DOC = HERE.parent / "docs" / "status.md"
MiB = 1 << 20

#: The ``status --json`` layout: section -> field -> type as written in docs/status.md
#: ("int or null": may be null; "(optional)": may be absent). The doc's tables must say exactly
#: this (test_schema_here_is_the_documented_one), and a live server must follow it.
SCHEMA: dict[str, dict[str, str]] = {
    "top level": {
        "schema": "int", "server": "object", "datasets": "list", "workers": "list",
        "ring": "object", "consumers": "list", "counters": "object",
        "fork_server": "object (optional)",
    },
    "fork_server": {
        "pid": "int", "rss": "int or null", "uss": "int or null", "pss": "int or null",
        "swap": "int or null", "cpu_percent": "float or null",
    },
    "server": {
        "id": "str", "pid": "int", "endpoint": "str", "state": "str", "uptime_s": "float",
        "worker_type": "str", "workers": "int", "prefetch": "int", "rss": "int or null",
        "uss": "int or null", "pss": "int or null", "swap": "int or null",
        "cpu_percent": "float or null", "threads": "int (optional)",
    },
    "datasets[]": {"name": "str", "length": "int", "shuffle": "bool", "seed": "int"},
    "workers[]": {
        "index": "int", "incarnation": "int", "pid": "int", "kind": "str", "state": "str",
        "batch": "int or null", "dataset": "str or null", "batch_seconds": "float or null",
        "queued": "int", "done": "int", "errors": "int", "age_s": "float", "stuck": "bool",
        "retiring": "str or null", "growing": "bool", "rss": "int or null",
        "uss": "int or null", "pss": "int or null", "swap": "int or null",
        "cpu_percent": "float or null", "memory_note": "str (optional)",
        "memory_age_s": "float (optional)", "host": "str (optional)",
        "transport": "str (optional)",
    },
    "ring": {
        "slots": "int", "slot_bytes": "int", "held": "int", "cached": "int", "free": "int",
        "quarantined": "int", "bytes": "int", "one_off_segments": "int",
        "one_off_bytes": "int", "shm_dir": "str", "name": "str",
    },
    "consumers[]": {
        "id": "str", "name": "str", "pid": "int", "same_host": "bool", "dataset": "str",
        "epoch": "int", "position": "int", "leases": "int", "waiting": "int",
        "delivered": "int", "batches_per_s": "float", "bytes_per_s": "int", "gone": "bool",
        "age_s": "float", "silent_s": "float", "reading": "bool",
    },
}
_IS = {
    "int": lambda v: type(v) is int,
    "float": lambda v: type(v) in (int, float),  # a JSON number; 3.0 may be written 3
    "str": lambda v: type(v) is str,
    "bool": lambda v: type(v) is bool,
    "list": lambda v: type(v) is list,
    "object": lambda v: type(v) is dict,
}


def doc_tables() -> dict[str, dict[str, str]]:
    """docs/status.md's tables: heading -> first column (a `name`) -> second column."""
    tables: dict[str, dict[str, str]] = {}
    section = ""
    for line in DOC.read_text().splitlines():
        if m := re.match(r"^#{2,3} `?([^`]+?)`?$", line):
            section = m.group(1)
        elif m := re.match(r"^\| `(\w+)` \| ([^|]*?) \|", line):
            tables.setdefault(section, {})[m.group(1)] = m.group(2)
    return tables


def check_object(where: str, obj: dict[str, Any], schema: dict[str, str]) -> None:
    undocumented = set(obj) - set(schema)
    assert not undocumented, (
        f"{where} has fields {sorted(undocumented)} that docs/status.md does not describe: "
        "document them there and in SCHEMA in tests/test_observability.py")
    for field, spec in schema.items():
        if field not in obj:
            assert spec.endswith("(optional)"), f"{where} lacks {field!r}"
            continue
        base = spec.removesuffix(" (optional)")
        value = obj[field]
        if value is None:
            assert base.endswith(" or null"), f"{where}.{field} is null; documented {spec}"
        else:
            assert _IS[base.removesuffix(" or null")](value), \
                f"{where}.{field} = {value!r}; documented {spec}"


def check_snapshot(snap: dict[str, Any]) -> None:
    check_object("status", snap, SCHEMA["top level"])
    check_object("server", snap["server"], SCHEMA["server"])
    check_object("ring", snap["ring"], SCHEMA["ring"])
    if "fork_server" in snap:
        check_object("fork_server", snap["fork_server"], SCHEMA["fork_server"])
    for part in ("datasets", "workers", "consumers"):
        for i, item in enumerate(snap[part]):
            check_object(f"{part}[{i}]", item, SCHEMA[f"{part}[]"])
    assert all(type(k) is str and type(v) is int for k, v in snap["counters"].items())
    undocumented = set(snap["counters"]) - set(doc_tables()["counters"])
    assert not undocumented, f"counters {sorted(undocumented)} are not in docs/status.md"


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dataserver", *args], cwd=HERE,
                          capture_output=True, text=True, timeout=timeout)


def wait_for(check: Callable[[], Any], what: str, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def listening_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


# --- the schema --------------------------------------------------------------------------------

def test_schema_here_is_the_documented_one() -> None:
    tables = doc_tables()
    for section, fields in SCHEMA.items():
        assert tables.get(section) == fields, f"docs/status.md section {section!r} differs"
    assert f"now `{SCHEMA_VERSION}`" in DOC.read_text(), "docs/status.md names another schema"
    assert set(tables["Metrics"]) == set(METRIC_NAMES), "docs/status.md lists other metrics"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("worker_type", ["process", "thread"])
def test_status_json_follows_the_documented_schema(serve: Any, worker_type: str) -> None:
    server = serve(seqs.Indexed(200, delay=0.02), workers=2, worker_type=worker_type)
    with RemoteSequence(server.endpoint) as seq, \
            RemoteSequence(server.endpoint, name="idle"):  # connected, asks for nothing
        it = iter(seq)
        for _ in range(10):
            next(it)
        out = run_cli("status", "--json", "--endpoint", server.endpoint)
        assert out.returncode == 0, out.stderr
        snap = json.loads(out.stdout)
    check_snapshot(snap)
    idle = [c for c in snap["consumers"] if c["name"] == "idle"]
    assert [(c["reading"], c["delivered"]) for c in idle] == [(False, 0)]
    snap["consumers"].remove(idle[0])
    assert snap["schema"] == SCHEMA_VERSION
    assert snap["server"]["pid"] == server.pid and snap["server"]["state"] == "running"
    assert snap["server"]["worker_type"] == worker_type and len(snap["workers"]) == 2
    assert snap["server"]["uss"] > 0 and snap["counters"]["produced"] >= 10
    r = snap["ring"]
    assert r["held"] + r["cached"] + r["free"] + r["quarantined"] == r["slots"] > 0
    assert r["bytes"] == r["slots"] * r["slot_bytes"]
    [c] = snap["consumers"]
    assert c["pid"] == os.getpid() and c["delivered"] >= 10 and c["leases"] >= 1
    for w in snap["workers"]:
        assert w["kind"] == worker_type
        if worker_type == "thread":
            assert w["uss"] is None and w["pid"] == server.pid and "memory_note" in w
        else:
            assert w["uss"] > 0 and "memory_note" not in w
    if worker_type == "thread":
        assert "fork_server" not in snap
    else:  # the default start method: every worker is the fork server's child
        fs = snap["fork_server"]
        assert fs["uss"] > 0 and psutil.Process(fs["pid"]).ppid() == server.pid
        assert {psutil.Process(w["pid"]).ppid() for w in snap["workers"]} == {fs["pid"]}


@pytest.mark.timeout(120)
def test_worker_figures_agree_with_psutil(serve: Any) -> None:
    server = serve(seqs.Indexed(100, rows=256, cols=256), workers=2)
    with RemoteSequence(server.endpoint) as seq:
        assert [int(y[0]) for _x, y in seq] == list(range(100))
    snap = fetch_status(server.endpoint)
    # the server's children, or the fork server's (the default start method)
    children = {p.pid for p in psutil.Process(server.pid).children(recursive=True)}
    assert snap["server"]["pid"] == server.pid
    assert sum(w["done"] for w in snap["workers"]) >= 100
    prefix = segment_prefix(isolated_shm_dir(), snap["server"]["id"])
    for w in snap["workers"]:
        assert w["pid"] in children, f"worker pid {w['pid']} is not the server's"
        mine = psutil.Process(w["pid"]).memory_full_info()
        ring = segments_memory(w["pid"], prefix)  # left out: the ring is reported as such
        assert ring["rss"] > 0, "the worker wrote batches into the ring"
        for kind in ("uss", "rss", "pss"):
            theirs, ours = w[kind], getattr(mine, kind) - ring[kind]
            assert abs(theirs - ours) <= max(0.25 * ours, 10 * MiB), (w["index"], kind,
                                                                        theirs, ours)
        assert w["swap"] == mine.swap or abs(w["swap"] - mine.swap) <= 10 * MiB
        assert w["cpu_percent"] is not None and w["cpu_percent"] >= 0
    me = psutil.Process(server.pid).memory_full_info()
    assert abs(snap["server"]["uss"] - me.uss) <= max(0.25 * me.uss, 10 * MiB)


@pytest.mark.timeout(120)
def test_worker_memory_leaves_out_the_ring_pages_it_wrote(serve: Any) -> None:
    """Batches made ahead and not read yet sit in ring pages only their worker has mapped, so
    psutil counts them in its USS (130-154 MiB per worker with 32 batches of 8 MiB waiting,
    enough for --max-worker-memory to replace healthy workers). status leaves them out: they
    are the ring's, reported once as such."""
    batch = 4 * MiB
    server = serve(seqs.Indexed(64, rows=1024, cols=1024), workers=2, prefetch=24)
    with RemoteSequence(server.endpoint) as seq:
        assert int(seq[0][1][0]) == 0
        it = iter(seq)
        assert int(next(it)[1][0]) == 0  # the rest of the prefetch is made, and not read
        snap = wait_prefetched(server.endpoint, held=20)
        prefix = segment_prefix(isolated_shm_dir(), snap["server"]["id"])
        raw = {w["pid"]: psutil.Process(w["pid"]).memory_full_info().uss
               for w in snap["workers"]}
        ring = {pid: segments_memory(pid, prefix)["uss"] for pid in raw}
        assert sum(ring.values()) >= 18 * batch, "the workers wrote the ring pages alone"
        for w in snap["workers"]:
            own = raw[w["pid"]] - ring[w["pid"]]
            assert abs(w["uss"] - own) <= 8 * MiB, (w["index"], w["uss"], own, raw[w["pid"]])
            assert w["uss"] < 64 * MiB
        del it


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["status", "top"])
def test_no_server_is_one_clear_line_and_exit_1(isolated: dict[str, Path], command: str) -> None:
    endpoint = f"ipc://{isolated['runtime']}/nobody.sock"
    out = run_cli(command, "--endpoint", endpoint, "--timeout", "0.5")
    assert out.returncode == 1
    assert out.stderr.strip() == f"dataserver {command}: no dataserver answered at {endpoint} " \
                                 "within 0.5 s", out.stderr
    assert not out.stdout


# --- metrics -----------------------------------------------------------------------------------

def scrape(port: int) -> dict[str, Any]:
    """family name as exposed (counters with _total) -> family."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {f.name + ("_total" if f.type == "counter" else ""): f
            for f in text_string_to_metric_families(text)}


def values(family: Any) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples
            if not s.name.endswith("_created")}


@pytest.mark.timeout(120)
def test_metrics_scraped_over_http_while_a_consumer_reads(serve: Any) -> None:
    port = free_port()
    server = serve(seqs.Indexed(300, delay=0.01), workers=2, metrics=f"127.0.0.1:{port}")
    with RemoteSequence(server.endpoint, name="trainer-0") as seq:
        it = iter(seq)
        for _ in range(50):
            next(it)

        def delivered() -> dict[str, Any] | None:
            fams = scrape(port)
            if "dataserver_consumer_batches_total" not in fams:  # no snapshot yet
                return None
            got = values(fams["dataserver_consumer_batches_total"])
            return fams if got.get((("consumer", "trainer-0"), ("dataset", "default")),
                                   0) >= 50 else None

        fams = wait_for(delivered, "the scrape to show 50 batches delivered")
        rest = sum(1 for _ in it)
    assert rest == 250
    assert set(fams) == set(METRIC_NAMES)
    text = DOC.read_text()
    assert all(f"`{name}`" in text for name in fams), "a metric is missing in docs/status.md"
    assert [s.value for s in fams["dataserver_up"].samples] == [1.0]
    assert fams["dataserver_batches_total"].type == "counter"
    assert fams["dataserver_batches_total"].samples[0].value >= 50
    assert fams["dataserver_bytes_total"].samples[0].value >= 50 * 16 * 16 * 4
    mem = values(fams["dataserver_worker_memory_bytes"])
    assert {dict(k)["worker"] for k in mem} == {"0", "1"}
    assert {dict(k)["kind"] for k in mem} == {"rss", "uss", "pss", "swap"}
    assert all(v > 0 for k, v in mem.items() if dict(k)["kind"] != "swap")
    server_mem = values(fams["dataserver_server_memory_bytes"])
    assert server_mem[(("kind", "uss"),)] > 0
    assert values(fams["dataserver_fork_server_memory_bytes"])[(("kind", "uss"),)] > 0
    done = values(fams["dataserver_worker_batches_total"])
    assert set(done) == {(("worker", "0"),), (("worker", "1"),)} and sum(done.values()) >= 50
    slots = values(fams["dataserver_ring_slots"])
    assert {dict(k)["state"] for k in slots} == {"held", "cached", "free", "quarantined"}
    ring_bytes = fams["dataserver_ring_bytes"].samples[0].value
    slot_bytes = fams["dataserver_ring_slot_bytes"].samples[0].value
    assert sum(slots.values()) == ring_bytes / slot_bytes > 0
    lag = values(fams["dataserver_consumer_lag_batches"])
    assert list(lag) == [(("consumer", "trainer-0"), ("dataset", "default"))]
    assert 0 <= next(iter(lag.values())) <= 300
    leases = values(fams["dataserver_consumer_leases"])
    assert next(iter(leases.values())) >= 1
    events = {dict(k)["event"] for k in values(fams["dataserver_events_total"])}
    assert "produced" not in events and "bytes" not in events
    info = fams["dataserver_info"].samples[0].labels
    assert info["endpoint"] == server.endpoint and info["worker_type"] == "process"


def test_metrics_exporter_before_any_snapshot_and_close_releases_the_port() -> None:
    with MetricsExporter("127.0.0.1:0") as exporter:
        port = exporter.port
        fams = scrape(port)
        assert [s.value for s in fams["dataserver_up"].samples] == [0.0]
        with pytest.raises(ConfigError, match=rf"^--metrics 127.0.0.1:{port}: port {port} is "
                                              "taken"):
            MetricsExporter(f"127.0.0.1:{port}")
    assert not exporter._thread.is_alive()
    exporter.close()  # twice is fine
    with pytest.raises(OSError):
        scrape(port)
    with MetricsExporter(f"127.0.0.1:{port}") as again:  # the port is free again
        assert again.port == port


@pytest.mark.timeout(60)
def test_cli_metrics_port_taken_is_one_clear_line(isolated: dict[str, Path]) -> None:
    with listening_port() as port:
        out = run_cli("serve", "seqs:Indexed", "--workers", "1", "--endpoint",
                      f"ipc://{isolated['runtime']}/m.sock", "--metrics", f"127.0.0.1:{port}")
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert errors == [f"dataserver: error: --metrics 127.0.0.1:{port}: port {port} is taken "
                      "(another process listens there); pick a free one"], out.stderr
    assert "Traceback" not in out.stderr


# --- logs --------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_log_format_json_makes_every_stderr_line_an_object(isolated: dict[str, Path]) -> None:
    endpoint = f"ipc://{isolated['runtime']}/json.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dataserver", "serve", "seqs:Sized", "--arg", "big_at=[3]",
         "--workers", "2", "--endpoint", endpoint, "--log-format", "json",
         "--log-level", "DEBUG"],
        cwd=HERE, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == f"dataserver: ready at {endpoint}\n", line
        with RemoteSequence(endpoint) as seq:
            assert [int(y[0]) for _x, y in seq] == list(range(12))
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines = err.splitlines()
    assert lines, "no log lines"
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"a stderr line is not JSON: {line!r}")
        assert isinstance(record, dict) and {"level", "message"} <= set(record), line
        records.append(record)
    messages = " | ".join(r["message"] for r in records)
    for event in ("ready at", "SIGTERM", "stopped"):
        assert event in messages, messages
    assert any(r["level"] == "WARNING" and "one-off" in r["message"] for r in records), messages


# --- top ---------------------------------------------------------------------------------------

def test_sparkline() -> None:
    assert sparkline([]) == ""
    assert sparkline([1, 2, 3], floor=0) == "▁▅█"
    assert sparkline([5 * MiB] * 4) == "▁▁▁▁"
    assert sparkline([0, 10 * MiB]) == "▁█"
    assert sparkline([0, 100], floor=MiB) == "▁▁"  # below the floor: flat


class Pty:
    """A child's terminal: what it printed so far, read without blocking it."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 100, 220, 0, 0))
        self.text = ""

    def read_until(self, done: Callable[[str], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done(self.text) and self._read(deadline):
            pass
        assert done(self.text), f"no {what} on top's terminal: {self.text[-3000:]!r}"

    def wait(self, proc: subprocess.Popen[str], timeout_s: float) -> int:
        """Wait for ``proc`` to exit, reading its terminal meanwhile: a child blocked writing
        to a full terminal buffer never gets to exit."""
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            self._read(min(deadline, time.monotonic() + 0.1))
        return proc.wait(max(0.0, deadline - time.monotonic()))

    def drain(self) -> None:
        while self._read(time.monotonic() + 0.5):
            pass

    def _read(self, deadline: float) -> bool:
        """Read what is there; False at the deadline or once the child closed its terminal."""
        if not select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))[0]:
            return False
        try:
            self.text += os.read(self.master, 1 << 16).decode(errors="replace")
        except OSError:  # EIO: the child closed its terminal
            return False
        return True

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.mark.timeout(120)
def test_top_refreshes_shows_an_outage_and_exits_0_on_ctrl_c(serve: Any) -> None:
    server = serve(seqs.Indexed(100, delay=0.01), workers=2)
    with RemoteSequence(server.endpoint) as seq:
        for _ in zip(range(20), seq, strict=False):
            pass
    pids = [str(w["pid"]) for w in fetch_status(server.endpoint)["workers"]]
    term = Pty()
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "220", "LINES": "100"}
    # started with SIGINT ignored, as `top &` from a script would be: Ctrl-C still quits
    proc = subprocess.Popen(
        ["sh", "-c", 'trap "" INT; exec "$0" "$@"', sys.executable, "-m", "dataserver",
         "top", "--endpoint", server.endpoint, "--interval", "0.2", "--timeout", "0.5"],
        stdin=subprocess.DEVNULL, stdout=term.slave, stderr=subprocess.PIPE, text=True, env=env)
    try:
        term.read_until(lambda t: t.count("dataserver top:") >= 3
                        and all(pid in t for pid in pids), 30, "three refreshes")
        assert "memory trend" in term.text and "worker 1" in term.text
        server.close()
        term.read_until(lambda t: "no dataserver answered" in t, 30, "outage")
        assert proc.poll() is None, "top must keep retrying when the server stops answering"
        proc.send_signal(signal.SIGINT)
        assert term.wait(proc, 20) == 0
        term.drain()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        _, err = proc.communicate()
        term.close()
    assert "Traceback" not in err, err


@pytest.mark.timeout(120)
def test_a_status_request_reads_a_few_workers_memory_anew(serve: Any) -> None:
    """Each read walks the worker's page tables while the server's loop waits: a status
    request reads at most STATUS_READS workers anew, and says how old the others' are."""
    from dataserver.monitor import STATUS_READS

    workers = STATUS_READS + 3
    server = serve(seqs.Indexed(4), workers=workers)
    wait_for(lambda: all(w["state"] != "starting" for w in fetch_status(server.endpoint)[
        "workers"]), "every worker to start")
    fetch_status(server.endpoint)  # whatever was never read is read now
    ages = [w["memory_age_s"] for w in fetch_status(server.endpoint)["workers"]]
    assert len(ages) == workers and all(a >= 0 for a in ages)
    assert sum(a == 0 for a in ages) == STATUS_READS, ages
    assert all(w["uss"] for w in fetch_status(server.endpoint)["workers"])


def test_metrics_snapshots_read_a_few_workers_anew_each_time() -> None:
    """Reading a worker's memory walks its smaps (~2 ms with a big ring mapped): the exporter's
    snapshot every half second reads the few read longest ago anew, never yet read first."""
    from dataserver.monitor import Monitor

    m = Monitor()
    m._figures = {pid: (float(pid), {}) for pid in range(10, 18)}  # pid 10 read longest ago
    assert m.due([10, 11, 12], None) == {10, 11, 12}
    assert m.due([*range(10, 18), 99], 3) == {99, 10, 11}
    assert m.due([17, 16], 4) == {16, 17}
