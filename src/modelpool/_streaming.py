"""Models that answer in pieces: a ``predict`` written as a generator (or async generator).

``Pool.stream(inputs)`` sends a ``STREAM`` request. The worker calls ``predict``; when it
returns a generator, each item goes back as a ``PIECE`` message as soon as it is produced, and
the end as the usual ``OK`` (an exception as ``ERR``). A ``predict`` that returns a plain value
streams that one value.

Back-pressure: the worker may be at most ``WINDOW`` pieces ahead of the caller. It starts with
that many credits, spends one per piece, and waits for a ``CREDIT`` (sent as the caller takes
a piece) when it has none: a slow reader pauses the generator instead of filling memory.
Cancellation: closing the stream (or its caller going away) sends ``CANCEL``; the worker
closes the generator (its ``finally`` runs) and answers the end. A stream past its deadline
fails for its reader at once and is cancelled the same way; a worker that has not stopped
``STOP_GRACE`` seconds later (stuck between two pieces) is killed, as for any timeout.
Both messages are written while the worker runs the stream (by the stream's owner, or the
pool's supervisor at a deadline), the only time nothing else writes to that worker;
``Sink.lock`` keeps them from crossing the end of the stream (after which the worker may be
given the next request).
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from . import _transport

__all__ = [
    "CANCEL",
    "CREDIT",
    "PIECE",
    "STOP_GRACE",
    "STREAM",
    "STREAM_INFER",
    "WINDOW",
    "PredictStream",
    "Sink",
    "run_stream",
]

# parent -> worker: a stream request (payload: (request id or None, inputs)), more credit
# (payload: a count), a cancel (payload: None); worker -> parent: one piece
STREAM, CREDIT, CANCEL = 7, 8, 9
# parent -> worker: a server's stream request, as its body's bytes (``_infer.stream``)
STREAM_INFER = 10
PIECE = 15
#: pieces a worker may produce ahead of its caller
WINDOW = 4
#: seconds a stream past its deadline has to stop its generator before its worker is killed
STOP_GRACE = 5.0

_END = object()


# ----------------------------------------------------------------------------- the worker


def run_stream(
    channel: Any, rid: int, result: Any, ok: int, encode: Any = None
) -> tuple[int, int, Any]:
    """Send ``result``'s items (a generator's, or ``result`` itself) as pieces; the final
    answer to send (``(ok, rid, None)``); an exception the generator raises propagates.
    ``encode(item)``, when given, returns ``(piece, last)``: what to send for an item, and
    whether it ends the stream (an item that cannot be answered: the generator is closed)."""
    if inspect.isasyncgen(result):
        items: Iterator[Any] = _sync_items(result)
    elif inspect.isgenerator(result):
        items = result
    else:
        items = iter([result])
    credits = WINDOW
    try:
        for item in items:
            last = False
            if encode is not None:
                item, last = encode(item)
            channel.send((PIECE, rid, item))
            if last:
                return (ok, rid, None)
            credits -= 1
            # what the caller sent meanwhile; with no credit left, wait for some
            while (message := channel.recv(block=credits <= 0)) is not None:
                kind, _, payload = message
                if kind == CANCEL:
                    return (ok, rid, None)  # (the generator is closed below)
                if kind == CREDIT:
                    credits += payload
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()
    return (ok, rid, None)


def _sync_items(agen: Any) -> Iterator[Any]:
    """An async generator's items, driven by a private event loop (the worker has none)."""
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        try:
            loop.run_until_complete(agen.aclose())
        finally:
            loop.close()


# ----------------------------------------------------------------------------- the caller


class Sink:
    """What the pool's readers put a stream's pieces into, and its end."""

    __slots__ = ("cond", "done", "items", "lock", "open", "started", "stopping", "waker")

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.items: collections.deque[Any] = collections.deque()
        self.done = False  # the end (or an error) was put
        self.lock = threading.Lock()  # held while writing CREDIT/CANCEL, and to close
        self.open = True  # the worker still runs the stream: CREDIT/CANCEL may be written
        self.started = False  # a piece arrived: a crash now fails the stream, no retry
        self.stopping = False  # past its deadline: told to stop, and failed for its reader
        self.waker: Any = None  # (loop, asyncio.Event) of an async reader

    def put(self, item: Any) -> None:
        with self.cond:
            self.items.append(item)
            self.cond.notify_all()
        self._wake()

    def send(self, worker: Any, rid: int, kind: int, payload: Any) -> None:
        """``CREDIT`` or ``CANCEL`` to ``worker``, while it still runs the stream ``rid``."""
        with self.lock:
            if not self.open:
                return
            try:
                worker.channel.send_small(_transport.encode_plain((kind, rid, payload)).body)
            except OSError:
                pass  # the worker is gone: the pool fails the stream

    def stop(self, worker: Any, rid: int, error: BaseException) -> None:
        """The stream is past its deadline: its reader gets ``error`` now, and the worker is
        told to stop the generator (as a cancel does: its ``finally`` runs). The request
        stays the worker's until it has stopped (the pool kills it if it does not, soon)."""
        with self.cond:
            self.items.append(_Failed(error))
            self.cond.notify_all()
        self._wake()
        self.send(worker, rid, CANCEL, None)

    def close(self) -> None:
        """The worker is done with the stream: no more CREDIT or CANCEL to it (it may take
        another request next). Waits for one being written."""
        with self.lock:
            self.open = False

    def end(self, future: Any) -> None:
        """The request's future (a ``concurrent.futures`` or an asyncio one) settled: the
        stream is over. Its error, if any, comes last; a result other than None is a last
        piece (a server's request that was answered without running the model)."""
        self.close()
        error = None if future.cancelled() else future.exception()
        with self.cond:
            if error is None and future.result() is not None:
                self.items.append(future.result())
            self.items.append(_Failed(error) if error is not None else _END)
            self.done = True
            self.cond.notify_all()
        self._wake()

    def _wake(self) -> None:
        waker = self.waker
        if waker is not None:
            loop, event = waker
            if asyncio._get_running_loop() is loop:
                event.set()  # (read on the reader's own loop: no hand-off)
            else:
                loop.call_soon_threadsafe(event.set)


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class PredictStream:
    """The pieces of one streamed predict, as they come: iterate it (``for``, or ``async
    for``); close it (or leave its ``with`` block) to stop the model's generator early.
    Returned by ``Pool.stream``."""

    def __init__(self, request: Any) -> None:
        self._request = request  # (a ``_requests.Request``: not imported, the worker imports us)
        self._sink: Sink = request.stream
        self._closed = False

    # ------------------------------------------------------------------ reading

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        sink = self._sink
        with sink.cond:
            while not sink.items:
                sink.cond.wait()
            item = sink.items.popleft()
        return self._taken(item)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        sink = self._sink
        if sink.waker is None:
            sink.waker = (asyncio.get_running_loop(), asyncio.Event())
        event: asyncio.Event = sink.waker[1]
        while True:
            with sink.cond:
                if sink.items:
                    item = sink.items.popleft()
                    break
                event.clear()
            try:
                await event.wait()
            except asyncio.CancelledError:
                self.close()
                raise
        try:
            return self._taken(item)
        except StopIteration:
            raise StopAsyncIteration from None

    def _taken(self, item: Any) -> Any:
        if item is _END:
            self._closed = True
            raise StopIteration
        if isinstance(item, _Failed):
            self._closed = True
            raise item.error
        self._send(CREDIT, 1)
        return item

    @property
    def worker_pid(self) -> int | None:
        """The pid of the worker running the stream (None while it is queued)."""
        worker = self._request.worker
        return worker.pid if worker is not None else None

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Stop the stream: a queued request is dropped; a running one's generator is
        closed in the worker (its ``finally`` runs). Pieces not read are dropped."""
        if self._closed:
            return
        self._closed = True
        if not self._request.future.cancel():
            self._send(CANCEL, None)

    def __enter__(self) -> PredictStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> PredictStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    def _send(self, kind: int, payload: Any) -> None:
        """A message to the worker running the stream, while it still does."""
        worker = self._request.worker
        if worker is not None:
            self._sink.send(worker, self._request.id, kind, payload)
