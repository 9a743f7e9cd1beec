"""The server's logs: set up by ``serve``, request ids, the access log.

Every request gets an id: its ``X-Request-ID`` header, else (for inference) the ``id`` of its
JSON body, else a new one. It is answered in the ``X-Request-ID`` header, is the request id of
every log line written while the request is handled (``modelpool._logs.REQUEST_ID``), and
travels to the worker that runs the request (``modelpool.request_id()`` there).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import IO, Any, Protocol

import orjson
from aiohttp import web

from modelpool import _logs
from modelpool.config import ServerSettings

__all__ = [
    "HEADER",
    "MODEL",
    "Gate",
    "JsonLines",
    "access_line",
    "adopt_body_id",
    "id_given",
    "new_id",
    "sampled",
    "setup",
    "tracked",
    "worker_logging",
]

HEADER = "X-Request-ID"
ACCESS = logging.getLogger("modelpool.access")
console = logging.getLogger("modelpool.server")
_FIELD = "request_id"  # the access log's name for it
# the request's storage keys (typed keys where aiohttp has them: plain strings warn there)
_RequestKey: Any = getattr(web, "RequestKey", None)
_KEY: Any = _RequestKey("request_id", str) if _RequestKey else "request_id"
_GIVEN: Any = _RequestKey("id_given", bool) if _RequestKey else "id_given"
#: the model a request went to, for the access log (a model's own infer path has no {model})
MODEL: Any = _RequestKey("model", str) if _RequestKey else "model"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Gate(Protocol):
    """What a route is behind (``_auth``): ``enter`` lets a request in (raising the error
    that refuses it), returning None or, when it must look something up, an awaitable that
    does; ``leave`` is told how the request ended (its status)."""

    def enter(self, request: web.Request) -> Awaitable[None] | None: ...

    def leave(self, request: web.Request, status: int) -> None: ...


def setup(settings: ServerSettings, stream: IO[str]) -> IO[str]:
    """Configure this process's logging from ``settings``; returns where the server's console
    output (banner, progress) should go: ``stream``, or with ``log_format: json`` an adapter
    that turns each line into a JSON log record, so that every line is JSON."""
    _logs.configure(settings.log_level, settings.log_format, stream)
    # on or off by access_log alone: --log-level warning does not silence it
    ACCESS.setLevel(logging.INFO)
    if settings.log_format == "json":
        return JsonLines(stream)  # type: ignore[return-value]
    return stream


def worker_logging(settings: ServerSettings, model: str) -> dict[str, Any]:
    """``Pool`` keyword arguments that set up a served model's workers' logging like ours."""
    return {
        "initializer": _logs.configure_worker,
        "initargs": (settings.log_level, settings.log_format, model),
    }


class JsonLines:
    """A text stream whose lines become log records (the console output, in JSON mode).
    One ``write`` of several lines (a traceback) is one record."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        if self.pending.endswith("\n"):
            message, self.pending = self.pending.strip(), ""
            if message:
                level = logging.ERROR if message.lower().startswith("error") else logging.INFO
                console.log(level, "%s", message)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False  # no live progress line: every line is a record

    def fileno(self) -> int:
        return self.stream.fileno()


#: Generated request ids: 20 random hex digits drawn once per process (unique across
#: servers and restarts), then a 12-digit counter. Drawing 16 random bytes per request
#: (uuid4) cost more than the rest of the request-id handling together.
_ID_PREFIX = os.urandom(10).hex()
_ID_COUNTER = itertools.count(1)


def new_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"


def id_given(request: web.Request) -> bool:
    """Whether the client named the request (its ``X-Request-ID`` header)."""
    return bool(request.get(_GIVEN))


def adopt_body_id(request: web.Request, body_id: str | None) -> str:
    """An inference body's ``id`` becomes the request id when no header gave one (and it is
    usable in a header and a log line); returns the request id."""
    rid: str = request[_KEY]
    if body_id is not None and not request.get(_GIVEN) and _logs.usable_request_id(body_id):
        request[_KEY] = rid = body_id
        _logs.REQUEST_ID.set(rid)
    return rid


def tracked(
    handler: Handler,
    access_log: float,
    on_error: Callable[[web.Request, Exception], web.Response],
    gate: Gate | None = None,
) -> Handler:
    """``handler`` with the request id, the access log (``access_log``: the fraction of
    answers below 400 logged; 0 = off, 1 = all; every answer of 400 or above is logged unless
    it is off), behind ``gate`` (authentication) if any, and its exceptions answered by
    ``on_error`` (which re-raises what it does not answer). Each route's handler is wrapped
    once, instead of aiohttp middlewares, whose chain adds coroutine layers to every
    request."""

    async def requests(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        given = request.headers.get(HEADER)
        request[_GIVEN] = given is not None
        request[_KEY] = given if given is not None else new_id()
        token = _logs.REQUEST_ID.set(request[_KEY])
        status = 500
        response: web.StreamResponse | None = None
        try:
            if given is not None and not _logs.usable_request_id(given):
                request[_KEY] = new_id()
                _logs.REQUEST_ID.set(request[_KEY])
                response = _bad_id(given)
            else:
                try:
                    if gate is not None and (pending := gate.enter(request)) is not None:
                        await pending
                    response = await handler(request)
                except Exception as exc:
                    response = on_error(request, exc)
            status = response.status
            if not response.prepared:
                response.headers[HEADER] = request[_KEY]
            return response
        except web.HTTPException as exc:  # a redirect (on_error answers the errors)
            status = exc.status
            exc.headers[HEADER] = request[_KEY]
            raise
        except BaseException:
            status = 499  # the client went away (cancelled), or a bug the caller logs
            raise
        finally:
            if gate is not None:
                gate.leave(request, status)
            if sampled(access_log, status):
                _access(request, status, response, started)
            _logs.REQUEST_ID.reset(token)

    return requests


def _bad_id(given: str) -> web.Response:
    shown = given if len(given) <= 40 else given[:40] + "..."
    message = (
        f"{HEADER} {shown!r} is not usable as a request id: use 1 to 128 visible ASCII "
        "characters without spaces (a UUID, a trace id), or send none and the server makes one"
    )
    return web.Response(
        body=orjson.dumps({"error": message}), status=400, content_type="application/json"
    )


def _access(
    request: web.Request, status: int, response: web.StreamResponse | None, started: float
) -> None:
    size = 0
    if isinstance(response, web.Response):
        size = response.content_length or 0
    version = f"HTTP/{request.version.major}.{request.version.minor}"
    model = request.get(MODEL) or request.match_info.get("model")
    # (the path as sent, percent-encoded: no line breaks can be forged)
    access_line(
        request.remote, request.method, request.raw_path, version, status, size, started,
        request[_KEY], model,
    )  # fmt: skip


def access_line(
    remote: str | None,
    method: str,
    path: str,
    version: str,
    status: int,
    size: int,
    started: float,
    request_id: str,
    model: str | None,
    **extra: Any,
) -> None:
    """One access log line (and its JSON fields): HTTP requests and gRPC calls alike."""
    ms = (time.perf_counter() - started) * 1000
    fields: dict[str, Any] = {
        "remote": remote,
        "method": method,
        "path": path,
        "status": status,
        "bytes": size,
        "duration_ms": round(ms, 3),
        _FIELD: request_id,
        **extra,
    }
    if model is not None:
        fields["model"] = model
    ACCESS.info(
        '%s "%s %s %s" %d %d %.1fms',
        remote,
        method,
        path,
        version,
        status,
        size,
        ms,
        extra={"fields": fields},
    )


def sampled(access_log: float, status: int) -> bool:
    """Whether an answer with ``status`` goes to the access log (``access_log``: off, on, or
    the fraction of answers below 400 logged; every one of 400 or above is, unless off)."""
    return access_log > 0 and (status >= 400 or access_log >= 1 or random.random() < access_log)
