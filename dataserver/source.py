"""Where the Sequence comes from: a ``module:name`` SPEC or an object, and the optional base class.

A SPEC names a Sequence instance, a Sequence class, or a factory; classes and factories are
called with the ``--arg key=value`` pairs. Process workers import the SPEC themselves, so
nothing of the Sequence is ever sent over a pipe; an object handed to ``DataServer`` reaches
each worker once, at its start.
"""

from __future__ import annotations

import importlib
import json
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any

from dataserver.errors import ConfigError

__all__ = ["Sequence", "SequenceSource", "WorkerInfo", "parse_args", "worker_info"]


class Sequence:
    """Optional base class: a Keras-style Sequence. Any object with ``__len__`` and
    ``__getitem__`` (and optionally ``on_epoch_end``) works too, including
    ``keras.utils.Sequence`` and ``keras.utils.PyDataset`` subclasses."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Any:
        raise NotImplementedError

    def on_epoch_end(self) -> None:
        """Called in every worker after an epoch, before it makes its first batch of the next."""


@dataclass(frozen=True)
class WorkerInfo:
    """Who is running this code: ``worker_info()`` inside ``__getitem__`` returns it."""

    id: int
    count: int
    epoch: int
    kind: str


_local = threading.local()
_process_info: WorkerInfo | None = None


def set_worker_info(info: WorkerInfo | None, thread: bool) -> None:
    global _process_info
    if thread:
        _local.info = info
    else:
        _process_info = info


def worker_info() -> WorkerInfo | None:
    """The calling worker's id, the worker count and the epoch; None outside a worker."""
    return getattr(_local, "info", None) or _process_info


def parse_args(pairs: list[str]) -> dict[str, Any]:
    """``["root=/data", "n=3"]`` -> ``{"root": "/data", "n": 3}``: JSON where it parses."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--arg {pair!r}: write key=value, e.g. --arg root=/data")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def parse_specs(specs: list[str], args: list[str],
                generators: list[str] | None = None) -> dict[str, SequenceSource]:
    """``["train=m:Train", "val=m:Val"]`` (or one bare ``m:Seq``, named "default") with
    ``--arg`` pairs, ``key=value`` for every dataset or ``NAME.key=value`` for one;
    ``generators`` are SPECs of generator factories, named the same way."""
    if not specs and not generators:
        raise ConfigError("name at least one SPEC (module:Sequence) or --generator module:factory")
    named: dict[str, str] = {}
    kinds: dict[str, bool] = {}
    for item, gen in [(x, False) for x in specs] + [(x, True) for x in generators or []]:
        name, sep, spec = item.partition("=")
        if not sep:
            name, spec = "default", item
        if sep and not name.isidentifier():
            raise ConfigError(f"SPEC {item!r}: a dataset name must be an identifier, e.g. train")
        if name in named:
            raise ConfigError(f"dataset {name!r} is named twice; name each SPEC: NAME=module:obj")
        named[name] = spec
        kinds[name] = gen
    common: list[str] = []
    own: dict[str, list[str]] = {name: [] for name in named}
    for pair in args:
        key = pair.partition("=")[0]
        prefix, dot, _ = key.partition(".")
        if dot:
            if prefix not in own:
                raise ConfigError(f"--arg {pair!r}: no dataset {prefix!r} (have {list(named)})")
            own[prefix].append(pair[len(prefix) + 1:])
        else:
            common.append(pair)
    return {name: SequenceSource(spec=spec, kwargs=parse_args(common + own[name]),
                                 generator=kinds[name])
            for name, spec in named.items()}


def _is_sequence(obj: Any) -> bool:
    return (not isinstance(obj, type) and hasattr(obj, "__len__")
            and hasattr(obj, "__getitem__"))


@dataclass(frozen=True)
class SequenceSource:
    """How to get the Sequence: ``spec`` + ``kwargs`` (imported) or ``obj`` (passed once)."""

    spec: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    obj: Any = None
    generator: bool = False  # spec names a factory of one generator per worker

    @property
    def name(self) -> str:
        return self.spec or type(self.obj).__qualname__

    @property
    def module(self) -> str:
        """The module that defines it ("" for a script's ``__main__``): what a fork server
        can import ahead of the workers."""
        if self.spec:
            name = self.spec.partition(":")[0]
        else:
            target = self.obj if callable(self.obj) and self.generator else type(self.obj)
            name = getattr(target, "__module__", "") or ""
        return "" if name in ("__main__", "builtins") else name

    def load(self) -> Any:
        if self.generator:
            return self.stream()
        if self.obj is not None:
            return self.obj
        return load_spec(self.spec, self.kwargs)

    def factory(self) -> Any:
        """The generator factory (checked to be callable), without calling it."""
        target = self.obj if self.obj is not None else resolve(self.spec)
        if not callable(target):
            raise ConfigError(f"--generator {self.name}: {type(target).__name__} is not a "
                              "callable that returns a generator")
        return target

    def stream(self) -> Any:
        """A fresh iterator from the factory: each worker gets its own."""
        try:
            return iter(self.factory()(**self.kwargs))
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"--generator {self.name}: calling it raised "
                              f"{type(exc).__name__}: {exc}") from None


def load_spec(spec: str, kwargs: dict[str, Any]) -> Any:
    target = resolve(spec)
    return _instantiate(spec, target, kwargs)


def resolve(spec: str) -> Any:
    """The object a ``module:name`` SPEC names (imported, not called)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"SPEC {spec!r} must be module:name, e.g. mypkg.data:TrainSequence"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"SPEC {spec}: cannot import {module_name!r} ({exc}); run from the directory that "
            "holds it or install it (the current directory is on the path)"
        ) from None
    except Exception as exc:
        raise ConfigError(
            f"SPEC {spec}: importing {module_name!r} raised {type(exc).__name__}: {exc}\n"
            + traceback.format_exc()
        ) from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"SPEC {spec}: {module_name} has no attribute {attr!r}") from None
    return target


def _instantiate(spec: str, target: Any, kwargs: dict[str, Any]) -> Any:
    if _is_sequence(target):
        if kwargs:
            raise ConfigError(
                f"SPEC {spec} names a Sequence instance; --arg applies only to a class or factory"
            )
        return target
    if not callable(target):
        raise ConfigError(f"SPEC {spec} is a {type(target).__name__}, not a Sequence or factory")
    try:
        obj = target(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"SPEC {spec}: calling it with {kwargs} failed: {exc}") from None
    except Exception as exc:
        raise ConfigError(
            f"SPEC {spec}: calling it raised {type(exc).__name__}: {exc}\n" + traceback.format_exc()
        ) from None
    if not _is_sequence(obj):
        raise ConfigError(
            f"SPEC {spec} returned a {type(obj).__name__}, which lacks __len__ and __getitem__"
        )
    return obj


def checked_len(seq: Any, name: str) -> int:
    """``len(seq)``, with a clear error when it raises, is not an int, or is zero."""
    try:
        n = len(seq)
    except Exception as exc:
        raise ConfigError(f"{name}: len() raised {type(exc).__name__}: {exc}") from None
    if n <= 0:
        raise ConfigError(f"{name}: len() is {n}; a Sequence must have at least one batch")
    return n
