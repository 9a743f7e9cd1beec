"""A small client for modelpool's server, and for any Open Inference Protocol (KServe v2) server.

``Client`` speaks the REST protocol with Triton's binary tensor extension and returns writable
NumPy arrays. Its blocking methods use the standard library's ``http.client`` over one
keep-alive connection; its ``a``-prefixed coroutines use aiohttp (imported on first use)::

    with Client("http://localhost:8000") as client:
        outputs = client.infer("resnet", {"image": batch})

    async with Client("http://localhost:8000") as client:
        outputs = await client.ainfer("resnet", batch)  # a bare array: the model's only input

The blocking methods serialize on a lock (one request at a time per ``Client``); for
concurrency use the coroutines, or one ``Client`` per thread. The coroutines must all run on
one event loop.

A non-200 answer raises ``ServerError`` with the HTTP ``status`` and the server's ``message``;
504 raises ``ServerTimeoutError`` (also a ``TimeoutError``), as does a request that runs out of
the client's ``timeout`` (status 0; what it bounds is said in ``Client``'s docstring). An
unreachable server raises ``ServerError`` with status 0. Both are ``ModelpoolError``s.

Importing this module loads neither ``modelpool.server`` nor aiohttp (until a coroutine is
first awaited) nor pydantic: the codec is ``modelpool._protocol`` (and ``_compression``).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import threading
from collections.abc import AsyncIterator, Generator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias
from urllib.parse import quote, urlsplit

import numpy as np

from modelpool._compression import decompress
from modelpool._exceptions import (
    CodecError,
    InputValidationError,
    ServerError,
    ServerTimeoutError,
)
from modelpool._generate import Events, generate_body, read_piece
from modelpool._protocol import decode_infer_response, encode_infer_request

if TYPE_CHECKING:
    import aiohttp

__all__ = ["Client", "ServerError", "ServerTimeoutError"]

_HEADER_LENGTH = "Inference-Header-Content-Length"
_MAX_BODY = 1 << 62  # responses are trusted as far as size goes
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
_STREAM_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}


class _Call(NamedTuple):
    """One HTTP request to make (the path is relative to the Client's url)."""

    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] | None = None


class _Answer(NamedTuple):
    status: int
    body: bytes | bytearray
    header_length: str | None
    content_encoding: str | None


#: An exchange with the server, written once for both modes: it yields the requests to make,
#: is sent their answers, and returns its result. ``Client._run`` carries the requests over the
#: blocking connection, ``Client._arun`` over the async session.
_Exchange: TypeAlias = Generator[_Call, _Answer, dict[str, np.ndarray]]


def _error(answer: _Answer, url: str) -> ServerError:
    text = bytes(answer.body).decode("utf-8", "replace")
    try:
        doc = json.loads(text)
        message = doc["error"] if isinstance(doc, dict) and "error" in doc else text[:2000]
    except ValueError:
        message = text[:2000] or http.client.responses.get(answer.status, "error")
    cls = ServerTimeoutError if answer.status == 504 else ServerError
    return cls(answer.status, str(message), url=url)


def _json(answer: _Answer, url: str) -> dict[str, Any]:
    if answer.status != 200:
        raise _error(answer, url)
    try:
        doc = json.loads(answer.body)
    except ValueError as exc:
        raise ServerError(200, f"the answer is not JSON ({exc})", url=url) from None
    if not isinstance(doc, dict):
        raise ServerError(200, "the answer is not a JSON object", url=url)
    return doc


class Client:
    """A client for an Open Inference Protocol server at ``url`` (``http://host:port[/prefix]``).

    ``binary`` sends inputs and asks for outputs as binary tensors (fast, exact);
    ``binary=False`` uses plain JSON.

    ``timeout`` (seconds) applies to each HTTP request on its own, and means slightly different
    things in the two modes:

    * the blocking methods: it is the socket timeout of ``http.client``. Connecting, and then
      every single send and receive, may each wait up to ``timeout``; so the wait for the
      server's answer (the model's run) is bounded by it, but not the request as a whole, which
      may last longer while bytes keep flowing (a large body over a slow link).
    * the coroutines: it is aiohttp's ``total`` timeout. The whole request, from connecting to
      the answer's last byte, must fit in ``timeout``.

    Running out raises ``ServerTimeoutError`` with status 0. An ``infer`` with a bare array
    first asks for the model's metadata (once per model), a request with its own ``timeout``.
    The value is read when the connection (or the async session) is opened: set it here.

    ``api_key`` is sent as ``Authorization: Bearer <key>`` with every request, for a server
    with authentication on (docs/security.md); by default it is read from the
    ``MODELPOOL_API_KEY`` environment variable, if set. A refused key raises ``ServerError``
    with status 401 (or 403 for a model the key may not use).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 60.0,
        binary: bool = True,
        api_key: str | None = None,
    ) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"Client url must look like http://host:port, got {url!r}")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self.timeout = timeout
        self.binary = binary
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._conn_used = False
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._input_names: dict[tuple[str, str | None], str] = {}
        key = api_key if api_key is not None else os.environ.get("MODELPOOL_API_KEY")
        # (the key is never part of repr() or an error message)
        self._auth = {"Authorization": f"Bearer {key.strip()}"} if key else {}

    def __repr__(self) -> str:
        auth = ", api_key=..." if self._auth else ""
        return f"Client({self.url!r}, timeout={self.timeout}, binary={self.binary}{auth})"

    # -- shared -----------------------------------------------------------------------------

    def _model_path(self, model: str, version: str | None) -> str:
        path = f"/v2/models/{quote(model, safe='')}"
        return path if version is None else f"{path}/versions/{quote(version, safe='')}"

    def _infer_request(
        self,
        inputs: Mapping[str, Any],
        outputs: Sequence[str] | None,
        request_id: str | None,
    ) -> tuple[bytes, dict[str, str]]:
        arrays = {name: np.asarray(value) for name, value in inputs.items()}
        body, header_length = encode_infer_request(
            arrays, outputs=outputs, binary=self.binary, request_id=request_id
        )
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if header_length is not None:
            headers["Content-Type"] = "application/octet-stream"
            headers[_HEADER_LENGTH] = str(header_length)
        return body, headers

    def _infer_result(self, answer: _Answer, url: str) -> dict[str, np.ndarray]:
        if answer.status != 200:
            raise _error(answer, url)
        try:
            body = decompress(answer.body, answer.content_encoding, _MAX_BODY)
            return decode_infer_response(body, answer.header_length)
        except CodecError as exc:
            raise ServerError(200, f"the inference answer is malformed: {exc}", url=url) from exc

    def _infer(
        self,
        model: str,
        inputs: Mapping[str, Any] | np.ndarray,
        outputs: Sequence[str] | None,
        version: str | None,
        request_id: str | None,
    ) -> _Exchange:
        """``infer`` as an exchange: the model's metadata first for a bare array (unless its
        input's name is known), then the inference request."""
        if not isinstance(inputs, Mapping):
            name = self._input_names.get((model, version))
            if name is None:
                path = self._model_path(model, version)
                doc = _json((yield _Call("GET", path)), self.url + path)
                name = self._name_from_metadata(model, version, doc)
            inputs = {name: inputs}
        body, headers = self._infer_request(inputs, outputs, request_id)
        path = self._model_path(model, version) + "/infer"
        answer = yield _Call("POST", path, body, headers)
        return self._infer_result(answer, self.url + path)

    def _stream_request(
        self,
        model: str,
        inputs: Mapping[str, Any],
        parameters: Mapping[str, Any] | None,
        version: str | None,
        request_id: str | None,
    ) -> tuple[str, str, bytes]:
        """A ``generate_stream`` request's path, URL and body."""
        path = self._model_path(model, version) + "/generate_stream"
        return path, self.url + path, generate_body(inputs, parameters, request_id)

    def _name_from_metadata(self, model: str, version: str | None, doc: dict[str, Any]) -> str:
        specs = doc.get("inputs")
        names = [s.get("name") for s in specs if isinstance(s, dict)] if specs else []
        if len(names) != 1 or not isinstance(names[0], str):
            raise InputValidationError(
                f"model {model!r} takes {len(names)} inputs ({', '.join(map(str, names))}); "
                "a bare array only works for a model with exactly one input: pass a dict of "
                "named arrays"
            )
        self._input_names[model, version] = names[0]
        return names[0]

    # -- blocking ---------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout)
            self._conn_used = False
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> _Answer:
        url = self.url + path
        with self._lock:
            attempt = 0
            while True:
                attempt += 1
                conn = self._connection()
                reused = self._conn_used
                try:
                    sent = {**self._auth, **(headers or {})}
                    conn.request(method, self._prefix + path, body=body, headers=sent)
                    response = conn.getresponse()
                    data = _read_all(response)
                except TimeoutError:
                    self._drop()
                    raise ServerTimeoutError(
                        0, f"{method} {url} got no answer within {self.timeout} s", url=url
                    ) from None
                except _STALE:
                    self._drop()
                    if reused and attempt == 1:
                        continue  # the server closed an idle keep-alive connection: reconnect
                    raise ServerError(0, f"{url} closed the connection", url=url) from None
                except (OSError, http.client.HTTPException) as exc:
                    self._drop()
                    raise ServerError(0, _unreachable(url, exc), url=url) from exc
                self._conn_used = True
                if response.will_close:
                    self._drop()
                return _Answer(
                    response.status,
                    data,
                    response.getheader(_HEADER_LENGTH),
                    response.getheader("Content-Encoding"),
                )

    def _run(self, exchange: _Exchange) -> dict[str, np.ndarray]:
        """Carry ``exchange``'s requests over the blocking connection; its result."""
        try:
            call = next(exchange)
            while True:
                call = exchange.send(self._request(*call))
        except StopIteration as done:
            result: dict[str, np.ndarray] = done.value
            return result

    def infer(
        self,
        model: str,
        inputs: Mapping[str, Any] | np.ndarray,
        *,
        outputs: Sequence[str] | None = None,
        version: str | None = None,
        request_id: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Run ``model`` on ``inputs`` (named arrays, or one bare array) and return its outputs.

        ``outputs`` names the outputs wanted (default: all). Every returned array is writable.
        Bounded by the Client's ``timeout`` (see the class docstring).
        """
        return self._run(self._infer(model, inputs, outputs, version, request_id))

    def live(self) -> bool:
        """Whether the server is live (``GET /v2/health/live`` answers 200)."""
        return self._request("GET", "/v2/health/live").status == 200

    def ready(self, model: str | None = None, *, version: str | None = None) -> bool:
        """Whether the server (or ``model``) is ready to serve."""
        path = "/v2/health/ready" if model is None else self._model_path(model, version) + "/ready"
        return self._request("GET", path).status == 200

    def metadata(self, model: str | None = None, *, version: str | None = None) -> dict[str, Any]:
        """The server's metadata, or ``model``'s (its inputs, outputs, versions, ...)."""
        path = "/v2" if model is None else self._model_path(model, version)
        return _json(self._request("GET", path), self.url + path)

    def stream(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        parameters: Mapping[str, Any] | None = None,
        version: str | None = None,
        request_id: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Run ``model`` on ``inputs`` through Triton's ``generate_stream`` extension and
        yield its answer's pieces as they come: for a model whose ``predict`` is a generator,
        one per item it yields; for another model, one. Each piece is a dict of output name ->
        its JSON value (a number, a string, or a flat list; a single element bare), as the
        extension sends it. ``inputs`` are named values (arrays, lists, strings, numbers);
        ``parameters`` go with the request.

        Each stream has its own connection; leaving the loop early (or ``close()`` on the
        iterator) closes it, which stops the model's generator on the server. A failure
        mid-stream (the model raising, its worker crashing, its timeout) raises ``ServerError``
        after the pieces before it (``ServerTimeoutError`` for a timeout). The Client's
        ``timeout`` bounds the wait for each piece, not the whole stream."""
        path, url, body = self._stream_request(model, inputs, parameters, version, request_id)
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout)
        try:
            headers = {**self._auth, **_STREAM_HEADERS}
            try:
                conn.request("POST", self._prefix + path, body=body, headers=headers)
                response = conn.getresponse()
            except TimeoutError:
                raise ServerTimeoutError(
                    0, f"{url} sent nothing within {self.timeout} s", url=url
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                raise ServerError(0, _unreachable(url, exc), url=url) from exc
            if response.status != 200:
                raise _error(_Answer(response.status, response.read(), None, None), url)
            events = Events()
            while True:
                try:
                    line = response.readline()
                except TimeoutError:
                    raise ServerTimeoutError(
                        0, f"{url} sent no piece within {self.timeout} s", url=url
                    ) from None
                except (OSError, http.client.HTTPException) as exc:
                    raise ServerError(0, f"{url} broke off the stream: {exc}", url=url) from exc
                if not line:
                    return
                event = events.feed(line)
                if event is not None:
                    yield read_piece(event, url)
        finally:
            conn.close()

    def close(self) -> None:
        """Close the blocking connection (the async session is closed by ``aclose``)."""
        with self._lock:
            self._drop()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- async ------------------------------------------------------------------------------

    async def _asession(self) -> aiohttp.ClientSession:
        """The async session of this event loop (made on first use)."""
        try:
            import aiohttp
        except ImportError:
            raise ImportError(
                "the async Client methods need aiohttp: pip install 'modelpool[server]'"
            ) from None
        loop = asyncio.get_running_loop()
        if self._session is not None and self._session_loop is not loop:
            raise RuntimeError(
                "this Client's async session belongs to another event loop; use one Client "
                "per event loop, or call aclose() on the old loop first"
            )
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout), auto_decompress=False
            )
            self._session_loop = loop
        return self._session

    async def _arequest(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> _Answer:
        import aiohttp  # (_asession said what to install, if it is missing)

        session = await self._asession()
        url = self.url + path
        headers = {"Accept-Encoding": "identity", **self._auth, **(headers or {})}
        try:
            async with session.request(method, url, data=body, headers=headers) as response:
                data = await response.read()
                return _Answer(
                    response.status,
                    data,
                    response.headers.get(_HEADER_LENGTH),
                    response.headers.get("Content-Encoding"),
                )
        except TimeoutError:
            raise ServerTimeoutError(
                0, f"{method} {url} got no answer within {self.timeout} s", url=url
            ) from None
        except aiohttp.ClientError as exc:
            raise ServerError(0, _unreachable(url, exc), url=url) from exc

    async def _arun(self, exchange: _Exchange) -> dict[str, np.ndarray]:
        """Carry ``exchange``'s requests over the async session; its result."""
        try:
            call = next(exchange)
            while True:
                call = exchange.send(await self._arequest(*call))
        except StopIteration as done:
            result: dict[str, np.ndarray] = done.value
            return result

    async def ainfer(
        self,
        model: str,
        inputs: Mapping[str, Any] | np.ndarray,
        *,
        outputs: Sequence[str] | None = None,
        version: str | None = None,
        request_id: str | None = None,
    ) -> dict[str, np.ndarray]:
        """The coroutine form of ``infer``."""
        return await self._arun(self._infer(model, inputs, outputs, version, request_id))

    async def alive(self) -> bool:
        """The coroutine form of ``live``."""
        return (await self._arequest("GET", "/v2/health/live")).status == 200

    async def aready(self, model: str | None = None, *, version: str | None = None) -> bool:
        """The coroutine form of ``ready``."""
        path = "/v2/health/ready" if model is None else self._model_path(model, version) + "/ready"
        return (await self._arequest("GET", path)).status == 200

    async def ametadata(
        self, model: str | None = None, *, version: str | None = None
    ) -> dict[str, Any]:
        """The coroutine form of ``metadata``."""
        path = "/v2" if model is None else self._model_path(model, version)
        return _json(await self._arequest("GET", path), self.url + path)

    async def astream(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        parameters: Mapping[str, Any] | None = None,
        version: str | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """The async form of ``stream`` (``async for piece in client.astream(...)``)."""
        _, url, body = self._stream_request(model, inputs, parameters, version, request_id)
        session = await self._asession()
        import aiohttp

        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeout, sock_read=self.timeout
        )
        headers = {**self._auth, **_STREAM_HEADERS}
        try:
            async with session.post(url, data=body, headers=headers, timeout=timeout) as response:
                if response.status != 200:
                    raise _error(_Answer(response.status, await response.read(), None, None), url)
                events = Events()
                async for line in response.content:
                    event = events.feed(line)
                    if event is not None:
                        yield read_piece(event, url)
        except TimeoutError:
            raise ServerTimeoutError(
                0, f"{url} sent no piece within {self.timeout} s", url=url
            ) from None
        except aiohttp.ClientError as exc:
            raise ServerError(0, f"{url}: {exc}", url=url) from exc

    async def aclose(self) -> None:
        """Close the async session and the blocking connection."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        self.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _read_all(response: http.client.HTTPResponse) -> bytes | bytearray:
    """Read the whole body; into a ``bytearray`` when its length is known (zero-copy decode)."""
    if not response.length:  # unknown (chunked) or empty; read() also ends the response
        return response.read()
    buffer = bytearray(response.length)
    view = memoryview(buffer)
    filled = 0
    while filled < len(buffer):
        count = response.readinto(view[filled:])
        if not count:
            raise http.client.IncompleteRead(bytes(view[:filled]), len(buffer) - filled)
        filled += count
    return buffer


def _unreachable(url: str, exc: BaseException) -> str:
    return (
        f"could not reach {url} ({type(exc).__name__}: {exc}); check that the server is "
        "running, and the host, port and scheme of the Client's url"
    )
