"""Handing answers from the supervisor thread to asyncio event loops, many at a time.

``asyncio.wrap_future`` wakes the event loop once per answer (a self-pipe write each), and
between those writes the supervisor thread may lose the GIL to the woken loop for a whole
switch interval. When a batch of 64 answers lands at once, that is where latency tails come
from. Here answers for one loop collect in an inbox, and only the first one after a drain
wakes the loop: a batch costs one wake-up, not 64.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["await_future", "call_in_loop"]


class _Inbox:
    """Answers waiting to be handed to one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # weak: the inbox is the value of a weak-keyed map, and a strong reference to its own
        # key would keep every event loop that ever awaited an answer alive for good
        self.loop = weakref.ref(loop)
        self.lock = threading.Lock()
        self.items: list[tuple[Callable[..., object], tuple[Any, ...]]] = []
        self.scheduled = False

    def put(self, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        """Run ``fn(*args)`` in the loop soon; called from any thread."""
        with self.lock:
            self.items.append((fn, args))
            if self.scheduled:
                return
            self.scheduled = True
        loop = self.loop()
        try:
            if loop is None:
                raise RuntimeError("the event loop is gone")
            loop.call_soon_threadsafe(self.drain)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            with self.lock:
                self.items.clear()
                self.scheduled = False

    def drain(self) -> None:
        """Runs in the loop: everything put since the last drain."""
        with self.lock:
            items, self.items = self.items, []
            self.scheduled = False
        for fn, args in items:
            fn(*args)


def _copy(waiter: asyncio.Future[Any], done: cf.Future[Any]) -> None:
    """Copy a settled future's outcome to its waiter (in the waiter's loop)."""
    if waiter.done():  # the caller was cancelled meanwhile
        return
    if done.cancelled():
        waiter.cancel()
    elif (exc := done.exception()) is not None:
        waiter.set_exception(exc)
    else:
        waiter.set_result(done.result())


_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Inbox] = weakref.WeakKeyDictionary()
_inboxes_lock = threading.Lock()


def _inbox(loop: asyncio.AbstractEventLoop) -> _Inbox:
    inbox = _inboxes.get(loop)
    if inbox is None:
        with _inboxes_lock:
            inbox = _inboxes.get(loop)
            if inbox is None:
                inbox = _inboxes[loop] = _Inbox(loop)
    return inbox


def call_in_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: Any) -> None:
    """Run ``fn(*args)`` in ``loop`` soon, from another thread; calls made while the loop is
    busy share one wake-up. Dropped if the loop is closed."""
    _inbox(loop).put(fn, args)


async def await_future(done: cf.Future[Any]) -> Any:
    """Await a ``concurrent.futures.Future`` from any event loop. Cancelling the await cancels
    the future (which drops a request that has not started, or its answer if it has)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[Any] = loop.create_future()
    inbox = _inbox(loop)
    done.add_done_callback(lambda f: inbox.put(_copy, (waiter, f)))
    try:
        return await waiter
    except asyncio.CancelledError:
        done.cancel()
        raise
