"""Waiting for an event: poll a condition until it holds, or fail loudly saying what never came.

The timeout only bounds a failure: a test that passes never waits it out, so it is generous and
never tuned to the machine's speed. Use these instead of ``time.sleep`` to let something happen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.01) -> T:
    """Return ``predicate()``'s first true value; fail after ``timeout`` s, naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {what}")
        time.sleep(interval)


async def until(
    predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.005
) -> T:
    """``wait_for`` for a coroutine: the event loop keeps running while it waits."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)
