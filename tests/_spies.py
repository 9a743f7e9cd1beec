"""Spies on a real pool's internals, for tests that must show which thread did the work."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import modelpool


def delivering_threads(pool: modelpool.Pool, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads that settle ``pool``'s answers from now on, one per answer."""
    dispatch = pool._supervisor.dispatch
    seen: list[str] = []
    deliver = dispatch.deliver

    def spy(req: Any, kind: int, payload: Any) -> None:
        seen.append(threading.current_thread().name)
        deliver(req, kind, payload)

    monkeypatch.setattr(dispatch, "deliver", spy)
    return seen
