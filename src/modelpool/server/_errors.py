"""What a failed inference answers over HTTP, and the one log line each failure gets.

The pool raises the same exceptions for Python callers; here they are worded for an HTTP
caller (the model's name as the URL has it, protocol datatypes, no NumPy advice), and a
failure that is the model's or a worker's (an exception, a bad return value, a crash, a
timeout, a transport failure) is logged once, with the model, the worker's pid, the request id
and, for an exception, the worker's traceback. Failures the caller caused (bad inputs) or that
say the server is busy (overloaded, loading, shutting down) are in the access log only.
"""

from __future__ import annotations

import logging
from typing import Any

from modelpool._exceptions import (
    BatchError,
    InputValidationError,
    ModelSetupError,
    PoolClosedError,
    PoolOverloadedError,
    RemoteError,
    RemoteTraceback,
    RequestTimeoutError,
    SerializationError,
    TransportError,
    WorkerCrashedError,
)

__all__ = ["HTTPError", "bad_outputs", "predict_failed"]

log = logging.getLogger("modelpool.server")


class HTTPError(Exception):
    """An answer other than 200, with a message for the user."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.headers = headers or {}


def _context(model: str, request_id: str | None, pid: int | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"model": model}
    if pid is not None:
        fields["worker_pid"] = pid
    if request_id is not None:
        fields["request_id"] = request_id
    return fields


def predict_failed(
    model: str, exc: Exception, request_id: str | None, pid: int | None, retry_after: int
) -> HTTPError:
    """The answer to a predict that raised ``exc``; logs it when it is a failure to log.
    ``pid``: the worker that ran the request, if one did."""
    prefix = f"model {model!r}"
    if isinstance(exc, InputValidationError):
        return HTTPError(400, f"{prefix}: {exc.problem or exc}")
    if isinstance(exc, WorkerCrashedError):
        pid = exc.pid if exc.pid is not None else pid
        extra = {"fields": _context(model, request_id, pid)}
        log.error("%s: %s", prefix, exc, extra=extra)
        return HTTPError(503, _crash_message(prefix, exc), retry_after=retry_after)
    # the pool's own messages already name the model as the URL does (the server names its
    # pools), so they go out as they are, without a second prefix
    if isinstance(exc, RequestTimeoutError):
        log.warning("%s", exc, extra={"fields": _context(model, request_id, pid)})
        return HTTPError(504, str(exc))
    if isinstance(exc, PoolClosedError):
        message = f"{prefix} is shutting down; send the request to another instance"
        return HTTPError(503, message, retry_after=retry_after)
    if isinstance(exc, PoolOverloadedError | ModelSetupError):
        return HTTPError(503, str(exc), retry_after=retry_after)  # worth a retry
    if isinstance(exc, TransportError):  # never the model's doing
        log.error("%s: %s", prefix, exc, extra={"fields": _context(model, request_id, pid)})
        return HTTPError(503, f"{prefix}: {exc}", retry_after=retry_after)
    if isinstance(exc, BatchError | SerializationError):  # (inputs here are always arrays)
        return bad_outputs(model, str(exc), request_id, pid)
    # raised by the model's predict(): a bug in the model
    tb: str | None
    if isinstance(exc, RemoteError):
        kind, message, tb = exc.type_name, exc.remote_message, exc.remote_traceback
    else:
        cause = exc.__cause__
        kind, message = type(exc).__name__, str(exc)
        tb = cause.tb if isinstance(cause, RemoteTraceback) else None
    where = f" in worker pid {pid}" if pid is not None else ""
    log.error(
        "%s raised %s%s: %s",
        prefix,
        kind,
        where,
        message,
        extra={"fields": _context(model, request_id, pid), "traceback": tb},
    )
    return HTTPError(500, f"{prefix} raised {kind}: {message}")


def bad_outputs(model: str, what: str, request_id: str | None, pid: int | None) -> HTTPError:
    """The model's predict returned something that cannot be answered: logged, and a 500."""
    where = f" (worker pid {pid})" if pid is not None else ""
    extra = {"fields": _context(model, request_id, pid)}
    log.error("model %r returned bad outputs%s: %s", model, where, what, extra=extra)
    return HTTPError(500, f"model {model!r} returned bad outputs: {what}")


def _crash_message(prefix: str, exc: WorkerCrashedError) -> str:
    """The crash in an HTTP caller's words, from the exception's facts."""
    if exc.signal_name:
        how = f"was killed by {exc.signal_name}"
    elif exc.exitcode is not None:
        how = f"exited with status {exc.exitcode}"
    else:
        how = "died"
    pid = f" (pid {exc.pid})" if exc.pid is not None else ""
    cause = f"; likely cause: {exc.likely_cause}" if exc.likely_cause else ""
    return (
        f"{prefix}: the worker process running this request{pid} {how}{cause}. It is being "
        "replaced; retry the request."
    )
