"""One model as the server serves it: its pool, signature and readiness bookkeeping.

Apart from ``_app`` so that what reads the server's models (the status page, its history) can
name the type without importing the application.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from modelpool._model import TensorSpec
from modelpool._pool import Pool
from modelpool.config import ModelSettings, ServerSettings

from . import _logging

__all__ = ["ALIVE_STATES", "RECENT", "ServedModel"]

#: worker states that count as alive for readiness
ALIVE_STATES = frozenset({"idle", "busy", "retiring"})
#: Triton's names for datatypes in a model configuration
_TRITON_TYPES = {"BYTES": "TYPE_STRING", "BOOL": "TYPE_BOOL"}
#: answers kept per model for the status page's recent latency
RECENT = 2000


class ServedModel:
    """One configured model: its pool, signature and readiness bookkeeping."""

    def __init__(
        self,
        name: str,
        settings: ModelSettings,
        pool: Pool | None = None,
        logs: ServerSettings | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.version = settings.version
        # logs: the server's logging settings, which its workers' log lines follow
        extra = _logging.worker_logging(logs, name) if logs is not None else {}
        self.pool = pool or Pool(settings.model, name=name, **settings.pool_kwargs(), **extra)
        cls = self.pool.model_class
        self.inputs: tuple[TensorSpec, ...] = tuple(getattr(cls, "inputs", ()) or ())
        self.outputs: tuple[TensorSpec, ...] = tuple(getattr(cls, "outputs", ()) or ())
        self.last_ok = 0.0  # monotonic time a request last went through a worker and back
        self.recent: collections.deque[float] = collections.deque(maxlen=RECENT)

    def attach(self, loop: Any) -> None:
        """Requests made in ``loop`` are sent and answered there (``Pool.attach_loop``)."""
        self.pool.attach_loop(loop)

    def detach(self) -> None:
        self.pool.detach_loop()

    def alive(self, stats: dict[str, Any] | None = None) -> int:
        stats = stats or self.pool.stats()
        return sum(1 for w in stats["workers"] if w.state in ALIVE_STATES)

    def readiness(self, window: float, stats: dict[str, Any] | None = None) -> tuple[bool, str]:
        """(ready, why not): enough workers alive, and one answered recently."""
        alive = self.alive(stats)
        need = self.settings.min_ready_workers  # the config keeps it <= the workers kept
        if alive < need:
            return False, f"model {self.name!r}: {alive} of {need} required workers alive"
        age = time.monotonic() - self.last_ok
        if age > window:
            return False, f"model {self.name!r}: no worker has answered for {age:.1f} s"
        return True, ""

    def metadata(self) -> dict[str, Any]:
        def tensor(spec: TensorSpec) -> dict[str, Any]:
            return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}

        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "modelpool",
            "inputs": [tensor(s) for s in self.inputs],
            "outputs": [tensor(s) for s in self.outputs],
        }

    def triton_config(self) -> dict[str, Any]:
        batching = self.settings.max_batch_size > 1

        def tensor(spec: TensorSpec) -> dict[str, Any]:
            dims = list(spec.shape[1:] if batching and spec.shape else spec.shape)
            kind = _TRITON_TYPES.get(spec.datatype, f"TYPE_{spec.datatype}")
            return {"name": spec.name, "data_type": kind, "dims": dims}

        config: dict[str, Any] = {
            "name": self.name,
            "platform": "modelpool",
            "backend": "modelpool",
            "max_batch_size": self.settings.max_batch_size if batching else 0,
            "input": [tensor(s) for s in self.inputs],
            "output": [tensor(s) for s in self.outputs],
            "instance_group": [{"count": self.settings.workers, "kind": "KIND_CPU"}],
            "parameters": {"model": {"string_value": self.settings.model}},
        }
        if batching:
            delay_us = int(self.settings.max_batch_delay * 1e6)
            config["dynamic_batching"] = {"max_queue_delay_microseconds": delay_us}
        return config
