"""The Open Inference Protocol over gRPC: ``GRPCInferenceService`` beside HTTP.

Served when ``server.grpc_port`` (``--grpc-port``) is set, by ``grpcio``'s asyncio server on
the HTTP server's own event loop, over the same pools: the same readiness, metrics, errors,
body limit and API keys (the ``authorization`` metadata, ``Bearer <key>``). ``tritonclient.grpc``
and KServe's gRPC client work unchanged.

``ModelInfer`` does what ``POST .../infer`` does: the front reads the request's model name,
version and id (``_grpc_codec.scan_header``) and hands the serialized message to a worker,
which decodes it, predicts and encodes the serialized answer (``_infer``, header length
``GRPC``); the front writes those bytes back. The client's deadline becomes the request's
timeout; a cancelled or expired call drops its queued request, as a closed HTTP connection
does.

Errors carry the REST answer's message, with the status code that says the same thing
(``CODES``). One difference: a worker that crashed running the request is ``INTERNAL`` here,
not ``UNAVAILABLE`` (HTTP 503), because gRPC clients retry ``UNAVAILABLE`` on their own
(KServe's three times), and a request that kills its worker would kill three.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from modelpool._exceptions import CodecError, WorkerCrashedError
from modelpool._grpc_codec import scan_header, stream_answer, stream_error
from modelpool._grpc_schema import SERVICE, messages
from modelpool._infer import BAD_OUTPUTS, GRPC
from modelpool._logs import REQUEST_ID, usable_request_id

from . import _errors, _logging
from ._app import Server
from ._auth import Identity
from ._errors import HTTPError
from ._inference import SHUTTING_DOWN, streams
from ._repository import read_config

# grpc-core logs to stderr itself, past ``logging``: only its errors (set before it loads)
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc

__all__ = ["CODES", "STREAM_IN_FLIGHT", "GrpcSite"]

log = logging.getLogger("modelpool.server")

#: an HTTP answer's status -> the gRPC status code that says the same thing
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
#: requests of one ModelStreamInfer stream running at once (past it the stream is not read)
STREAM_IN_FLIGHT = 64
#: the request id's metadata key (the X-Request-ID header's, in gRPC's lower case)
_REQUEST_ID = _logging.HEADER.lower()

Handler = Callable[[Any, "_Call"], Awaitable[Any]]


class _Call:
    """One RPC: its context, request id and caller."""

    __slots__ = ("code", "context", "identity", "metadata", "model", "rid", "rows")

    def __init__(self, context: Any) -> None:
        self.context = context
        self.metadata = dict(context.invocation_metadata() or ())
        self.identity: Identity | None = None
        self.model: str | None = None  # the model it named, once known
        self.code: Any = None  # the gRPC status it failed with, if it did
        self.rid = ""
        self.rows = 0


class GrpcSite:
    """The gRPC service of ``server`` on ``host:port`` (``reuse_port``: several fronts share
    the port, as their HTTP sites do)."""

    def __init__(self, server: Server, host: str, port: int, reuse_port: bool) -> None:
        self.server = server
        self.host, self.port = host, port
        settings = server.settings
        options = [
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", settings.max_body_size),
            ("grpc.max_send_message_length", -1),
        ]
        self._grpc = grpc.aio.server(options=options)
        self._grpc.add_generic_rpc_handlers((self._handlers(),))
        self.bound = 0

    async def start(self) -> int:
        """Bind and serve; the port. Raises ``OSError`` when the address cannot be had."""
        shown = f"[{self.host}]" if ":" in self.host else self.host
        try:
            self.bound = self._grpc.add_insecure_port(f"{shown}:{self.port}")
        except RuntimeError as exc:  # (grpc says only that it failed)
            raise OSError(f"cannot bind the gRPC port {shown}:{self.port}: {exc}") from None
        await self._grpc.start()
        return self.bound

    async def stop(self, grace: float) -> None:
        """Refuse new calls now; cancel those still running after ``grace`` seconds."""
        await self._grpc.stop(grace)

    # ------------------------------------------------------------------ the service

    def _handlers(self) -> Any:
        m = messages()
        unary_rpcs: list[tuple[str, Handler, Any, Any]] = [
            ("ServerLive", self.server_live, m.ServerLiveRequest, m.ServerLiveResponse),
            ("ServerReady", self.server_ready, m.ServerReadyRequest, m.ServerReadyResponse),
            ("ModelReady", self.model_ready, m.ModelReadyRequest, m.ModelReadyResponse),
            (
                "ServerMetadata",
                self.server_metadata,
                m.ServerMetadataRequest,
                m.ServerMetadataResponse,
            ),
            ("ModelMetadata", self.model_metadata, m.ModelMetadataRequest, m.ModelMetadataResponse),
            ("ModelConfig", self.model_config, m.ModelConfigRequest, m.ModelConfigResponse),
            (
                "RepositoryIndex",
                self.repository_index,
                m.RepositoryIndexRequest,
                m.RepositoryIndexResponse,
            ),
            (
                "RepositoryModelLoad",
                self.repository_load,
                m.RepositoryModelLoadRequest,
                m.RepositoryModelLoadResponse,
            ),
            (
                "RepositoryModelUnload",
                self.repository_unload,
                m.RepositoryModelUnloadRequest,
                m.RepositoryModelUnloadResponse,
            ),
            # bytes in, bytes out: a worker decodes and encodes (``_infer``)
            ("ModelInfer", self.model_infer, None, None),
        ]
        table = {
            name: grpc.unary_unary_rpc_method_handler(
                self._wrapped(handler, f"/{SERVICE}/{name}"),
                request_deserializer=request.FromString if request is not None else None,
                response_serializer=response.SerializeToString if response is not None else None,
            )
            for name, handler, request, response in unary_rpcs
        }
        table["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(self.model_stream_infer)
        return grpc.method_handlers_generic_handler(SERVICE, table)

    def _wrapped(self, handler: Handler, path: str) -> Callable[[Any, Any], Awaitable[Any]]:
        """``handler`` with its request id, its key's usage counted, its ``HTTPError``
        answered as the gRPC status that says the same, and its access log line."""

        async def rpc(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            call = _Call(context)
            given = call.metadata.get(_REQUEST_ID)
            if given is not None and not usable_request_id(given):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the {_REQUEST_ID} metadata must be 1 to 200 visible ASCII characters",
                )
            call.rid = given or _logging.new_id()
            token = REQUEST_ID.set(call.rid)
            status = 500
            answer: Any = None
            try:
                context.set_trailing_metadata(((_REQUEST_ID, call.rid),))
                answer = await handler(request, call)
                status = 200
                return answer
            except HTTPError as exc:
                status = exc.status
                call.code = exc.code if isinstance(exc, _Crashed) else _code(exc.status)
                await self._abort(context, exc, call.code)
            except asyncio.CancelledError:
                status = 499  # the client went away, or its deadline passed
                raise
            finally:
                self._count(call, status)
                self._access(call, path, status, answer, started)
                REQUEST_ID.reset(token)

        return rpc

    def _access(self, call: _Call, path: str, status: int, answer: Any, started: float) -> None:
        """The call's access log line, as HTTP requests have (``server.access_log``)."""
        if not _logging.sampled(self.server.settings.access_log, status):
            return
        size = (
            answer if isinstance(answer, int) else len(answer) if isinstance(answer, bytes) else 0
        )
        code = call.code or (grpc.StatusCode.OK if status == 200 else _code(status))
        peer = call.context.peer() or ""
        remote = peer.split(":", 1)[1].rsplit(":", 1)[0].strip("[]") if ":" in peer else peer
        _logging.access_line(
            remote, "POST", path, "gRPC", status, size, started, call.rid, call.model,
            grpc_status=code.name,
        )  # fmt: skip

    def _count(self, call: _Call, status: int) -> None:
        """The call's API key's usage (when authentication is on)."""
        auth = self.server.auth
        who = call.identity
        if auth is not None and who is not None and who.key is not None:
            auth.keyring.count(who.key, status >= 400, call.rows)

    @staticmethod
    async def _abort(context: Any, exc: HTTPError, code: Any) -> None:
        metadata = [(_REQUEST_ID, REQUEST_ID.get() or "")]
        if exc.retry_after is not None:
            metadata.append(("retry-after", str(exc.retry_after)))
        context.set_trailing_metadata(tuple(metadata))
        await context.abort(code, str(exc))

    async def _allow(self, call: _Call, model: str | None) -> None:
        """The caller may use ``model`` (None: read the server's index and metadata), when
        authentication is on."""
        call.model = model
        auth = self.server.auth
        if auth is None:
            return
        header = call.metadata.get("authorization")
        if header is not None:
            call.identity = await auth.identify_key(header)
        if model is None:
            if call.identity is None:
                raise _no_key()
        else:
            try:
                auth.may_use(call.identity, model)
            except HTTPError as exc:
                if exc.status == 401:
                    raise _no_key() from None
                raise
        if call.identity is not None and call.identity.key is not None:
            auth.admit(call.identity.key)

    # ------------------------------------------------------------------ health and metadata

    async def server_live(self, request: Any, call: _Call) -> Any:
        return messages().ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, call: _Call) -> Any:
        return messages().ServerReadyResponse(ready=not self.server.not_ready())

    async def model_ready(self, request: Any, call: _Call) -> Any:
        served = self.server.model_named(request.name, request.version or None)
        await self._allow(call, served.name)
        return messages().ModelReadyResponse(ready=not self.server.version_not_ready(served))

    async def server_metadata(self, request: Any, call: _Call) -> Any:
        await self._allow(call, None)
        return messages().ServerMetadataResponse(**self.server.metadata())

    async def model_metadata(self, request: Any, call: _Call) -> Any:
        served = self.server.model_named(request.name, request.version or None)
        await self._allow(call, served.name)
        return messages().ModelMetadataResponse(**self.server.metadata_of(served))

    async def model_config(self, request: Any, call: _Call) -> Any:
        from google.protobuf import json_format

        served = self.server.model_named(request.name, request.version or None)
        await self._allow(call, served.name)
        m = messages()
        config = json_format.ParseDict(served.triton_config(), m.ModelConfig())
        return m.ModelConfigResponse(config=config)

    async def repository_index(self, request: Any, call: _Call) -> Any:
        await self._allow(call, None)
        m = messages()
        entries = self.server.index()
        if request.ready:
            entries = [e for e in entries if e["state"] == "READY"]
        return m.RepositoryIndexResponse(models=entries)

    async def repository_load(self, request: Any, call: _Call) -> Any:
        """Triton's ``RepositoryModelLoad`` (``_repository``): the parameter ``config`` (a
        string of JSON) is the model's settings."""
        await self._admin(call)
        given = read_config(_string(request, "config"), request.model_name)
        default = _string(request, "default_version")
        await self.server.repository.load_model(request.model_name, given, default)
        return messages().RepositoryModelLoadResponse()

    async def repository_unload(self, request: Any, call: _Call) -> Any:
        """``RepositoryModelUnload``; the parameter ``version`` unloads that version alone."""
        await self._admin(call)
        version = _string(request, "version")
        await self.server.repository.unload_model(request.model_name, version)
        return messages().RepositoryModelUnloadResponse()

    async def _admin(self, call: _Call) -> None:
        """Only an admin's key may change the models (when authentication is on)."""
        await self._allow(call, None)
        if self.server.auth is not None and not (call.identity and call.identity.admin):
            raise HTTPError(403, "only an admin may do this")

    # ------------------------------------------------------------------ inference

    async def model_infer(self, body: bytes, call: _Call) -> bytes:
        async with contextlib.aclosing(self._answers(body, call, streamed=False)) as answers:
            async for answer in answers:
                return answer
        raise AssertionError("unreachable: a request is answered or fails")

    async def _answers(
        self, body: bytes, call: _Call, *, streamed: bool
    ) -> AsyncGenerator[bytes, None]:
        """The answers to one request: ``ModelInfer``'s one ``ModelInferResponse``; in a
        stream (``streamed``), ``ModelStreamInferResponse``s: one for a model that answers
        once, one per piece for a model that streams (``_inference.streams``), each as it
        comes. Raises ``HTTPError`` (after the pieces sent, for a failure mid-stream)."""
        server = self.server
        started_at = time.perf_counter()
        try:
            name, version, body_id = scan_header(body)
        except CodecError as exc:
            raise HTTPError(400, str(exc)) from None
        served = server.model_named(name, version or None)
        await self._allow(call, served.name)
        code = 500
        server.in_flight += 1
        try:
            if not server.accepting:
                raise HTTPError(503, SHUTTING_DOWN, retry_after=0)
            adopt = _REQUEST_ID not in call.metadata
            if adopt and body_id and usable_request_id(body_id):
                call.rid = body_id
                REQUEST_ID.set(body_id)
            timeout = call.context.time_remaining()
            pool = served.pool
            if streamed and streams(served):
                try:
                    stream = pool.start_stream_infer(
                        body, GRPC, version=served.version, request_id=call.rid, adopt_id=False,
                        timeout=timeout,
                    )  # fmt: skip
                except Exception as exc:  # (a full queue, a pool shut down: as for ModelInfer)
                    raise self._failed(served, exc, call, None) from None
                with stream:  # (leaving early, the client gone included, stops the model)
                    while True:
                        try:
                            piece = await stream.__anext__()
                        except StopAsyncIteration:
                            break
                        except Exception as exc:
                            raise self._failed(served, exc, call, stream.worker_pid) from None
                        served.last_ok = time.monotonic()
                        call.rows = call.rows or piece[4]
                        self._check(served, piece, call, stream.worker_pid)
                        yield bytes(piece[1])
            else:
                started = None
                try:
                    started = pool.start_infer(
                        body, GRPC, version=served.version, request_id=call.rid, adopt_id=False,
                        timeout=timeout,
                    )  # fmt: skip
                    answer = await started.wait()
                except Exception as exc:
                    pid = started.worker_pid if started is not None else None
                    raise self._failed(served, exc, call, pid) from None
                served.last_ok = time.monotonic()  # a worker answered
                call.rows = answer[4]
                self._check(served, answer, call, started.worker_pid)
                code = 200  # (before the yield: ModelInfer closes this at its answer)
                yield stream_answer(bytes(answer[1])) if streamed else bytes(answer[1])
            code = 200
        except HTTPError as exc:
            code = exc.status
            raise
        except (asyncio.CancelledError, GeneratorExit):
            if code != 200:  # (a ModelInfer answered is closed here: not the client gone)
                code = 499
            raise
        finally:
            server.finished(served, code, started_at)

    def _failed(self, served: Any, exc: Exception, call: _Call, pid: int | None) -> HTTPError:
        retry = self.server.settings.retry_after
        error = _errors.predict_failed(served.name, exc, call.rid, pid, retry)
        return _Crashed(error) if isinstance(exc, WorkerCrashedError) else error

    @staticmethod
    def _check(served: Any, answer: Any, call: _Call, pid: int | None) -> None:
        """A worker's ``Answer`` that is not a 200 as the error it stands for."""
        if answer[0] == BAD_OUTPUTS:
            raise _errors.bad_outputs(served.name, answer[1], call.rid, pid)
        if answer[0] != 200:
            raise HTTPError(answer[0], answer[1])

    # ------------------------------------------------------------------ streams

    async def model_stream_infer(self, requests: Any, context: Any) -> AsyncIterator[bytes]:
        """``ModelStreamInfer``: the requests of a stream run concurrently (at most
        ``STREAM_IN_FLIGHT`` at a time: past that the stream is not read, and HTTP/2's flow
        control holds the client back). A request to a model that answers once is answered
        once, marked ``triton_final_response``; a request to a model that streams (as Triton's
        decoupled models) is answered once per piece, as each comes, marked not final, then,
        when the request's parameter ``triton_enable_empty_final_response`` is true, by an
        empty final answer. A request that fails (before or between its pieces) is answered
        by an error message; the stream goes on. At most ``STREAM_IN_FLIGHT`` answers wait
        for the client: past that the pieces wait in the workers (a slow reader pauses the
        models). The client closing its side ends the stream once every request is
        answered; cancelling it (or its deadline) drops the requests still queued and stops
        the models' generators."""
        answers: asyncio.Queue[bytes | None] = asyncio.Queue()
        room = asyncio.Semaphore(STREAM_IN_FLIGHT)  # answers that may wait for the client
        slots = asyncio.Semaphore(STREAM_IN_FLIGHT)
        running: set[asyncio.Task[None]] = set()

        async def one(body: bytes) -> None:
            try:
                async with contextlib.aclosing(self._stream_one(body, context)) as messages:
                    async for message in messages:
                        await room.acquire()
                        answers.put_nowait(message)
            finally:
                slots.release()

        async def read() -> None:
            try:
                async for body in requests:
                    await slots.acquire()
                    task = asyncio.ensure_future(one(body))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.wait(list(running))
            finally:
                answers.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (answer := await answers.get()) is not None:
                room.release()
                yield answer
            await reader  # (its errors, if any, end the call)
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def _stream_one(self, body: bytes, context: Any) -> AsyncGenerator[bytes, None]:
        """One request of a stream: its answers, or its error, as stream messages."""
        started = time.perf_counter()
        call = _Call(context)
        call.rid = _logging.new_id()
        token = REQUEST_ID.set(call.rid)
        status = 500
        size = 0
        try:
            async with contextlib.aclosing(self._answers(body, call, streamed=True)) as answers:
                async for answer in answers:
                    size += len(answer)
                    yield answer
            status = 200
        except HTTPError as exc:
            status = exc.status
            try:
                name, _, body_id = scan_header(body)
            except CodecError:
                name, body_id = "", ""
            yield stream_error(str(exc), name, body_id or call.rid)
        finally:
            self._count(call, status)
            self._access(call, f"/{SERVICE}/ModelStreamInfer", status, size, started)
            REQUEST_ID.reset(token)


def _code(status: int) -> Any:
    """The gRPC status code of an HTTP status (``CODES``; UNKNOWN for one it lacks)."""
    return CODES.get(status, grpc.StatusCode.UNKNOWN)


def _no_key() -> HTTPError:
    return HTTPError(
        401,
        "this server needs an API key: send the metadata 'authorization: Bearer <key>' (an "
        "admin creates one with `modelpool keys create --user NAME`)",
    )


class _Crashed(HTTPError):
    """A worker crash: HTTP's 503, but gRPC's ``INTERNAL`` (module docstring)."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, error: HTTPError) -> None:
        super().__init__(error.status, str(error), retry_after=error.retry_after)


def _string(request: Any, key: str) -> str | None:
    """A repository request's string parameter ``key`` (an integer one as text), or None."""
    parameter = request.parameters.get(key)
    if parameter is None:
        return None
    kind = parameter.WhichOneof("parameter_choice")
    return str(getattr(parameter, kind)) if kind in ("string_param", "int64_param") else None
