"""``--backend ray``: the workers are Ray actors, anywhere in a Ray cluster.

Each actor runs the ordinary worker loop (:func:`dataserver.worker.worker_main`) with a Sequence
of its own, imported there from its ``module:name`` SPEC. Ray only places and starts them: the
tasks, the answers and the batches travel over the server's own ZeroMQ worker socket in msgpack,
as for local workers. An actor that shares this host's shared memory writes its batches into
the ring; one on another host (or any, with ``--ray-transport frames``) sends them as ZeroMQ
frames over TCP, and the server copies them into the slot.

The server watches each actor through the ObjectRef of its ``run`` call: a thread waits on it
and, when the actor ends or dies, wakes the server's poller through a pipe. So a dead actor is
handled exactly like a dead worker process: its batches are retried and it is replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

from dataserver.config import usable_cpus
from dataserver.errors import ConfigError
from dataserver.source import SequenceSource
from dataserver.worker import WorkerSpec

__all__ = ["RayHandle", "RayPool", "RayWorker", "spec_from_dict"]

log = logging.getLogger("dataserver")
JOIN_TIMEOUT_S = 5.0
#: A private local Ray needs an object store; dataserver never puts batches in it.
LOCAL_OBJECT_STORE_BYTES = 80 << 20


def spec_to_dict(spec: WorkerSpec) -> dict[str, Any]:
    """Plain data for Ray's actor call: strings, numbers and the sources' SPECs, no objects."""
    d = asdict(spec)
    d["sources"] = [{"spec": s.spec, "kwargs": dict(s.kwargs), "generator": s.generator}
                    for s in spec.sources]
    return d


def spec_from_dict(d: dict[str, Any]) -> WorkerSpec:
    fields = dict(d)
    fields["sources"] = [SequenceSource(spec=s["spec"], kwargs=dict(s["kwargs"]),
                                        generator=bool(s["generator"])) for s in d["sources"]]
    fields["skip"] = tuple(d["skip"])
    fields["paths"] = tuple(d["paths"])
    return WorkerSpec(**fields)


class RayWorker:
    """The actor: one ``run`` call is one worker's whole life."""

    def run(self, spec: dict[str, Any]) -> None:
        from dataserver.worker import worker_main

        for path in spec["paths"]:  # the server's own code folders, where this host has them
            if path not in sys.path and os.path.isdir(path):
                sys.path.append(path)
        worker_main(spec_from_dict(spec))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class RayHandle:
    """One actor, shaped like :class:`dataserver.pool.WorkerHandle`: ``sentinel`` becomes
    readable when the actor has ended, for whatever reason."""

    process = None
    thread = None
    killable = True

    def __init__(self, spec: WorkerSpec, ray: Any, actor: Any, ref: Any) -> None:
        self.spec = spec
        self.pid: int | None = None  # unknown here: the worker reports it (WorkerState.pid)
        self._ray = ray
        self.actor = actor
        self.reason = ""
        self.ended = threading.Event()
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._watcher = threading.Thread(target=self._watch, args=(ref,), daemon=True,
                                         name=f"dataserver-ray-watch-{spec.incarnation}")
        self._watcher.start()

    @property
    def sentinel(self) -> int | None:
        return self._r if self._r >= 0 else None

    def _watch(self, ref: Any) -> None:
        try:
            self._ray.get(ref)
            self.reason = "exited"
        except Exception as exc:  # RayActorError and friends: the actor is gone
            cause = getattr(exc, "cause", None)  # RayTaskError: what run() raised
            self.reason = f"Ray actor ended: {_first_line(cause or exc)}"
        self.kill()  # an actor whose run returned would idle on; free its process
        self.ended.set()
        with contextlib.suppress(OSError):
            os.write(self._w, b"x")

    def alive(self) -> bool:
        return not self.ended.is_set()

    def exit_reason(self) -> str:
        return self.reason or "still running"

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self._ray.kill(self.actor, no_restart=True)

    def close(self) -> None:
        self._watcher.join(1.0)
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._r = self._w = -1


class RayPool:
    """The worker set as Ray actors; the same calls as :class:`dataserver.pool.Pool`."""

    def __init__(self, template: WorkerSpec, address: str | None) -> None:
        bad = [s.name for s in template.sources if s.obj is not None]
        if bad:
            raise ConfigError(
                f"--backend ray imports the Sequence in each actor, so it needs a SPEC "
                f"(module:name), not an object: {', '.join(bad)}; pass DataServer(spec=...)"
            )
        try:
            import ray
        except ImportError:
            raise ConfigError("--backend ray needs Ray: pip install 'dataserver[ray]'") from None
        self.ray = ray
        self.template = template
        self.handles: dict[int, RayHandle] = {}
        self._next = 0
        self._temp_dir: str | None = None
        self._started = False
        if not ray.is_initialized():
            self._init(address)
        self.actor_class: Any = ray.remote(num_cpus=1, max_restarts=0)(RayWorker)

    def _init(self, address: str | None) -> None:
        ray = self.ray
        options: dict[str, Any] = {"configure_logging": False, "log_to_driver": True}
        if address:
            options["address"] = address
        else:  # a private Ray on this machine, gone with the server
            self._temp_dir = tempfile.mkdtemp(prefix="dsray-")
            options.update(num_cpus=max(self.template.count, usable_cpus()),
                           include_dashboard=False, _temp_dir=self._temp_dir,
                           object_store_memory=LOCAL_OBJECT_STORE_BYTES)
        t0 = time.monotonic()
        try:
            ray.init(**options)
        except Exception as exc:
            self._remove_temp()
            where = f"--ray-address {address}" if address else "a local Ray"
            raise ConfigError(f"{where}: Ray did not start ({_first_line(exc)})") from None
        self._started = True
        log.info("ray: %s in %.1f s", f"joined {address}" if address else "started locally",
                 time.monotonic() - t0)

    def node_ip(self) -> str:
        """This host's address as Ray knows it: where remote actors reach the server."""
        util: Any = self.ray.util
        return str(util.get_node_ip_address())

    def start(self, index: int, skip: tuple[int, ...] = ()) -> RayHandle:
        spec = replace(self.template, worker=index, incarnation=self._next, skip=skip)
        self._next += 1
        actor: Any = self.actor_class.remote()
        ref = actor.run.remote(spec_to_dict(spec))
        h = RayHandle(spec, self.ray, actor, ref)
        self.handles[spec.incarnation] = h
        return h

    def forget(self, incarnation: int) -> RayHandle | None:
        h = self.handles.pop(incarnation, None)
        if h is not None:
            h.kill()
            h.close()
        return h

    def kill(self, incarnation: int) -> None:
        h = self.handles.get(incarnation)
        if h is not None:
            h.kill()

    def stop_all(self, send_stop: Callable[[int], None], connected: set[int]) -> None:
        """Ask connected actors to stop, kill the rest, then kill any still running after
        JOIN_TIMEOUT_S; finally shut down the private local Ray, if this pool started it."""
        for inc, h in self.handles.items():
            if inc in connected:
                send_stop(inc)
            else:
                h.kill()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for h in self.handles.values():
            if not h.ended.wait(max(0.0, deadline - time.monotonic())):
                log.warning("ray worker %d did not stop in %.0f s; killing it", h.spec.worker,
                            JOIN_TIMEOUT_S)
                h.kill()
        for h in self.handles.values():
            h.ended.wait(JOIN_TIMEOUT_S)
            h.close()
        self.handles.clear()

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()
            self._started = False
        self._remove_temp()

    def _remove_temp(self) -> None:
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
