"""The event loop's share of dispatch: answers read on the loop that sent the requests.

A server's event loop can take requests to workers and read their answers itself, with no
thread in between. Without this, every answer is read by the supervisor thread and handed to
the loop through a thread-safe call: two thread hand-offs per request, each a contended GIL
and a futex wake-up (on the 2-core machine of docs/benchmarks.md, 5 futex calls per request
and most of the server's CPU).

``Pool.attach_loop(loop)`` (the server does it at startup) gives the pool a ``LoopSide``.
From then on, a request sent from that loop's thread is watched by the loop
(``loop.add_reader`` on the worker's connection) instead of the supervisor's selector; when
its answer arrives the loop settles it and hands the worker the next queued request (or forms
the next batch) right there. With batching on (and no autoscaling), the loop also times and
sends the batches of the requests it queues (``dispatch_due``, a loop timer for a batch that is
not full yet): the supervisor thread is not woken on the way of a request. It still owns
everything else: process life cycle, deadlines, recovery, growing the pool, and the batches of
requests queued from other threads. Requests sent from other threads keep its path.

Ownership. A worker's connection has one reader at a time (see ``_dispatch``). While the loop
watches a worker (``loop_watched``) it holds the channel (``users``), so the supervisor never
closes a descriptor the loop still polls: when the worker exits, the supervisor shuts the
socket down, the loop reads end-of-file, stops watching and releases (and so closes) it. Only
the loop's own thread adds or removes its readers; ``watch`` called from another thread
leaves a loop-watched worker to the loop. ``detach`` hands every loop-watched worker back to
the supervisor's selector (the server does it before its loop stops).

``LoopFuture`` replaces ``concurrent.futures.Future`` for a request made on the attached loop:
no condition variable, and settled on the loop's thread it sets the awaiting ``asyncio``
future directly; settled elsewhere (a crash, a timeout) it goes through the loop's inbox.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import math
import select
import threading
from collections.abc import Callable
from typing import Any, cast

from . import _aio
from ._dispatch import Dispatcher, out_of_step, peer_gone, transport_error
from ._handle import WorkerHandle
from ._requests import Request
from ._streaming import PIECE
from ._transport import DecodeError
from ._worker import ERR, OK

__all__ = ["LoopFuture", "LoopSide"]

_PENDING, _RUNNING, _FINISHED, _CANCELLED = range(4)


class LoopFuture:
    """The part of ``concurrent.futures.Future`` a request's future needs, for a request made
    on the attached loop. The loop awaits ``waiter``; ``cancel`` before it runs drops it."""

    __slots__ = ("_lock", "_side", "_state", "waiter")

    def __init__(self, side: LoopSide) -> None:
        self._side = side
        self._state = _PENDING
        self._lock = threading.Lock()  # the supervisor thread may settle it too
        self.waiter: asyncio.Future[Any] = side.loop.create_future()

    def done(self) -> bool:
        return self._state >= _FINISHED

    def running(self) -> bool:
        return self._state == _RUNNING

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def set_running_or_notify_cancel(self) -> bool:
        with self._lock:
            if self._state == _CANCELLED:
                return False
            if self._state != _PENDING:
                raise RuntimeError("the request is already running or done")
            self._state = _RUNNING
            return True

    def cancel(self) -> bool:
        """Cancel a request that has not started (True), as ``Future.cancel`` does."""
        with self._lock:
            if self._state in (_RUNNING, _FINISHED):
                return False
            self._state = _CANCELLED
        self._side.settle(self.waiter, None, None, cancel=True)
        return True

    def _finish(self) -> None:
        with self._lock:
            if self._state >= _FINISHED:
                raise cf.InvalidStateError("the request is settled already")
            self._state = _FINISHED

    def set_result(self, result: Any) -> None:
        self._finish()
        self._side.settle(self.waiter, result, None)

    def set_exception(self, exc: BaseException) -> None:
        self._finish()
        self._side.settle(self.waiter, None, exc)

    async def wait(self) -> Any:
        """The answer. Cancelling the wait cancels the request if it has not started."""
        try:
            return await self.waiter
        except asyncio.CancelledError:
            self.cancel()
            raise


def _set(waiter: asyncio.Future[Any], result: Any, exc: BaseException | None, cancel: bool) -> None:
    if waiter.done():
        return  # the awaiting task was cancelled: the answer is dropped
    if cancel:
        waiter.cancel()
    elif exc is not None:
        waiter.set_exception(exc)
    else:
        waiter.set_result(result)


class LoopSide:
    """An event loop that reads the answers to the requests it sends; see the module
    docstring. Every method but ``settle`` runs on the loop's thread, or with the lock held
    as said."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        lock: threading.Lock,
        dispatch: Dispatcher,
        *,
        discard: Callable[[int], object],
        clock: Callable[[], float],
        wake: Callable[[], None],
        closing: Callable[[], bool],
        out_of_step: Callable[[WorkerHandle, Exception, str], None],
        give_back: Callable[[WorkerHandle], None],
    ) -> None:
        self.loop = loop
        self.thread = threading.get_ident()
        self._lock = lock
        self._dispatch = dispatch
        self._batching = dispatch.settings.batching
        self._discard = discard  # drop a settled request from the deadline index
        self._clock = clock
        self._wake = wake
        self._closing = closing
        self._out_of_step = out_of_step
        self._give_back = give_back  # (lock held) the supervisor's selector reads it again
        self.watching: set[WorkerHandle] = set()
        self.detached = False
        # the watched workers' descriptors, for ``reap`` (touched on the loop's thread only)
        self._ready = select.poll()
        self._by_fd: dict[int, WorkerHandle] = {}
        # the loop timer that forms the next batch, and when it is due (loop thread only)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due: float | None = None

    def here(self) -> bool:
        """Whether this thread is running the attached loop."""
        return (
            not self.detached
            and threading.get_ident() == self.thread
            and asyncio._get_running_loop() is self.loop
        )

    def future(self) -> LoopFuture:
        return LoopFuture(self)

    def settle(
        self,
        waiter: asyncio.Future[Any],
        result: Any,
        exc: BaseException | None,
        *,
        cancel: bool = False,
    ) -> None:
        """Hand an outcome to ``waiter``: directly on the loop's thread, else via its inbox."""
        if threading.get_ident() == self.thread:
            _set(waiter, result, exc, cancel)
        else:
            _aio.call_in_loop(self.loop, _set, waiter, result, exc, cancel)

    # ------------------------------------------------------------------ watching (lock held)

    def watch(self, worker: WorkerHandle, on: bool) -> bool:
        """(Un)watch ``worker`` from the loop; True when the loop reads its answers now."""
        if worker.loop_watched:
            if on:
                return True
            if self.here():
                self._unwatch(worker)
                return False
            return True  # another thread cannot remove the loop's reader: the loop keeps it
        if not on or not self.here() or worker.kill_reason is not None or worker.exited:
            return False
        fd = worker.channel.fileno()
        self.loop.add_reader(fd, self._readable, worker)
        self._ready.register(fd, select.POLLIN)
        self._by_fd[fd] = worker
        worker.loop_watched = True
        worker.users += 1  # the supervisor leaves the descriptor open while the loop polls it
        self.watching.add(worker)
        return True

    def _unwatch(self, worker: WorkerHandle) -> None:
        assert self._lock.locked()
        if not worker.loop_watched:
            return
        self._forget(worker)
        self._dispatch.release_channel(worker)

    def _forget(self, worker: WorkerHandle) -> None:
        fd = worker.channel.fileno()
        self.loop.remove_reader(fd)
        if self._by_fd.pop(fd, None) is not None:
            self._ready.unregister(fd)
        worker.loop_watched = False
        self.watching.discard(worker)

    def detach(self) -> None:
        """Stop reading on the loop (on its thread): the supervisor's selector takes every
        worker the loop watched, with any answer still to come."""
        if self._timer is not None:
            self._timer.cancel()  # (the supervisor, woken below, times the batches again)
            self._timer = self._timer_due = None
        with self._lock:
            self.detached = True
            for worker in list(self.watching):
                self._forget(worker)
                self._dispatch.release_channel(worker)
                if not worker.exited and worker.channel.fileno() >= 0:
                    self._give_back(worker)
        self._wake()

    def drain_soon(self, worker: WorkerHandle, done: Callable[[WorkerHandle], None]) -> None:
        """(Any thread) ``worker`` has exited: on the loop, read what it wrote before (the
        pieces of a stream), up to its end of file, then call ``done(worker)``."""

        def drain() -> None:
            try:
                for _ in range(64):  # (a stream holds at most WINDOW pieces and its end)
                    if not (worker.loop_watched and worker.channel.readable()):
                        break
                    self._readable(worker)
            finally:
                done(worker)

        _aio.call_in_loop(self.loop, drain)

    # ------------------------------------------------------------------ batches (loop thread)

    def dispatch_due(self) -> None:
        """Send the batches that are due to idle workers; when the next one is not (not full,
        its delay not spent), look again when it is, with a loop timer."""
        with self._lock:
            if self.detached:
                return  # the supervisor has the queue again
            if not self._dispatch.loop_batches():  # shutting down: the supervisor drains
                to_send, due, wake = [], None, True
            else:
                to_send = self._dispatch.dispatch(self._clock())
                due, wake = self._dispatch.batch_due, False
        for worker, req in to_send:
            self._dispatch.send(worker, req)
        if wake:
            self._wake()
        elif due is not None:
            self._look_at(due)

    def _look_at(self, due: float) -> None:
        if self._timer_due is not None and self._timer_due <= due:
            return  # an earlier look is set: it sets the next one
        if self._timer is not None:
            self._timer.cancel()
        # whole milliseconds, rounded up: uvloop's timers count in them, and one rounded down
        # would fire before ``due`` and set itself again until then
        delay = math.ceil(max(0.0, due - self._clock()) * 1e3) / 1e3
        self._timer_due = due
        self._timer = self.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_due = None
        try:
            self.dispatch_due()
        except Exception as exc:  # a bug: the requests' deadlines and the supervisor remain
            message = "modelpool: forming a batch on the event loop failed"
            self.loop.call_exception_handler({"message": message, "exception": exc})
            self._wake()

    # ------------------------------------------------------------------ answers (loop thread)

    def reap(self) -> None:
        """Read the answers already waiting. Called when a request made on the loop is
        queued: the loop runs the callbacks of one turn in a row, so in a burst of client
        requests a worker's answer would sit unread, and the worker idle, until the next turn.
        One poll(0) over the watched workers' descriptors."""
        if self._by_fd:
            for fd, _ in self._ready.poll(0):
                worker = self._by_fd.get(fd)
                if worker is None:
                    continue
                try:
                    self._readable(worker)
                except Exception as exc:  # a bug: not the queued request's to carry
                    message = "modelpool: reading a worker's answer failed"
                    self.loop.call_exception_handler({"message": message, "exception": exc})

    def _readable(self, worker: WorkerHandle) -> None:
        if not worker.loop_watched:
            return  # a stale callback
        try:
            message = worker.channel.recv(block=False)
            if message is None:
                return  # incomplete: the rest comes with a later callback
            kind, rid, payload = message
        except DecodeError as exc:  # whole, but not readable here: the answer is that error
            kind, rid, payload = ERR, 0, exc.remote
        except Exception as exc:
            with self._lock:
                self._unwatch(worker)
            if not peer_gone(exc):  # not a message, or a local failure reading it
                self._out_of_step(worker, transport_error(exc, worker), "reading from it failed")
            return  # gone: its exit reaches the supervisor, which settles the request
        self._answered(worker, kind, rid, payload)

    def _answered(self, worker: WorkerHandle, kind: int, rid: int, payload: Any) -> None:
        dispatch = self._dispatch
        if kind == PIECE:  # a streamed predict's piece; more may have come in the same read
            if (mistake := dispatch.piece(worker, rid, payload)) is not None:
                self._out_of_step(worker, mistake, f"a piece of {rid}, not a stream it runs")
            elif worker.channel.readable():
                self._readable(worker)
            return
        with self._lock:
            req = cast(Request | None, worker.request)  # the handle's view of what we assigned
            if req is None or worker.kill_reason is not None:
                return  # settled meanwhile (timed out, being killed): a late answer is dropped
            if kind not in (OK, ERR) or rid not in (req.id, 0):
                wrong = out_of_step(worker, rid, req.id)
                bad = True
            else:
                bad = False
                dispatch.complete(worker)
                for member in req.members:
                    self._discard(member.id)
                to_send = []
                if not dispatch.queue or self._closing():
                    pass  # nothing waits, or the supervisor drains
                elif self._batching:
                    to_send = dispatch.dispatch(self._clock())  # batches for idle workers
                elif (follow := dispatch.next_for(worker)) is not None:
                    to_send = [(worker, follow)]  # the oldest queued request, to this worker
                if not any(w is worker for w, _ in to_send):
                    self._unwatch(worker)
                # the supervisor decides what a retiring worker or a shutdown needs, and times
                # a batch that is not due yet unless the loop may; otherwise it has nothing to
                # do with this answer
                due = dispatch.batch_due
                on_loop = due is not None and dispatch.loop_batches()
                wake = worker.retiring or self._closing() or (due is not None and not on_loop)
        if bad:
            self._out_of_step(worker, wrong, f"answer {rid} to request {req.id}")
            return
        dispatch.deliver(req, kind, payload)
        for other, follow in to_send:
            dispatch.send(other, follow)
        if wake:
            self._wake()
        if on_loop:
            assert due is not None
            self._look_at(due)
