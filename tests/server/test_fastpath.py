"""The infer fast path (``_fastpath``): what it reads itself, what it hands to aiohttp, and that
a connection handed over keeps working. A fake handler stands for the server's (which the
end-to-end tests in test_app.py exercise through this path); aiohttp's own low-level server
stands for the application."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from _waiting import until
from modelpool.server import _fastpath

PATH = "/v2/models/m/infer"


class Calls:
    """The fake handler: answers with what it read; ``gate`` holds answers back."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.cancelled = 0

    async def handler(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            {"body": bytes(body), "headers": dict(request.headers), "path": request.path}
        )
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        answer = orjson.dumps({"n": len(self.requests), "size": len(body)})
        if body.startswith(b"big"):
            answer = bytes(2 << 20)  # 2 MiB
        return web.Response(body=answer, headers={"Content-Type": "application/json"})


async def _aiohttp_handler(request: web.BaseRequest) -> web.StreamResponse:
    body = await request.read()
    return web.Response(text=f"aiohttp {request.method} {request.path_qs} {len(body)}")


@contextlib.asynccontextmanager
async def _serving(max_body: int = 1 << 20) -> AsyncIterator[tuple[int, Calls, Any]]:
    calls = Calls()
    aiohttp = web.Server(_aiohttp_handler)
    paths = _fastpath.FastPaths({PATH: calls.handler}, aiohttp, max_body, 8190)
    server = await asyncio.get_running_loop().create_server(paths, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, calls, paths
    finally:
        server.close()
        paths.close_idle()
        await aiohttp.shutdown(5)
        await server.wait_closed()


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 30)
    return status, headers, body


def _post(body: bytes, path: str = PATH, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    async def main() -> None:
        async with _serving() as (port, calls, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"".join(_post(b"x" * i) for i in (1, 2, 3)))  # one write, 3 requests
            for i in (1, 2, 3):
                status, headers, body = await _read_answer(reader)
                assert status == 200
                assert headers["server"].startswith("modelpool/")  # answered here
                assert orjson.loads(body) == {"n": i, "size": i}
            assert [r["body"] for r in calls.requests] == [b"x", b"xx", b"xxx"]
            writer.close()

    asyncio.run(main())


def test_header_values_are_read_as_aiohttp_reads_them() -> None:
    """Blanks around a value are not part of it; a tab inside and obs-text (bytes 0x80-0xff,
    read as latin-1) are; an empty value is one."""
    odd = b"X-Odd:\t a\tb \xe9\xa0z \t\r\nX-Empty:\r\n\r\n"
    request = b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"

    async def main() -> None:
        async with _serving() as (port, calls, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(2):  # (the second time, the names are known)
                writer.write(request + odd + b"abc")
                status, headers, _body = await _read_answer(reader)
                assert status == 200
                assert headers["server"].startswith("modelpool/")  # read here, not by aiohttp
            writer.close()
        assert len(calls.requests) == 2
        for seen in calls.requests:
            headers = {name.lower(): value for name, value in seen["headers"].items()}
            assert headers["x-odd"] == "a\tb \xe9\xa0z"
            assert headers["x-empty"] == ""
            assert headers["content-length"] == "3"
            assert seen["body"] == b"abc"

    asyncio.run(main())


def test_a_body_arriving_in_pieces_and_a_large_one(monkeypatch: pytest.MonkeyPatch) -> None:
    received = [0]
    data_received = _fastpath._Connection.data_received

    def counting(self: Any, data: bytes) -> None:
        received[0] += len(data)
        data_received(self, data)

    monkeypatch.setattr(_fastpath._Connection, "data_received", counting)

    async def main() -> None:
        async with _serving(max_body=8 << 20) as (port, calls, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            big = bytes(range(256)) * (3 << 12)  # 3 MiB, read into its own buffer
            data = _post(big) + _post(b"small")
            for i in range(0, len(data), 100_003):  # pieces cut anywhere, head included
                writer.write(data[i : i + 100_003])
                sent = min(i + 100_003, len(data))
                # each piece reaches the server before the next is sent
                await until(lambda s=sent: received[0] >= s, 30, "the piece to arrive")
            assert orjson.loads((await _read_answer(reader))[2])["size"] == len(big)
            assert orjson.loads((await _read_answer(reader))[2])["size"] == 5
            assert calls.requests[0]["body"] == big
            writer.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("first", "why"),
    [
        (b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n", "another path and method"),
        (_post(b"abc", path=PATH + "?q=1"), "a query string"),
        (
            b"POST "
            + PATH.encode()
            + b" HTTP/1.0\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nabc",
            "HTTP/1.0",
        ),
        (
            b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n",
            "a chunked body",
        ),
        (_post(b"abc", extra="Expect: 100-continue\r\n"), "Expect"),
        (
            _post(gzip.compress(b"abc", mtime=0), extra="Content-Encoding: gzip\r\n"),
            "a compressed body",
        ),
        (_post(b"abc", extra="X-Odd : 1\r\n"), "a space before the colon"),
        (_post(b"abc", extra="X-Odd: a\x01b\r\n"), "a control character in a value"),
        (_post(b"abc", extra="X-Odd: a\x7fb\r\n"), "DEL in a value"),
        (_post(b"abc", extra="X(Odd): 1\r\n"), "a separator in a name"),
        (_post(b"abc", extra="X-Odd\r\n"), "a line without a colon"),
        (
            b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: \xb3\r\n\r\n",
            "a superscript digit as the length",
        ),
        (_post(b"abc", extra="Content-Length: 3\r\n"), "two Content-Lengths"),
        (_post(b"a" * 2000), "a body over the limit"),
        (b"POST " + PATH.encode() + b" HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", "no Host"),
        (
            b"POST " + PATH.encode() + b" HTTP/1.1\nHost: x\nContent-Length: 3\n\nabc",
            "bare line feeds",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_what_it_does_not_read_goes_to_aiohttp_and_the_connection_keeps_working(
    first: bytes, why: str
) -> None:
    async def main() -> None:
        async with _serving(max_body=1000) as (port, calls, paths):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_post(b"one"))  # the fast path first
            status, headers, _ = await _read_answer(reader)
            assert status == 200
            assert headers["server"].startswith("modelpool/")
            writer.write(first + _post(b"two"))
            status, headers, body = await _read_answer(reader)
            assert not headers["server"].startswith("modelpool/"), why  # aiohttp answered
            if status == 200:
                assert body.startswith(b"aiohttp "), (why, body)
                status, headers, body = await _read_answer(reader)  # the next one: aiohttp's
                assert (status, body) == (200, b"aiohttp POST " + PATH.encode() + b" 3"), why
            else:  # a malformed request: aiohttp's 400 (or 413, 417), and it closes
                assert status in (400, 413, 417), (why, status, body)
                assert await asyncio.wait_for(reader.read(), 30) == b"", why
            assert len(calls.requests) == 1  # the fast path read the first request only
            assert not paths.connections  # it no longer holds the connection
            writer.close()

    asyncio.run(main())


def test_a_client_that_goes_away_cancels_its_request() -> None:
    async def main() -> None:
        async with _serving() as (port, calls, paths):
            calls.gate.clear()
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_post(b"abc"))
            await writer.drain()
            await until(lambda: calls.requests, 30, "the request to be read")
            writer.close()
            await until(lambda: calls.cancelled, 30, "the handler to be cancelled")
            await until(lambda: not paths.connections, 30, "the connection to be forgotten")
            await writer.wait_closed()

    asyncio.run(main())


def test_connection_close_and_shutdown_close_connections() -> None:
    async def main() -> None:
        async with _serving() as (port, calls, paths):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_post(b"abc", extra="Connection: close\r\n"))
            status, headers, _ = await _read_answer(reader)
            assert headers["connection"] == "close"
            assert await asyncio.wait_for(reader.read(), 30) == b""  # closed after the answer
            # shutting down: an idle connection is closed, a busy one after its answer
            idle_reader, idle = await asyncio.open_connection("127.0.0.1", port)
            busy_reader, busy = await asyncio.open_connection("127.0.0.1", port)
            idle.write(_post(b"1"))
            await _read_answer(idle_reader)
            calls.gate.clear()
            busy.write(_post(b"2"))
            await until(lambda: len(calls.requests) == 3, 30, "the busy request to be read")
            paths.close_idle()
            assert await asyncio.wait_for(idle_reader.read(), 30) == b""
            calls.gate.set()
            status, headers, _ = await _read_answer(busy_reader)
            assert (status, headers["connection"]) == (200, "close")
            assert await asyncio.wait_for(busy_reader.read(), 30) == b""
            for w in (writer, idle, busy):
                w.close()
                await w.wait_closed()

    asyncio.run(main())


def test_a_client_that_does_not_read_its_answers_holds_the_rest_back() -> None:
    async def main() -> None:
        async with _serving() as (port, calls, paths):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"".join(_post(b"big%d" % i) for i in range(8)))  # 16 MiB of answers
            # an answer fills the kernel's buffers and the transport's: it stops reading
            await until(
                lambda: any(c.write_paused for c in paths.connections), 30, "writing to pause"
            )
            assert len(calls.requests) < 8  # (this loop runs the server: nothing moves now)
            for _ in range(8):
                status, _, body = await _read_answer(reader)
                assert (status, len(body)) == (200, 2 << 20)
            assert len(calls.requests) == 8
            writer.close()
            await writer.wait_closed()

    asyncio.run(main())


def test_an_idle_connection_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fastpath, "KEEPALIVE", 0.2)

    async def main() -> None:
        async with _serving() as (port, _calls, paths):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_post(b"abc"))
            assert (await _read_answer(reader))[0] == 200
            assert await asyncio.wait_for(reader.read(), 30) == b""  # closed by the server
            assert not paths.connections
            writer.close()
            await writer.wait_closed()

    asyncio.run(main())


@pytest.mark.parametrize("size", [9_000, 20_000], ids=["a line", "the head"])
def test_headers_over_the_limit_go_to_aiohttp_which_refuses_them(size: int) -> None:
    """The limit: 8190 bytes per line; the fast path reads heads up to twice that."""

    async def main() -> None:
        async with _serving() as (port, calls, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_post(b"abc", extra="X-Big: " + "a" * size + "\r\n"))
            status, headers, _ = await _read_answer(reader)
            assert status in (400, 431)
            assert not headers["server"].startswith("modelpool/")
            assert not calls.requests
            writer.close()
            await writer.wait_closed()

    asyncio.run(main())
