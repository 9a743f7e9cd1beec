"""The infer fast path: a small HTTP/1.1 reader for the one request the server sees most.

aiohttp's web layer costs about 65 us of CPU per request on a 2-core VM (request and response
objects, the router, the protocol's task machinery), two thirds of a bare aiohttp handler's
whole request. Every connection therefore starts here. A request this module recognises in
full, ``POST`` with ``Content-Length`` to one model's own infer path (``/v2/models/M/infer`` or
``/v2/models/M/versions/V/infer``), is read here and handed to the same handler aiohttp would
call (``Server``'s, through ``_logging.tracked``: request ids, access log, errors, metrics),
and its answer written here.

Anything else (another path or method, chunked or compressed bodies, ``Expect``, HTTP/1.0,
an upgrade, a header this reader does not accept, a body over the limit) hands the connection
to aiohttp for good, from the first byte of that request: no byte is read by two parsers, so
the two cannot disagree about where a request ends. aiohttp then answers it (with its own
limits and errors) and everything after it on that connection.

Per connection, requests are answered one at a time, in order (HTTP/1.1 pipelining). A
client that goes away cancels its request, as with aiohttp's ``handler_cancellation``. A
connection idle for ``KEEPALIVE`` seconds is closed.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from aiohttp import HttpVersion11, web
from aiohttp.payload import BytesPayload
from multidict import CIMultiDict

from modelpool import __version__

from ._logging import Handler

__all__ = ["FastPaths", "FastSite"]

log = logging.getLogger("modelpool.server")

#: seconds a connection may sit between requests (aiohttp's default)
KEEPALIVE = 75.0
#: a header line as RFC 9110 has it: a token, a colon, a value of visible characters, blanks
#: and obs-text; a head with any other line goes to aiohttp. Checked piecewise (the regexes
#: cost 0.3 us a line): a name seen before is looked up, and a value is matched only when
#: ``str.isprintable`` (true for nearly every value) says no.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VALUE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*")
#: header names seen (name -> lower case), up to ``_NAMES_KEPT`` of them
_names: dict[str, str] = {}
_NAMES_KEPT = 256
#: the end of a request head written with a bare line feed somewhere in its last line break
_BARE_END = re.compile(rb"\n\r?\n")
#: headers whose presence means the request is not the simple kind (aiohttp reads it)
_NOT_SIMPLE = frozenset({"transfer-encoding", "expect", "upgrade"})
#: the headers the parser looks at (any other is only stored)
_READ = frozenset({"content-length", "host", "content-encoding", "connection", *_NOT_SIMPLE})
#: bodies at least this big are read into their own buffer (no copy of the whole at the end)
_OWN_BUFFER = 64 * 1024
_REASONS = {s.value: s.phrase for s in http.HTTPStatus}
_SERVER = f"modelpool/{__version__}"


class FastPaths:
    """What the fast path serves: exact request targets -> handler, and the connections it
    holds (closed at shutdown)."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        aiohttp: Callable[[], asyncio.Protocol],
        max_body_size: int,
        max_header_size: int,
    ) -> None:
        self.handlers = dict(handlers)
        self.aiohttp = aiohttp  # makes aiohttp's protocol, for the connections handed over
        self.max_body_size = max_body_size
        self.max_line = max_header_size  # a request line or header line (aiohttp's limits)
        self.max_head = max_header_size * 2  # all of them: more goes to aiohttp (its limits)
        self.connections: set[_Connection] = set()
        self.closing = False
        self._date = ""
        self._date_second = -1

    def __call__(self) -> asyncio.Protocol:
        return _Connection(self)

    def date(self) -> str:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = email.utils.formatdate(now, usegmt=True)
        return self._date

    def close_idle(self) -> None:
        """Shutting down: close connections between requests; the others close after their
        answer."""
        self.closing = True
        for connection in list(self.connections):
            connection.close_if_idle()


class _Request(dict[Any, Any]):
    """What the handlers read of an aiohttp request, for one read here. (A dict, as aiohttp's
    request is a mapping for per-request storage.)"""

    method = "POST"
    version = HttpVersion11
    match_info: Mapping[str, str] = {}
    content_length: int

    def __init__(
        self, raw_path: str, headers: CIMultiDict[str], body: bytes | bytearray, remote: str | None
    ) -> None:
        super().__init__()
        self.raw_path = self.path = raw_path
        self.headers = headers
        self.body = body
        self.remote = remote
        self.content_length = len(body)

    async def read(self) -> bytes | bytearray:
        return self.body


class _Connection(asyncio.Protocol):
    def __init__(self, paths: FastPaths) -> None:
        self.paths = paths
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.buf = bytearray()
        self.big: bytearray | None = None  # a large body being read into its own buffer
        self.big_have = 0
        self.head: tuple[Handler, str, CIMultiDict[str], bool, int] | None = None
        self.task: asyncio.Task[None] | None = None
        self.write_paused = False
        self.read_paused = False
        self.last_active = time.monotonic()
        self._keepalive: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ asyncio's calls

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.loop = asyncio.get_running_loop()  # (asking for it per request costs a getpid)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        self.paths.connections.add(self)
        self._keepalive = self.loop.call_later(KEEPALIVE, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.paths.connections.discard(self)
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self.task is not None:
            self.task.cancel()  # the client went away: its request goes with it
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        big = self.big
        if big is not None:
            n = min(len(big) - self.big_have, len(data))
            big[self.big_have : self.big_have + n] = data[:n]
            self.big_have += n
            if n < len(data):  # the start of the next request
                self.buf += data[n:]
        else:
            self.buf += data
        if self.task is None and not self.write_paused:
            self._advance()
        elif len(self.buf) > self.paths.max_head and not self.read_paused:
            assert self.transport is not None
            self.transport.pause_reading()  # a pipelined flood waits for the answers
            self.read_paused = True

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.task is None and self.transport is not None:
            self._advance()

    # ------------------------------------------------------------------ requests

    def _advance(self) -> None:
        """Start the next request when it is all here; hand the connection over when it is not
        one of ours."""
        if self.read_paused and self.transport is not None:
            self.transport.resume_reading()
            self.read_paused = False
        if self.head is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                # a head ended by bare line feeds is aiohttp's to judge (else it would wait)
                if len(self.buf) > self.paths.max_head or _BARE_END.search(self.buf):
                    self._hand_over()
                return
            if end > self.paths.max_head:
                self._hand_over()
                return
            head = self._parse(bytes(self.buf[:end]))
            if head is None:
                self._hand_over()
                return
            del self.buf[: end + 4]
            self.head = head
            length = head[4]
            if length >= _OWN_BUFFER:
                self.big = bytearray(length)
                self.big_have = n = min(length, len(self.buf))
                self.big[:n] = self.buf[:n]
                del self.buf[:n]
        handler, path, headers, close, length = self.head
        if self.big is not None:
            if self.big_have < length:
                return
            body: bytes | bytearray = self.big
            self.big = None
        elif len(self.buf) < length:
            return
        else:
            body = bytes(self.buf[:length])
            del self.buf[:length]
        self.head = None
        request = _Request(path, headers, body, self.remote)
        self.task = self.loop.create_task(self._serve(handler, request, close))

    def _parse(self, raw: bytes) -> tuple[Handler, str, CIMultiDict[str], bool, int] | None:
        """The request head, when it is a simple POST to one of our paths; else None."""
        head = raw.decode("latin-1")  # (one decode, not one per name and value)
        lines = head.split("\r\n")
        max_line = self.paths.max_line
        if len(head) > max_line and max(map(len, lines)) > max_line:
            return None  # aiohttp enforces server.max_header_size (431)
        method, _, rest = lines[0].partition(" ")
        target, _, version = rest.partition(" ")
        handler = self.paths.handlers.get(target)
        if method != "POST" or version != "HTTP/1.1" or handler is None:
            return None
        pairs = []
        length = -1
        hosts = 0
        close = False
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                return None  # obs-fold, or not a header line
            lower = _names.get(name)
            if lower is None:
                if _TOKEN.fullmatch(name) is None:
                    return None  # a space before the colon, a separator in the name...
                lower = name.lower()
                if len(_names) < _NAMES_KEPT:
                    _names[name] = lower
            if not value.isprintable() and _VALUE.fullmatch(value) is None:
                return None  # control characters
            value = value.strip(" \t")
            pairs.append((name, value))
            if lower not in _READ:
                continue
            if lower == "content-length":
                if length >= 0 or not (value.isascii() and value.isdigit()):
                    return None
                length = int(value)
            elif lower == "host":
                hosts += 1
            elif lower in _NOT_SIMPLE:
                return None
            elif lower == "content-encoding":
                if value.lower() != "identity":
                    return None  # aiohttp's path decompresses, within its limit
            elif lower == "connection":
                tokens = {t.strip().lower() for t in value.split(",")}
                if "upgrade" in tokens:
                    return None
                close = "close" in tokens
        if length < 0 or length > self.paths.max_body_size or hosts != 1:
            # no length or no Host (aiohttp answers 400), or over the limit (its 413, unread)
            return None
        return handler, target, CIMultiDict(pairs), close, length

    async def _serve(self, handler: Handler, request: _Request, close: bool) -> None:
        try:
            response = await handler(cast(web.Request, request))
        except asyncio.CancelledError:
            return  # the client went away (the handler logged it)
        except Exception:  # the handler answers its errors: this is a bug
            log.exception("bug: the fast path could not answer %s", request.raw_path)
            if self.transport is not None:
                self.transport.close()
            return
        finally:
            self.task = None
        body: Any = cast(web.Response, response).body
        if isinstance(body, BytesPayload):  # (aiohttp wraps a memoryview)
            body = await body.as_bytes()
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the client went away meanwhile
        if not isinstance(body, (bytes, bytearray, memoryview)):  # never, from our handlers
            log.error("bug: the fast path cannot write a %s body", type(body).__name__)
            transport.close()
            return
        close = close or self.paths.closing
        status = response.status
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
        for name, value in response.headers.items():
            if name.lower() not in ("content-length", "connection", "date", "server"):
                lines.append(f"{name}: {value}")
        size = body.nbytes if isinstance(body, memoryview) else len(body)
        lines.append(f"Content-Length: {size}")
        lines.append(f"Date: {self.paths.date()}")
        lines.append(f"Server: {_SERVER}")
        if close:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if size < _OWN_BUFFER:
            transport.write(head + body)
        else:
            transport.writelines([head, body])
        if close:
            transport.close()
        elif not self.write_paused:
            self._advance()

    # ------------------------------------------------------------------ the rest

    def _hand_over(self) -> None:
        """From the request at the start of the buffer on, the connection is aiohttp's."""
        transport = self.transport
        assert transport is not None
        assert self.task is None
        self.paths.connections.discard(self)
        if self._keepalive is not None:
            self._keepalive.cancel()
        protocol = self.paths.aiohttp()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.read_paused:
            transport.resume_reading()
        data, self.buf = bytes(self.buf), bytearray()
        if data:
            protocol.data_received(data)

    def close_if_idle(self) -> None:
        if self.task is None and self.transport is not None:
            self.transport.close()

    def _check_idle(self) -> None:
        if self.transport is None:
            return
        idle = time.monotonic() - self.last_active
        if self.task is None and idle >= KEEPALIVE:
            self.transport.close()
            return
        delay = KEEPALIVE - idle if self.task is None else KEEPALIVE
        self._keepalive = self.loop.call_later(max(delay, 1.0), self._check_idle)


class FastSite(web.BaseSite):
    """aiohttp's ``TCPSite``, with every connection starting on the fast path."""

    def __init__(
        self,
        runner: web.BaseRunner,
        paths: Callable[[Callable[[], asyncio.Protocol]], FastPaths],
        host: str,
        port: int,
        *,
        backlog: int,
        reuse_port: bool,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._make_paths = paths
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self.paths: FastPaths | None = None

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        aiohttp = self._runner.server
        assert aiohttp is not None
        self.paths = self._make_paths(aiohttp)
        self._server = await asyncio.get_running_loop().create_server(
            self.paths,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
            reuse_port=self._reuse_port or None,
        )
