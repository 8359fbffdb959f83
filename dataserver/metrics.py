"""``dataserver serve --metrics ADDR:PORT``: the status snapshot as Prometheus metrics over HTTP.

The server's main loop hands the latest snapshot (``Monitor.snapshot``, see docs/status.md) to
``MetricsExporter.update`` every half second; a scrape turns that snapshot into metric families
(no figure is measured on the HTTP thread). The exporter has its own ``CollectorRegistry``, so
two servers in one process (or a test run) never share or clash on metrics, and nothing of the
process-global ``prometheus_client.REGISTRY`` is exported.

Names follow the Prometheus conventions: base units in the name (``_bytes``, ``_seconds``),
``_total`` on counters, and what varies in labels. Workers are labelled by their stable index
(``worker="3"``), not their pid, so a replaced worker continues the same series (its counters
restart from 0, which ``rate()`` treats as a reset). While a retiring worker and its replacement
briefly share an index, the figures of that index are added up (memory and CPU are what the
index costs right now). Consumers are labelled by name and dataset; several consumers with the
same name and dataset (shards read from one process) are added up as well. The full list is in
docs/status.md.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dataserver.errors import ConfigError
from dataserver.procmem import MEMORY_KINDS

__all__ = ["METRIC_NAMES", "MetricsExporter", "families"]

log = logging.getLogger("dataserver")

#: A snapshot older than this means the main loop stopped updating: ``dataserver_up`` is 0.
STALE_AFTER_S = 5.0
#: How long close() waits for the HTTP thread to end after shutting its server down.
CLOSE_TIMEOUT_S = 5.0
_UP_HELP = f"1 while the server runs and its snapshot is fresh (younger than {STALE_AFTER_S:g} s)"
_RING_STATES = ("held", "cached", "free", "quarantined")
#: Snapshot counters with a metric of their own (not repeated in dataserver_events_total).
_OWN_COUNTERS = {"produced": "dataserver_batches_total", "bytes": "dataserver_bytes_total"}

#: Every metric family this module exports, as exposed (counters with their ``_total``).
METRIC_NAMES = (
    "dataserver_up",
    "dataserver_snapshot_age_seconds",
    "dataserver_info",
    "dataserver_uptime_seconds",
    "dataserver_server_memory_bytes",
    "dataserver_server_cpu_percent",
    "dataserver_fork_server_memory_bytes",
    "dataserver_workers",
    "dataserver_worker_memory_bytes",
    "dataserver_worker_cpu_percent",
    "dataserver_worker_batches_total",
    "dataserver_worker_errors_total",
    "dataserver_worker_batch_seconds",
    "dataserver_worker_queued_batches",
    "dataserver_worker_stuck",
    "dataserver_worker_growing",
    "dataserver_worker_retiring",
    "dataserver_batches_total",
    "dataserver_bytes_total",
    "dataserver_events_total",
    "dataserver_ring_slots",
    "dataserver_ring_slot_bytes",
    "dataserver_ring_bytes",
    "dataserver_one_off_segments",
    "dataserver_one_off_bytes",
    "dataserver_consumers",
    "dataserver_consumer_lag_batches",
    "dataserver_consumer_batches_total",
    "dataserver_consumer_leases",
    "dataserver_consumer_batches_per_second",
    "dataserver_consumer_bytes_per_second",
)


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    # prometheus_client appends "_total" to a counter's samples; the family name goes without
    return CounterMetricFamily(name.removesuffix("_total"), doc, labels=list(labels))


def _sum_by(rows: list[dict[str, Any]], key: tuple[str, ...], field: str) -> dict[tuple[str, ...],
                                                                                float]:
    """``field`` added up per distinct ``key`` (label values), skipping None."""
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for row in rows:
        value = row.get(field)
        if value is not None:
            out[tuple(str(row[k]) for k in key)] += value
    return dict(out)


def _server_families(snap: dict[str, Any], age: float) -> Iterator[GaugeMetricFamily]:
    s = snap["server"]
    up = _gauge("dataserver_up", _UP_HELP)
    up.add_metric([], 1.0 if s["state"] == "running" and age < STALE_AFTER_S else 0.0)
    yield up
    g = _gauge("dataserver_snapshot_age_seconds", "seconds since the exported snapshot was taken")
    g.add_metric([], age)
    yield g
    g = _gauge("dataserver_info", "the server's identity (value always 1)",
               ["id", "endpoint", "worker_type"])
    g.add_metric([str(s["id"]), str(s["endpoint"]), str(s["worker_type"])], 1.0)
    yield g
    g = _gauge("dataserver_uptime_seconds", "seconds since the server started")
    g.add_metric([], s["uptime_s"])
    yield g
    g = _gauge("dataserver_server_memory_bytes", "memory of the server process (thread workers "
               "included) by psutil kind; a kind that cannot be read is left out", ["kind"])
    for kind in MEMORY_KINDS:
        if s.get(kind) is not None:
            g.add_metric([kind], s[kind])
    yield g
    g = _gauge("dataserver_server_cpu_percent", "CPU use of the server process, percent of one "
                                                "CPU, since the previous snapshot")
    if s.get("cpu_percent") is not None:
        g.add_metric([], s["cpu_percent"])
    yield g
    g = _gauge("dataserver_fork_server_memory_bytes", "memory of the fork server the process "
               "workers fork from (the modules they share), by psutil kind; absent without one",
               ["kind"])
    fs = snap.get("fork_server") or {}
    for kind in MEMORY_KINDS:
        if fs.get(kind) is not None:
            g.add_metric([kind], fs[kind])
    yield g


def _worker_families(snap: dict[str, Any]) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    workers: list[dict[str, Any]] = snap["workers"]
    by_state = _gauge("dataserver_workers", "workers by state", ["state"])
    states: dict[str, int] = defaultdict(int)
    for w in workers:
        states[str(w["state"])] += 1
    for state in ("starting", "idle", "busy"):
        states.setdefault(state, 0)
    for state, n in sorted(states.items()):
        by_state.add_metric([state], n)
    yield by_state
    mem = _gauge("dataserver_worker_memory_bytes", "memory of a worker process by psutil kind "
                 "(rss, uss, pss, swap); left out where it cannot be read and for thread "
                 "workers, which share the server's memory", ["worker", "kind"])
    for kind in MEMORY_KINDS:
        for (worker,), value in sorted(_sum_by(workers, ("index",), kind).items()):
            mem.add_metric([worker, kind], value)
    yield mem
    for name, field, doc, make in (
        ("dataserver_worker_cpu_percent", "cpu_percent",
         "CPU use of a worker process, percent of one CPU, since the previous snapshot", _gauge),
        ("dataserver_worker_batches_total", "done",
         "batches made by the worker at this index (restarts from 0 when it is replaced)",
         _counter),
        ("dataserver_worker_errors_total", "errors",
         "batches whose Sequence raised in the worker at this index", _counter),
        ("dataserver_worker_queued_batches", "queued",
         "batches sent to the worker and not yet returned (the one in flight included)",
         _gauge),
    ):
        fam = make(name, doc, ["worker"])
        for (worker,), value in sorted(_sum_by(workers, ("index",), field).items()):
            fam.add_metric([worker], value)
        yield fam
    age = _gauge("dataserver_worker_batch_seconds", "seconds the worker has been on the batch in "
                 "flight; 0 when it has none", ["worker"])
    longest: dict[str, float] = {}
    for w in workers:
        key = str(w["index"])
        longest[key] = max(longest.get(key, 0.0), w.get("batch_seconds") or 0.0)
    for worker, value in sorted(longest.items()):
        age.add_metric([worker], value)
    yield age
    for name, field, doc in (
        ("dataserver_worker_stuck", "stuck",
         "1 while the worker's batch in flight is older than --hang-threshold"),
        ("dataserver_worker_growing", "growing",
         "1 once the worker's memory has risen batch after batch (see the server log)"),
        ("dataserver_worker_retiring", "retiring",
         "1 while the worker finishes its last batches before a cap replaces it"),
    ):
        flag = _gauge(name, doc, ["worker"])
        flags: dict[str, float] = {}
        for w in workers:
            key = str(w["index"])
            flags[key] = max(flags.get(key, 0.0), 1.0 if w.get(field) else 0.0)
        for worker, value in sorted(flags.items()):
            flag.add_metric([worker], value)
        yield flag


def _production_families(snap: dict[str, Any]) -> Iterator[GaugeMetricFamily
                                                            | CounterMetricFamily]:
    counters: dict[str, int] = snap["counters"]
    fam = _counter("dataserver_batches_total", "batches produced by the workers")
    fam.add_metric([], counters.get("produced", 0))
    yield fam
    fam = _counter("dataserver_bytes_total", "bytes of the batches produced by the workers")
    fam.add_metric([], counters.get("bytes", 0))
    yield fam
    fam = _counter("dataserver_events_total", "server events by kind (the snapshot's counters, "
                   "see docs/status.md)", ["event"])
    for event, n in sorted(counters.items()):
        if event not in _OWN_COUNTERS:
            fam.add_metric([event], n)
    yield fam
    r = snap["ring"]
    g = _gauge("dataserver_ring_slots", "ring slots by state; they add up to the ring's slots",
               ["state"])
    for state in _RING_STATES:
        g.add_metric([state], r[state])
    yield g
    for name, field, doc in (
        ("dataserver_ring_slot_bytes", "slot_bytes", "bytes per ring slot (0 before the first "
                                                     "batch sized the ring)"),
        ("dataserver_ring_bytes", "bytes", "bytes of shared memory in the ring"),
        ("dataserver_one_off_segments", "one_off_segments",
         "live one-off segments of batches too big for a slot"),
        ("dataserver_one_off_bytes", "one_off_bytes", "bytes in one-off segments"),
    ):
        g = _gauge(name, doc)
        g.add_metric([], r[field])
        yield g


def _consumer_families(snap: dict[str, Any]) -> Iterator[GaugeMetricFamily
                                                          | CounterMetricFamily]:
    consumers: list[dict[str, Any]] = snap["consumers"]
    g = _gauge("dataserver_consumers", "connected consumers (gone: said goodbye but still hold "
               "batches)", ["state"])
    gone = sum(1 for c in consumers if c["gone"])
    g.add_metric(["active"], len(consumers) - gone)
    g.add_metric(["gone"], gone)
    yield g
    key = ("name", "dataset")
    for name, field, doc, make in (
        ("dataserver_consumer_lag_batches", "waiting",
         "batches the consumer has asked for and not yet received (its read-ahead waiting on "
         "the workers): high while the workers are the bottleneck, near 0 while the consumer "
         "is", _gauge),
        ("dataserver_consumer_batches_total", "delivered", "batches delivered to the consumer",
         _counter),
        ("dataserver_consumer_leases", "leases", "batches the consumer holds (ring slots it "
                                                 "keeps from reuse)", _gauge),
        ("dataserver_consumer_batches_per_second", "batches_per_s",
         "batches delivered per second, averaged since the consumer joined", _gauge),
        ("dataserver_consumer_bytes_per_second", "bytes_per_s",
         "bytes delivered per second, averaged since the consumer joined", _gauge),
    ):
        fam = make(name, doc, ["consumer", "dataset"])
        for labels, value in sorted(_sum_by(consumers, key, field).items()):
            fam.add_metric(list(labels), value)
        yield fam


def families(snap: dict[str, Any] | None, age: float = 0.0) -> list[Any]:
    """The metric families of ``snap`` taken ``age`` seconds ago; with no snapshot yet (the
    server is still starting) only ``dataserver_up 0``."""
    if snap is None:
        up = _gauge("dataserver_up", _UP_HELP)
        up.add_metric([], 0.0)
        return [up]
    return [*_server_families(snap, age), *_worker_families(snap),
            *_production_families(snap), *_consumer_families(snap)]


class _SnapshotCollector(Collector):
    """Reads the exporter's latest snapshot at scrape time (on the HTTP server's threads)."""

    def __init__(self, exporter: MetricsExporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterable[Any]:
        snap, taken = self._exporter.latest()
        return families(snap, time.monotonic() - taken if snap is not None else 0.0)


class MetricsExporter:
    """An HTTP server on ``address`` (ADDR:PORT; an empty ADDR means every interface) serving
    the latest snapshot given to :meth:`update` in the Prometheus text format, from its own
    thread. :meth:`close` stops it and releases the port; it is safe to call twice.

    Raises ConfigError naming ``--metrics`` when the address cannot be bound (port taken,
    unknown host, a privileged port)."""

    def __init__(self, address: str) -> None:
        host, _sep, port = address.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        if not port.isdigit() or not 0 <= int(port) < 65536:  # 0: any free port
            raise ConfigError(f"--metrics {address!r}: write ADDR:PORT, e.g. 127.0.0.1:9464")
        # (snapshot, monotonic time taken): one tuple, so the HTTP thread never sees a snapshot
        # paired with another one's time; replacing the reference is atomic
        self._latest: tuple[dict[str, Any] | None, float] = (None, time.monotonic())
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_SnapshotCollector(self))
        try:
            self._httpd, self._thread = start_http_server(int(port), host, self.registry)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                why = f"port {port} is taken (another process listens there); pick a free one"
            else:
                why = f"cannot listen there ({exc.strerror or exc})"
            raise ConfigError(f"--metrics {address}: {why}") from None
        self.address = address
        self.port = int(self._httpd.server_port)
        self._closed = False
        log.info("serving Prometheus metrics at http://%s:%d/metrics", host, self.port)

    def update(self, snapshot: dict[str, Any]) -> None:
        """Export ``snapshot`` from now on. It must not be changed afterwards (the server makes
        a new one each time)."""
        self._latest = (snapshot, time.monotonic())

    def latest(self) -> tuple[dict[str, Any] | None, float]:
        """The latest snapshot (None before the first update) and when it was given."""
        return self._latest

    def close(self) -> None:
        """Stop serving and release the port (shutdown() alone keeps the socket open)."""
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("the metrics HTTP thread did not end within %.0f s", CLOSE_TIMEOUT_S)

    def __enter__(self) -> MetricsExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

