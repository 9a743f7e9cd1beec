"""What the supervisor's loop sleeps on: workers' connections and exits, and a wake-up pipe.

``Poller`` wraps a selector (``epoll`` on Linux). Registrations change under the supervisor's
lock (``watch``, ``watch_exit``); ``wake`` is safe from any thread at any moment (a finalizer,
a signal handler's thread), since it only writes a byte to a non-blocking pipe.
"""

from __future__ import annotations

import contextlib
import os
import selectors
from typing import Any

from ._handle import WorkerHandle

__all__ = ["Poller"]


class Poller:
    """A selector over worker connections (``"conn"``), process sentinels (``"exit"``) and a
    wake-up pipe."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()  # its epoll fd is made lazily, at open
        self._wake_r = self._wake_w = -1

    def open(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def watch(self, worker: WorkerHandle, on: bool) -> None:
        """(Un)register ``worker``'s connection: its answers are read by the loop (lock held)."""
        if worker.watched == on or (on and (worker.kill_reason or worker.exited)):
            return
        if on:
            self._selector.register(worker.channel.fileno(), selectors.EVENT_READ, ("conn", worker))
        else:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(worker.channel.fileno())
        worker.watched = on

    def watch_new(self, worker: WorkerHandle) -> None:
        """A worker was just started: wait for its READY (or why it could not start), and
        for its exit (lock held)."""
        self.watch(worker, True)
        self._selector.register(worker.process.sentinel, selectors.EVENT_READ, ("exit", worker))

    def forget_exit(self, worker: WorkerHandle) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(worker.process.sentinel)

    def wait(self, timeout: float) -> list[tuple[str, Any]]:
        """Sleep until something happens or ``timeout`` seconds pass; the events, as
        ``("conn" | "exit", worker)`` (wake-ups are consumed, not returned)."""
        out = []
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            else:
                out.append(key.data)
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1
