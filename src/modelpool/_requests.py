"""The records of work in flight: a ``Request``, a ``Batch`` of them, and the ``Outbox`` of
outcomes decided under the supervisor's lock but reported after it is released.

A request is settled exactly once, through its future: answered, failed, or cancelled by its
caller. Whoever settles it never holds the supervisor's lock while doing so, because a future's
done-callbacks run in the settling thread and may call back into the pool.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _batching, _transport

if TYPE_CHECKING:
    from ._handle import WorkerHandle

__all__ = ["Batch", "Outbox", "Request", "fresh", "settle_failed"]


class Request:
    """One unit of work: a predict or a function call, with its future and deadline.

    The future is made on first use: a blocking call answered on the fast path never needs
    one (it costs a Condition and an RLock). Made under a lock, so the caller thread and the
    supervisor thread always share the same one.
    """

    __slots__ = (
        "_future",
        "arrival",
        "attempts",
        "batch",
        "counted",
        "deadline",
        "frame",
        "id",
        "inputs",
        "rows",
        "signature",
        "stream",
        "tag",
        "worker",
    )
    _make_lock = threading.Lock()

    def __init__(self, rid: int, deadline: float | None, arrival: float = 0.0) -> None:
        self.id = rid
        self.frame = _transport.Encoded(b"", [])
        self.deadline = deadline
        self._future: cf.Future[Any] | None = None
        self.attempts = 0
        self.worker: WorkerHandle | None = None
        # batching: the inputs to merge (None = send ``frame`` as it is), what the batcher reads
        self.inputs: Any = None
        self.arrival = arrival
        self.rows = 1
        self.signature: _batching.Signature | None = None
        self.batch: Batch | None = None  # the batch this request runs in
        self.tag: str | None = None  # the caller's request id, carried to the worker
        self.counted = True  # False: not a served request (a readiness probe)
        self.stream: Any = None  # a streamed predict's sink (``_streaming``), else None

    def may_retry(self, retries: int) -> bool:
        """Whether a crash may send it to another worker: tries left, and no piece of it (a
        streamed predict) delivered yet."""
        return self.attempts <= retries and not (self.stream is not None and self.stream.started)

    @property
    def members(self) -> tuple[Request, ...]:
        """The requests whose answers this one carries (itself, or a batch's members)."""
        return (self,)

    @property
    def future(self) -> cf.Future[Any]:
        future = self._future
        if future is None:
            with Request._make_lock:
                future = self._future
                if future is None:
                    future = self._future = cf.Future()
        return future

    def use_future(self, future: Any) -> None:
        """Settle through ``future`` (a ``_loopside.LoopFuture``, which has the part of a
        ``concurrent.futures.Future`` used here) instead of a new ``Future``; before submit."""
        self._future = future

    def claim(self) -> bool:
        """Mark the request as running; False when its caller cancelled it meanwhile."""
        future = self.future
        return future.running() or future.set_running_or_notify_cancel()


class Batch(Request):
    """Requests run together as one predict; the answer is split back per member."""

    __slots__ = ("parts",)

    def __init__(self, rid: int, parts: list[Request]) -> None:
        super().__init__(rid, None)
        self.parts = parts

    @property
    def members(self) -> tuple[Request, ...]:
        return tuple(self.parts)


def settle_failed(req: Request, exc: BaseException) -> None:
    """Fail ``req`` with ``exc`` unless it is settled already. Never call with the
    supervisor's lock held: done-callbacks run here."""
    future = req.future
    if future.done():
        return
    with contextlib.suppress(cf.InvalidStateError, RuntimeError):  # settled meanwhile
        if future.running() or future.set_running_or_notify_cancel():
            future.set_exception(exc)


class Outbox:
    """Failures, log records and writes decided under the supervisor's lock, done after it.

    ``fail_later``, ``log_later`` and ``call_later`` require the lock (they only append);
    ``flush`` must be called without it, by the thread that released it. ``forget`` is told of
    every request settled here, so the deadline index drops it.
    """

    def __init__(self, logger: logging.Logger, forget: Callable[[int], object]) -> None:
        self._log = logger
        self._forget = forget
        self.failures: list[tuple[Request, BaseException]] = []
        self._records: list[tuple[int, str, tuple[object, ...], BaseException | None]] = []
        self._calls: list[tuple[Callable[..., object], tuple[Any, ...]]] = []

    def fail_later(self, req: Request, exc: BaseException) -> None:
        self._forget(req.id)
        self.failures.append((req, exc))

    def failing(self, req: Request) -> bool:
        """Whether a failure of ``req`` is decided but not yet reported."""
        return any(r is req for r, _ in self.failures)

    def log_later(
        self, level: int, message: str, *args: object, exc_info: BaseException | None = None
    ) -> None:
        """Formatting a traceback or a blocking write to stderr must not hold up every caller,
        and a log handler may call the pool: records are written by ``flush``."""
        self._records.append((level, message, args, exc_info))

    def call_later(self, fn: Callable[..., object], *args: Any) -> None:
        """Something to do after the lock (a write to a worker: it may block)."""
        self._calls.append((fn, args))

    def flush(self) -> None:
        while self._calls:
            fn, args = self._calls.pop(0)
            fn(*args)
        while self.failures:
            req, exc = self.failures.pop(0)
            settle_failed(req, exc)
        while self._records:
            level, message, args, exc_info = self._records.pop(0)
            self._log.log(level, message, *args, exc_info=exc_info)


def fresh(error: BaseException) -> BaseException:
    """A new instance of a stored error, so raising it in many threads shares no traceback."""
    try:
        clone = type(error)(*error.args)
    except Exception:
        return error
    clone.__cause__ = error.__cause__
    return clone
