"""A pool's settings, declared once.

``SETTINGS`` lists every setting of ``modelpool.Pool`` that a configuration file may also give
(the ``models:`` entries of ``modelpool.yaml``): its name, default, check and meaning. The
check both validates and normalises a value, raising ``TypeError`` / ``ValueError`` with a
message that names the setting and what is allowed. ``Pool.__init__`` runs it on its keyword
arguments, ``modelpool.config.ModelSettings`` is generated from it, and ``PoolSettings`` is
what the supervisor runs with once the pool resolved them (a test keeps ``Pool``'s signature
in step with the table).

This module imports nothing heavy: it is loaded by every worker process.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import sys
from collections.abc import Callable, Mapping
from typing import Any

from ._hygiene import device_env

__all__ = [
    "SETTINGS",
    "PoolSettings",
    "Setting",
    "check",
    "default_start_method",
    "parse_size",
    "scaling",
    "validate",
]


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: ``check(value)`` returns the value to use or raises naming ``name``."""

    name: str
    default: Any
    check: Callable[[str, Any], Any]
    doc: str


def _number(
    *, integer: bool, minimum: float, strict: bool, optional: bool
) -> Callable[[str, Any], Any]:
    kind = "an int" if integer else "a number of seconds"
    if integer and minimum >= 1:
        bound = f"greater than {minimum - 1:g}"
    else:
        bound = f"greater than {minimum:g}" if strict else f"at least {minimum:g}"

    def check(name: str, value: Any) -> Any:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
            none = " or None" if optional else ""
            raise TypeError(f"{name} must be {kind}{none}, got {value!r}")
        if value < minimum or (strict and value == minimum):
            raise ValueError(f"{name} must be {bound}, got {value!r}")
        return value if integer else float(value)

    return check


def _count(minimum: int = 1, *, optional: bool = False) -> Callable[[str, Any], Any]:
    return _number(integer=True, minimum=minimum, strict=False, optional=optional)


def _seconds(*, optional: bool = False, zero: bool = False) -> Callable[[str, Any], Any]:
    return _number(integer=False, minimum=0, strict=not zero, optional=optional)


def _seed(name: str, value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{name} must be an int or None, got {value!r}")
    return value


def _options(name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping of keyword arguments, got {value!r}")
    return dict(value)


def _start_method(name: str, value: Any) -> str | None:
    methods = multiprocessing.get_all_start_methods()
    if value is not None and value not in methods:
        raise ValueError(f"{name}={value!r} is not available here; use one of {methods}")
    return value  # type: ignore[no-any-return]


def _size(name: str, value: Any) -> int | None:
    return None if value is None else parse_size(value, name)


def _devices(name: str, value: Any) -> list[str | int] | None:
    if value is None:
        return None
    if isinstance(value, str | int) or not isinstance(value, list | tuple):
        raise TypeError(f"{name} must be a list such as ['cuda:0', 'cuda:1'], got {value!r}")
    for device in value:
        device_env(device)  # raises ValueError naming what is allowed
    return list(value)


#: Every setting a pool and a configuration file share, in ``Pool``'s parameter order.
SETTINGS: tuple[Setting, ...] = (
    Setting("workers", 1, _count(), "worker processes (the most, when min_workers is set)"),
    Setting("options", None, _options, "keyword arguments for the model's constructor"),
    Setting("start_method", None, _start_method, "forkserver (default on Linux), spawn, fork"),
    Setting(
        "threads_per_worker",
        None,
        _count(optional=True),
        "threads each worker's math libraries use (default: CPU cores / workers)",
    ),
    Setting("timeout", None, _seconds(optional=True), "seconds a request may take, queued or not"),
    Setting("setup_timeout", None, _seconds(optional=True), "seconds setup() may take"),
    Setting(
        "max_requests_per_worker",
        None,
        _count(optional=True),
        "recycle a worker after this many requests (plus up to 10% jitter)",
    ),
    Setting(
        "max_memory_per_worker",
        None,
        _size,
        "recycle a worker whose own memory passes this (bytes, or like '2GB')",
    ),
    Setting("retries", 0, _count(0), "times a request is retried after its worker crashed"),
    Setting("seed", None, _seed, "base seed of every worker's random generators"),
    Setting(
        "drain_timeout", 30.0, _seconds(optional=True), "seconds shutdown waits for work to finish"
    ),
    Setting("max_batch_size", 1, _count(), "rows per batch; above 1 turns dynamic batching on"),
    Setting("max_batch_delay", 0.005, _seconds(zero=True), "seconds a batch waits to fill"),
    Setting("max_queue", None, _count(optional=True), "queued requests before new ones fail"),
    Setting("min_workers", None, _count(optional=True), "autoscaling: workers kept running"),
    Setting("max_workers", None, _count(optional=True), "autoscaling: the most workers"),
    Setting("load_concurrency", None, _count(optional=True), "workers loading the model at once"),
    Setting("scale_down_after", 30.0, _seconds(), "seconds a worker is idle before it is stopped"),
    Setting("devices", None, _devices, "devices given to workers in turn, e.g. ['cuda:0']"),
)

BY_NAME = {s.name: s for s in SETTINGS}


def check(name: str, value: Any) -> Any:
    """The value of setting ``name`` to use, or ``TypeError`` / ``ValueError``."""
    return BY_NAME[name].check(name, value)


def validate(values: Mapping[str, Any]) -> dict[str, Any]:
    """Check and normalise ``values`` (a subset of ``SETTINGS`` by name), then the rules that
    tie settings together (``scaling``)."""
    out = {name: check(name, value) for name, value in values.items()}
    scaling(
        out.get("workers", 1),
        out.get("min_workers"),
        out.get("max_workers"),
    )
    return out


def scaling(workers: int, min_workers: int | None, max_workers: int | None) -> tuple[int, int]:
    """(floor, ceiling): the workers always kept running and the most there can be."""
    floor = min_workers if min_workers is not None else workers
    ceiling = max_workers if max_workers is not None else max(workers, floor)
    if floor > ceiling:
        raise ValueError(
            f"min_workers={floor} is more than max_workers={ceiling}; "
            "min_workers must be <= max_workers"
        )
    return floor, ceiling


_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(value: int | str, field: str = "size") -> int:
    """Bytes from an int or a string such as ``'512MB'`` or ``'1.5GB'`` (binary units:
    1 KB = 1024 bytes, as memory is counted)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"{field} must be bytes (int) or like '2GB', got {value!r}")
    if isinstance(value, int):
        number, unit = float(value), ""
    else:
        text = value.strip().upper().removesuffix("IB").removesuffix("B").strip()
        unit = text[-1] if text and text[-1] in "KMGT" else ""
        try:
            number = float(text[: len(text) - len(unit)])
        except ValueError:
            raise ValueError(
                f"{field}={value!r} is not a size; use bytes or e.g. '512MB', '1.5GB'"
            ) from None
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{field} must be positive, got {value!r}")
    return size


def default_start_method() -> str:
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if sys.platform.startswith("linux") and "forkserver" in methods else "spawn"


@dataclasses.dataclass(frozen=True)
class PoolSettings:
    """What the supervisor runs with: ``SETTINGS`` once resolved by the pool (the model
    imported, the scaling bounds, thread budget, seed and devices decided). Sent to every
    worker inside its ``WorkerSpec``, so it must pickle."""

    model_ref: str | None
    model_name: str
    options: dict[str, Any]
    workers: int  # the ceiling: the most workers there can be
    threads: int
    env: dict[str, str]  # the thread limits every worker gets
    seed: int
    timeout: float | None
    setup_timeout: float | None
    max_requests_per_worker: int | None
    max_memory_per_worker: int | None
    retries: int
    drain_timeout: float | None
    initializer: tuple[Any, tuple[Any, ...]] | None = None
    max_batch_size: int = 1
    max_batch_delay: float = 0.0
    max_queue: int | None = None
    min_workers: int = 0  # 0: the same as ``workers`` (no autoscaling)
    load_concurrency: int | None = None
    scale_down_after: float = 30.0
    devices: tuple[dict[str, str], ...] = ()  # worker i gets the variables devices[i % n]

    @property
    def floor(self) -> int:
        """Workers kept running at all times (``workers`` is the most there can be)."""
        return self.min_workers or self.workers

    @property
    def autoscaling(self) -> bool:
        return self.floor < self.workers

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1
