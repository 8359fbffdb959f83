"""Server options: one validated frozen dataclass that the CLI and the Python API both build."""

from __future__ import annotations

import dataclasses
import ipaddress
import multiprocessing
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

from dataserver.errors import ConfigError

__all__ = ["ServerConfig", "default_endpoint", "parse_size"]

WorkerType = Literal["process", "thread"]
StartMethod = Literal["spawn", "forkserver", "fork"]
DEFAULT_START_METHOD: StartMethod = (
    "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")
Backend = Literal["local", "ray"]
Transport = Literal["auto", "shm", "frames"]

#: Auto prefetch fills at most this much shared memory (or half of what is free).
RING_BUDGET_BYTES = 512 << 20
MAX_AUTO_PREFETCH = 64

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int, option: str = "size") -> int:
    """Bytes from ``4096``, ``"64MiB"``, ``"1GB"`` (powers of 1024 for KiB/MiB/GiB)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"{option} must be positive, got {value}")
        return value
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"{option}: {value!r} is not a size; write bytes or a unit, e.g. 4096, 64MiB, 1GB"
        )
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ConfigError(f"{option} must be positive, got {value!r}")
    return n


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_endpoint() -> str:
    """``$DATASERVER_ENDPOINT``, else the socket in the private runtime directory."""
    from dataserver.shm import runtime_root

    return os.environ.get("DATASERVER_ENDPOINT") or f"ipc://{runtime_root()}/dataserver.sock"


def check_endpoint(endpoint: str, insecure: bool = False) -> None:
    if endpoint.startswith("ipc://"):
        if len(endpoint) <= len("ipc://"):
            raise ConfigError("--endpoint ipc:// needs a socket path, e.g. ipc:///run/ds/train.sock")
        return
    if endpoint.startswith("tcp://"):
        hostport = endpoint[len("tcp://"):]
        host, sep, port = hostport.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(
                f"--endpoint {endpoint}: a tcp endpoint needs host:port, e.g. tcp://127.0.0.1:5555"
            )
        host = host.strip("[]")
        loopback = host == "localhost"
        if not loopback:
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
        if not loopback and not insecure:
            raise ConfigError(
                f"--endpoint {endpoint} would serve batches beyond this machine without "
                "authentication; pass --curve-keys DIR (make them with `dataserver keys DIR`), "
                "bind to 127.0.0.1, or pass --insecure if the network is trusted"
            )
        return
    raise ConfigError(
        f"--endpoint {endpoint!r} is not supported; use ipc:///path/to.sock or tcp://127.0.0.1:PORT"
    )


@dataclass(frozen=True)
class ServerConfig:
    """Every server option, validated. Defaults and why:

    * ``workers``: the CPUs this process may use; more only adds contention.
    * ``worker_type="process"``: Python-level decoding holds the GIL; threads suit numpy/IO work.
    * ``prefetch=0`` (auto): batches produced ahead of each consumer, sized once the slot size
      is known: as many as fit in ``RING_BUDGET_BYTES`` (or half the free shared memory), at
      least 2 per worker (min 4), at most 64. Small batches need a deep window to amortise
      messages; big ones must not exhaust /dev/shm.
    * ``slots=0`` (auto): prefetch plus a quarter (at least 4) of slack for the batches in the
      user's hands and releases on their way back.
    * ``slot_bytes=None`` (auto): size slots from the first batch with 25 % headroom.
    * ``start_method="forkserver"`` (``spawn`` where there is none): process workers fork from
      a clean server process that has imported numpy, ZeroMQ, dataserver and the Sequence's
      module, and frozen them for the garbage collector, so every worker shares those pages
      (a worker's own memory about halves for a numpy Sequence, and drops from 147 to 14 MiB
      when the Sequence's module imports torch). ``spawn`` imports everything again in each
      worker: use it if importing your module starts threads or opens devices. ``fork`` copies
      the server itself, ZeroMQ threads included: only for experiments.
    * ``max_retries=2``: a batch whose worker died is retried twice, then reported.
    * ``batch_timeout=None``: a batch may take as long as it takes unless you set a deadline.
    * ``max_worker_memory=None``, ``max_worker_tasks=None``: no caps unless you set them; a
      worker over a cap finishes its batches, exits and is replaced (``memory_kind`` says
      which figure counts: USS, the memory only that worker holds, by default).
    * ``hang_threshold=60``: a batch in flight longer is flagged as stuck in ``status``.
    * ``backend="local"``: workers are this machine's processes or threads; ``"ray"`` runs
      them as Ray actors (``ray_address``: a cluster to join, default a private local Ray;
      ``ray_transport``: how their batches reach the ring, ``auto`` = shared memory when the
      actor shares this host's, else ZeroMQ frames over TCP).
    * ``consumer_timeout=10``: a consumer in another pid namespace (whose pid the server cannot
      watch) that sends no heartbeat (one a second) for this long is gone; its leases return.
    """

    endpoint: str = ""
    workers: int = 0
    worker_type: WorkerType = "process"
    prefetch: int = 0
    slots: int = 0
    slot_bytes: int | None = None
    shuffle: bool = False
    seed: int = 0
    start_method: StartMethod = DEFAULT_START_METHOD
    max_retries: int = 2
    batch_timeout: float | None = None
    consumer_timeout: float = 10.0
    startup_timeout: float = 120.0
    insecure: bool = False
    curve_keys: str | None = None
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    metrics: str | None = None
    max_worker_memory: int | None = None
    memory_kind: Literal["uss", "pss", "rss"] = "uss"
    max_worker_tasks: int | None = None
    hang_threshold: float = 60.0
    backend: Backend = "local"
    ray_address: str | None = None
    ray_transport: Transport = "auto"

    def __post_init__(self) -> None:
        def set_(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        if not self.endpoint:
            set_("endpoint", default_endpoint())
        check_endpoint(self.endpoint, self.insecure or bool(self.curve_keys))
        if self.workers == 0:
            set_("workers", usable_cpus())
        _positive("workers", self.workers)
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{_flag(name)} must be {_either(allowed)}, got {value!r}")
        if self.prefetch:
            _positive("prefetch", self.prefetch)
        if self.slots:
            _positive("slots", self.slots)
            if self.slots < 2:
                raise ConfigError("--slots must be at least 2")
        if self.slot_bytes is not None:
            set_("slot_bytes", parse_size(self.slot_bytes, "--slot-bytes"))
        if self.max_retries < 0:
            raise ConfigError(f"--max-retries must be 0 or more, got {self.max_retries}")
        if self.max_worker_memory is not None:
            set_("max_worker_memory", parse_size(self.max_worker_memory, "--max-worker-memory"))
        if self.max_worker_memory is not None and self.worker_type == "thread":
            raise ConfigError("--max-worker-memory applies to process workers; thread workers "
                              "share the server's memory (see its figures in status)")
        if self.max_worker_tasks is not None:
            _positive("max_worker_tasks", self.max_worker_tasks)
        if self.metrics is not None:
            _host, sep, port = self.metrics.rpartition(":")
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"--metrics {self.metrics!r}: write ADDR:PORT, e.g. "
                                  "127.0.0.1:9464")
        if self.backend != "ray" and (self.ray_address or self.ray_transport != "auto"):
            raise ConfigError("--ray-address and --ray-transport apply to --backend ray")
        if self.backend == "ray" and self.worker_type == "thread":
            raise ConfigError("--backend ray runs workers as Ray actors (processes); drop "
                              "--worker-type thread")
        if self.startup_timeout <= 0:
            raise ConfigError(f"startup_timeout must be positive, got {self.startup_timeout}")
        for name in ("batch_timeout", "hang_threshold", "consumer_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{_flag(name)} must be positive seconds, got {value}")

    def ring_geometry(self, slot_bytes: int, shm_free: int) -> tuple[int, int]:
        """(prefetch, slots) for slots of ``slot_bytes``: the options, or the auto rule above."""
        prefetch = self.prefetch
        if not prefetch:
            budget = min(RING_BUDGET_BYTES, shm_free // 2)
            floor = max(4, 2 * self.workers)
            prefetch = max(floor, min(MAX_AUTO_PREFETCH, budget * 4 // (5 * slot_bytes)))
        slots = self.slots or prefetch + max(4, prefetch // 4)
        return prefetch, slots

    @classmethod
    def from_options(cls, **options: Any) -> ServerConfig:
        """Build from keyword options, naming any unknown one."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        if options.get("slot_bytes") == "auto":
            options["slot_bytes"] = None
        return cls(**options)


#: Options with a fixed set of values, and those values.
_CHOICES: dict[str, tuple[str, ...]] = {
    "worker_type": ("process", "thread"), "start_method": ("spawn", "forkserver", "fork"),
    "memory_kind": ("uss", "pss", "rss"), "log_format": ("text", "json"),
    "backend": ("local", "ray"), "ray_transport": ("auto", "shm", "frames"),
}


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _either(values: tuple[str, ...]) -> str:
    return f"{', '.join(values[:-1])} or {values[-1]}"


def _positive(name: str, value: int) -> None:
    if type(value) is not int or value <= 0:
        raise ConfigError(f"{_flag(name)} must be a positive integer, got {value!r}")
