"""Waiting for an event: poll a condition until it holds, or fail loudly saying what never came.

The timeout only bounds a failure: a test that passes never waits it out, so it is generous and
never tuned to the machine's speed. Use these instead of ``time.sleep`` to let something happen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


def _attempts(predicate: Callable[[], T], timeout: float, what: str) -> Iterator[T]:
    """``predicate()``'s values, one per attempt, until ``timeout`` s have passed."""
    deadline = time.monotonic() + timeout
    while True:
        yield predicate()
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {what}")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.01) -> T:
    """Return ``predicate()``'s first true value; fail after ``timeout`` s, naming ``what``."""
    for value in _attempts(predicate, timeout, what):
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("unreachable")  # (_attempts ends only by raising)


async def until(
    predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.005
) -> T:
    """``wait_for`` for a coroutine: the event loop keeps running while it waits."""
    for value in _attempts(predicate, timeout, what):
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError("unreachable")
