"""Fakes for the supervisor's parts: settings to build them with, and a clock that moves only
when the test moves it (trio's MockClock, in small)."""

from __future__ import annotations

import threading
from typing import Any

from modelpool._settings import PoolSettings


def pool_settings(**overrides: Any) -> PoolSettings:
    """``PoolSettings`` for one worker of a model named "m", with ``overrides``."""
    base: dict[str, Any] = {
        "model_ref": "m:M",
        "model_name": "m",
        "options": {},
        "workers": 1,
        "threads": 1,
        "env": {},
        "seed": 0,
        "timeout": None,
        "setup_timeout": None,
        "max_requests_per_worker": None,
        "max_memory_per_worker": None,
        "retries": 0,
        "drain_timeout": None,
    }
    return PoolSettings(**{**base, **overrides})


class FakeClock:
    """Monotonic time for a supervisor (``Supervisor(..., clock=FakeClock())``)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds
