"""``DataServer``: start a server process from Python, as a context manager."""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import time
from types import TracebackType
from typing import Any

import msgpack

from dataserver.config import ServerConfig
from dataserver.errors import ClosedError, ConfigError, DataServerError, SharedMemoryError
from dataserver.server import run_in_child
from dataserver.source import SequenceSource

__all__ = ["DataServer"]

STOP_TIMEOUT_S = 15.0
_ERRORS: dict[str, type[DataServerError]] = {
    "ConfigError": ConfigError,
    "SharedMemoryError": SharedMemoryError,
}


class DataServer:
    """A dataserver in its own process, serving ``sequence`` (or the SPEC ``spec``).

    ``options`` are those of ``dataserver serve`` as keyword arguments (``workers=``,
    ``worker_type=``, ``slots=``, ``slot_bytes=``, ``prefetch=``, ``shuffle=``, ``seed=``,
    ``start_method=``, ``endpoint=`` ...). The Sequence object is handed to the server process
    once, at its start (process workers get it the same way); a SPEC is imported there instead.

    >>> with DataServer(MySequence(), workers=4) as server:     # doctest: +SKIP
    ...     for x, y in RemoteSequence(server.endpoint): ...

    States: new -> running (``start()`` returned: consumers can connect) -> closed.
    """

    def __init__(self, sequence: Any = None, *, spec: str | dict[str, str] = "",
                 args: dict[str, Any] | None = None, generator: Any = None,
                 **options: Any) -> None:
        if sum(x is not None and x != "" for x in (sequence, spec, generator)) != 1:
            raise ConfigError("pass one of: a Sequence object (or a dict of named ones), "
                              "spec='module:name', generator=factory")
        self.config = ServerConfig.from_options(**options)
        self.source: dict[str, SequenceSource] = {}
        if generator is not None:  # a factory (or "module:name"), called once per worker
            gens = generator if isinstance(generator, dict) else {"default": generator}
            self.source = {
                name: SequenceSource(spec=g, kwargs=dict(args or {}), generator=True)
                if isinstance(g, str) else
                SequenceSource(obj=g, kwargs=dict(args or {}), generator=True)
                for name, g in gens.items()}
        elif isinstance(sequence, dict):  # named datasets: {"train": Train(), "val": Val()}
            self.source = {name: SequenceSource(obj=seq) for name, seq in sequence.items()}
        elif sequence is not None:
            self.source = {"default": SequenceSource(obj=sequence)}
        elif isinstance(spec, dict):
            self.source = {name: SequenceSource(spec=s, kwargs=dict(args or {}))
                           for name, s in spec.items()}
        else:
            self.source = {"default": SequenceSource(spec=spec, kwargs=dict(args or {}))}
        self.state = "new"
        self.pid: int | None = None
        self._process: Any = None

    @property
    def endpoint(self) -> str:
        return self.config.endpoint

    def start(self) -> DataServer:
        """Start the server process and return once it is ready (or raise why it is not)."""
        if self.state != "new":
            raise ClosedError(f"DataServer.start() on a {self.state} server; make a new one")
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        level = logging.getLevelName(logging.getLogger("dataserver").getEffectiveLevel())
        self._process = ctx.Process(
            target=run_in_child, args=(self.config, self.source, child, level),
            name="dataserver", daemon=False,
        )
        self._process.start()
        child.close()
        self.pid = self._process.pid
        self.state = "running"
        atexit.register(self.close)
        deadline = time.monotonic() + self.config.startup_timeout + 10
        try:
            while not parent.poll(0.1):
                if not self._process.is_alive():
                    raise DataServerError(
                        f"the server process exited during start-up (exit code "
                        f"{self._process.exitcode}); see its log above"
                    )
                if time.monotonic() > deadline:
                    raise DataServerError("the server did not become ready in time")
            try:
                reply = msgpack.unpackb(parent.recv_bytes())
            except EOFError:
                self._process.join(5)
                raise DataServerError(
                    f"the server process exited during start-up (exit code "
                    f"{self._process.exitcode}); see its log above. Started from a script? "
                    "Guard the code that starts it with `if __name__ == '__main__':`"
                ) from None
        except BaseException:
            self.close()
            raise
        finally:
            parent.close()
        if "error" in reply:
            self.close()
            raise _ERRORS.get(reply.get("type", ""), DataServerError)(reply["error"])
        return self

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a deadline) and wait for it."""
        if self.state == "closed":
            return
        self.state = "closed"
        atexit.unregister(self.close)
        p = self._process
        if p is None:
            return
        if p.is_alive():
            p.terminate()
            p.join(STOP_TIMEOUT_S)
            if p.is_alive():
                logging.getLogger("dataserver").warning(
                    "server pid %s did not stop in %.0f s; killing it", p.pid, STOP_TIMEOUT_S)
                p.kill()
                p.join(STOP_TIMEOUT_S)
        p.join()
        p.close()

    def __enter__(self) -> DataServer:
        return self.start() if self.state == "new" else self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        names = ", ".join(f"{k}={v.name}" for k, v in self.source.items())
        return f"<DataServer {names} at {self.endpoint} ({self.state}, pid {self.pid})>"

