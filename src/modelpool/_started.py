"""A request a server started and awaits: ``Pool.start_predict`` and ``Pool.start_infer``
return one."""

from __future__ import annotations

import concurrent.futures as cf
from typing import Any

from . import _aio
from ._loopside import LoopFuture
from ._requests import Request

__all__ = ["StartedPredict"]


class StartedPredict:
    """A predict queued by ``Pool.start_predict``: ``future`` settles with its outputs (or its
    error); ``worker_pid`` is the pid of the worker it was last given to (the one that ran it,
    or died running it), None while it waits for one (queued, or queued again for a retry)."""

    __slots__ = ("_request",)

    def __init__(self, request: Request) -> None:
        self._request = request

    @property
    def future(self) -> cf.Future[Any]:
        """The request's future; for one made on an attached loop (``Pool.attach_loop``), use
        ``await wait()`` instead."""
        return self._request.future

    async def wait(self) -> Any:
        """The outputs (or the error), awaited in the loop that started the predict.
        Cancelling the wait drops the request if it has not started, or its answer."""
        future: Any = self._request.future
        if isinstance(future, LoopFuture):
            return await future.wait()
        return await _aio.await_future(future)

    @property
    def worker_pid(self) -> int | None:
        worker = self._request.worker
        return worker.pid if worker is not None else None
