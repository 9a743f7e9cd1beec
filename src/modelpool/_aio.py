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
from typing import Any

__all__ = ["await_future"]


class _Inbox:
    """Answers waiting to be handed to one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # weak: the inbox is the value of a weak-keyed map, and a strong reference to its own
        # key would keep every event loop that ever awaited an answer alive for good
        self.loop = weakref.ref(loop)
        self.lock = threading.Lock()
        self.items: list[tuple[asyncio.Future[Any], cf.Future[Any]]] = []
        self.scheduled = False

    def put(self, waiter: asyncio.Future[Any], done: cf.Future[Any]) -> None:
        """Called in whatever thread settled ``done``."""
        with self.lock:
            self.items.append((waiter, done))
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
        """Runs in the loop: copy each settled future's outcome to its waiter."""
        with self.lock:
            items, self.items = self.items, []
            self.scheduled = False
        for waiter, done in items:
            if waiter.done():  # the caller was cancelled meanwhile
                continue
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


async def await_future(done: cf.Future[Any]) -> Any:
    """Await a ``concurrent.futures.Future`` from any event loop. Cancelling the await cancels
    the future (which drops a request that has not started, or its answer if it has)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[Any] = loop.create_future()
    inbox = _inbox(loop)
    done.add_done_callback(lambda f: inbox.put(waiter, f))
    try:
        return await waiter
    except asyncio.CancelledError:
        done.cancel()
        raise
