"""The HTTP inference routes: ``/infer`` (the Open Inference Protocol, JSON or binary),
Triton's ``/generate`` and ``/generate_stream``.

The front does no tensor work: a request's body bytes go to a worker, which decodes,
predicts and encodes (``modelpool._infer``). ``generate_stream`` answers as Server-Sent
Events: for a model whose ``predict`` is a generator, one event per item it yields, each
sent as it comes (the pool's credit keeps the worker at most a few pieces ahead of this
connection, so a slow reader pauses the model instead of filling memory); for another model,
one event. A failure once events have gone out (a worker crash, the timeout, the model
raising) is a last event ``event: error`` with ``data: {"error": "...", "status": N}`` (the
message and status the same failure gets as a JSON answer), never a silent truncation; the
client going away closes the model's generator (its ``finally`` runs).
"""

from __future__ import annotations

import asyncio
import gzip
import inspect
import time
import zlib
from collections.abc import Callable
from typing import Any, Protocol

import orjson
from aiohttp import web

from modelpool import _compression
from modelpool._exceptions import BodyTooLarge, CodecError
from modelpool._infer import BAD_OUTPUTS, GENERATE
from modelpool._started import StartedPredict

from . import _auth, _errors, _logging
from ._errors import HTTPError
from ._served import ServedModel

__all__ = ["JSON", "SHUTTING_DOWN", "Front", "Inference", "streams"]

JSON = "application/json"
SHUTTING_DOWN = "the server is shutting down; send the request to another instance"
#: the two forms of Triton's generate extension
GENERATE_ONE, GENERATE_STREAM = "generate", "generate_stream"
#: bodies at least this big are decompressed, decoded and compressed in a thread
OFF_LOOP_SIZE = 256 * 1024


def streams(served: ServedModel) -> bool:
    """Whether a streaming route sends ``served``'s requests as streams: always, except to
    a pool that batches a model whose ``predict`` is not a generator (a stream is not
    batched; such a model answers once anyway, and a ``predict`` that returns a generator
    all the same is refused by the worker with a message)."""
    if served.settings.max_batch_size <= 1:
        return True
    predict = getattr(served.pool.model_class, "predict", None)
    return inspect.isgeneratorfunction(predict) or inspect.isasyncgenfunction(predict)


class Front(Protocol):
    """What the handlers need of the server (``_app.Server``)."""

    settings: Any
    in_flight: int
    accepting: bool

    def model_of(self, request: web.Request) -> ServedModel: ...
    def model_named(self, name: str, version: str | None) -> ServedModel: ...
    def over_limit(self, request: web.Request) -> bool: ...
    def too_large(self, length: int | None) -> str: ...
    def finished(self, served: ServedModel, code: int, started_at: float) -> None: ...


class Inference:
    """The inference handlers of ``server``."""

    def __init__(self, server: Front) -> None:
        self.server = server
        self.settings = server.settings

    async def infer(self, request: web.Request) -> web.StreamResponse:
        return await self.run(request, self.server.model_of(request))

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """Triton's generate extension (``_generate``): flat JSON in, flat JSON out."""
        return await self.run(request, self.server.model_of(request), GENERATE_ONE)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        """The same, answered as Server-Sent Events (module docstring)."""
        return await self.run(request, self.server.model_of(request), GENERATE_STREAM)

    def route(self, name: str, version: str | None) -> _logging.Handler:
        """The handler of one model's own infer path (a dict lookup for the model now
        served under that name: a reload replaces it; no extra coroutine)."""
        return lambda request: self.run(request, self.server.model_named(name, version))

    async def run(
        self, request: web.Request, served: ServedModel, generate: str | None = None
    ) -> web.StreamResponse:
        """The body's bytes go to a worker, which decodes, predicts and encodes (``_infer``;
        with batching, several requests' bytes at once): no tensor work in this process."""
        server = self.server
        started_at = time.perf_counter()
        request[_logging.MODEL] = served.name
        code = 500
        server.in_flight += 1
        try:
            if not server.accepting:
                raise HTTPError(503, SHUTTING_DOWN, retry_after=0)
            if server.over_limit(request):
                raise HTTPError(413, server.too_large(request.content_length))
            body = await request.read()
            encoding = request.headers.get("Content-Encoding")
            if encoding and encoding.lower() != "identity":
                body = await self._decompress(body, encoding)
            try:
                header_length = (
                    _header_length(request.headers.get("Inference-Header-Content-Length"))
                    if generate is None
                    else GENERATE
                )
            except CodecError as exc:
                raise HTTPError(400, str(exc)) from None
            rid = _logging.adopt_body_id(request, None)
            if generate == GENERATE_STREAM and streams(served):
                response = await self._stream(request, served, body, rid)
                code = request.get(_CODE, 200)
                return response
            started: StartedPredict | None = None
            try:
                started = served.pool.start_infer(
                    body,
                    header_length,
                    version=served.version,
                    request_id=rid,
                    adopt_id=not _logging.id_given(request),
                )
                answer = await started.wait()
            except Exception as exc:
                pid = started.worker_pid if started is not None else None
                raise self._failed(served, exc, rid, pid) from None
            _, data, json_length, body_id, rows = answer
            served.last_ok = time.monotonic()  # a worker answered
            request[_auth.ROWS] = rows
            rid = _logging.adopt_body_id(request, body_id)
            self._check(served, answer, rid, started.worker_pid)
            if generate == GENERATE_STREAM:
                code = 200
                events = await _events(request, rid)
                await events.write(_event(data))
                await events.write_eof()
                return events
            if len(data) < self.settings.compress_min_size:
                response = _response(data, json_length)
            else:
                response = await self._compressed(request, data, json_length)
            code = response.status
            return response
        except (HTTPError, web.HTTPException) as exc:
            code = exc.status
            raise
        except asyncio.CancelledError:
            code = 499  # the client went away (nginx's convention)
            raise
        finally:
            server.finished(served, code, started_at)

    async def _stream(
        self, request: web.Request, served: ServedModel, body: bytes, rid: str
    ) -> web.StreamResponse:
        """A streamed ``generate_stream``: an error before the first piece is an ordinary
        JSON error answer; after it, a last error event (module docstring). The status the
        metrics count goes in ``request[_CODE]``."""
        try:
            stream = served.pool.start_stream_infer(
                body,
                GENERATE,
                version=served.version,
                request_id=rid,
                adopt_id=not _logging.id_given(request),
            )
        except Exception as exc:  # (a full queue, a pool shut down: as for /infer)
            raise self._failed(served, exc, rid, None) from None
        with stream:  # (leaving early, the client gone included, closes the generator)
            first = await self._piece(served, stream, rid)
            if first is None:  # (the worker always answers something)
                raise HTTPError(500, f"model {served.name!r} answered nothing")
            if isinstance(first, HTTPError):
                raise first
            request[_auth.ROWS] = first[4]
            rid = _logging.adopt_body_id(request, first[3])
            response = await _events(request, rid)
            try:
                await response.write(_event(first[1]))
                while (piece := await self._piece(served, stream, rid)) is not None:
                    if isinstance(piece, HTTPError):
                        request[_CODE] = piece.status
                        text = orjson.dumps({"error": str(piece), "status": piece.status})
                        await response.write(b"event: error\ndata: " + text + b"\n\n")
                        break
                    await response.write(_event(piece[1]))
                await response.write_eof()
            except ConnectionResetError:  # the client went away: the model is stopped
                request[_CODE] = 499
            return response

    async def _piece(self, served: ServedModel, stream: Any, rid: str | None) -> Any:
        """The stream's next piece (an ``Answer`` of 200), None at its end, or the
        ``HTTPError`` that ends it (the pool's error, or a worker's non-200 answer)."""
        try:
            piece = await stream.__anext__()
        except StopAsyncIteration:
            return None
        except Exception as exc:
            return self._failed(served, exc, rid, stream.worker_pid)
        served.last_ok = time.monotonic()
        try:
            self._check(served, piece, rid, stream.worker_pid)
        except HTTPError as exc:
            return exc
        return piece

    def _failed(self, served: ServedModel, exc: Exception, rid: str | None, pid: Any) -> HTTPError:
        return _errors.predict_failed(served.name, exc, rid, pid, self.settings.retry_after)

    @staticmethod
    def _check(served: ServedModel, answer: Any, rid: str | None, pid: int | None) -> None:
        """A worker's ``Answer`` that is not a 200 as the error it stands for."""
        status, data = answer[0], answer[1]
        if status == BAD_OUTPUTS:
            raise _errors.bad_outputs(served.name, data, rid, pid)
        if status != 200:
            raise HTTPError(status, data)

    async def _decompress(self, body: bytes, encoding: str) -> bytes:
        try:
            limit = self.settings.max_decompressed_size
            # (off the loop by what it may grow to, not by its size)
            data: bytes = await _off_loop(limit, _compression.decompress, body, encoding, limit)
        except BodyTooLarge as exc:
            raise HTTPError(413, str(exc)) from None
        except CodecError as exc:
            raise HTTPError(400, str(exc)) from None
        return data

    @staticmethod
    async def _compressed(
        request: web.Request, payload: Any, json_length: int | None
    ) -> web.Response:
        """The answer, compressed when the client accepts it."""
        accepted = request.headers.get("Accept-Encoding", "").lower()
        for coding in ("gzip", "deflate"):
            if coding in accepted:
                fn = _gzip if coding == "gzip" else zlib.compress
                compressed: bytes = await _off_loop(len(payload), fn, payload)
                response = _response(compressed, json_length)
                response.headers["Content-Encoding"] = coding
                return response
        return _response(payload, json_length)


#: where a streamed answer leaves the status the metrics count (an error event's)
_CODE = "modelpool.stream_code"


def _response(payload: Any, json_length: int | None) -> web.Response:
    if json_length is None:
        return web.Response(body=payload, headers={"Content-Type": JSON})
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(json_length),
    }
    return web.Response(body=payload, headers=headers)


async def _events(request: web.Request, rid: str | None) -> web.StreamResponse:
    """A prepared Server-Sent Events answer (chunked; each event is flushed as written)."""
    headers = {
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # (nginx: pass each event on at once)
    }
    if rid:
        headers[_logging.HEADER] = rid
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    return response


def _event(data: Any) -> bytes:
    return b"data: " + bytes(data) + b"\n\n"


async def _off_loop(size: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` in a thread for big payloads (keeps the event loop answering)."""
    if size < OFF_LOOP_SIZE:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _header_length(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        length = -1
    if length < 0:
        raise CodecError(
            f"Inference-Header-Content-Length must be a non-negative integer, got {value!r}"
        )
    return length


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=5)
