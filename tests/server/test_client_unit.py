"""``modelpool.client.Client`` against a tiny in-process aiohttp server built on the codec."""

from __future__ import annotations

import asyncio
import gzip
import json
import pickle
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from _deps import need_module
from modelpool import InputValidationError, ModelpoolError
from modelpool._compression import decompress
from modelpool._protocol import CodecError, decode_infer_request, encode_infer_response
from modelpool.client import Client, ServerError, ServerTimeoutError

web = need_module("aiohttp.web")

METADATA = {
    "double": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}]},
    "pair": {
        "inputs": [
            {"name": "a", "datatype": "INT64", "shape": [-1]},
            {"name": "b", "datatype": "INT64", "shape": [-1]},
        ]
    },
}
ERRORS = {"fail": 400, "busy": 503, "gateway": 504}


class FakeServer:
    """An aiohttp server on its own loop in a thread; counts connections and metadata calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.peers: set[Any] = set()
        self.metadata_calls = 0
        self.gzip_responses = False
        self.url = ""

    def __enter__(self) -> FakeServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v2/health/live", self._ok)
        app.router.add_get("/v2/health/ready", self._ok)
        app.router.add_get("/v2", self._server_metadata)
        app.router.add_get("/v2/models/{model}", self._metadata)
        app.router.add_get("/v2/models/{model}/ready", self._model_ready)
        app.router.add_post("/v2/models/{model}/infer", self._infer)
        app.router.add_post("/v2/models/{model}/versions/{version}/infer", self._infer)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    def _seen(self, request: Any) -> None:
        self.peers.add(request.transport.get_extra_info("peername"))

    async def _ok(self, request: Any) -> Any:
        self._seen(request)
        return web.Response()

    async def _server_metadata(self, request: Any) -> Any:
        return web.json_response({"name": "fake", "extensions": ["binary_tensor_data"]})

    async def _metadata(self, request: Any) -> Any:
        self.metadata_calls += 1
        model = request.match_info["model"]
        if model not in METADATA:
            return web.json_response({"error": f"unknown model {model!r}"}, status=404)
        return web.json_response({"name": model, **METADATA[model]})

    async def _model_ready(self, request: Any) -> Any:
        return web.Response(status=200 if request.match_info["model"] in METADATA else 404)

    async def _infer(self, request: Any) -> Any:
        self._seen(request)
        model = request.match_info["model"]
        if model in ERRORS:
            body = _error_body(f"{model} says no")
            return web.Response(body=body, status=ERRORS[model], content_type="application/json")
        if model == "sleepy":
            await asyncio.sleep(3)
        if model == "garbage":
            return web.Response(body=b"not json")
        if model == "html":
            return web.Response(body=b"<h1>oops</h1>", status=502)
        raw = decompress(await request.read(), request.headers.get("Content-Encoding"), 1 << 26)
        try:
            infer = decode_infer_request(
                raw, request.headers.get("Inference-Header-Content-Length")
            )
        except CodecError as exc:
            return web.Response(body=_error_body(str(exc)), status=400)
        if model == "pair":
            outputs = {"sum": infer.inputs["a"] + infer.inputs["b"]}
        else:
            x = next(iter(infer.inputs.values()))
            outputs = {"y": x * 2, "words": np.array([b"a", b"bc"], dtype=object)}
        body, length = encode_infer_response(
            model, request.match_info.get("version"), infer.id, outputs, infer
        )
        headers = {} if length is None else {"Inference-Header-Content-Length": str(length)}
        if self.gzip_responses:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)


def _error_body(message: str) -> bytes:
    """An error answer, as the server writes it: ``{"error": message}``."""
    return json.dumps({"error": message}).encode()


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    with FakeServer() as fake:
        yield fake


@pytest.fixture
def client(server: FakeServer) -> Iterator[Client]:
    with Client(server.url) as c:
        yield c


X = np.arange(6, dtype=np.float32).reshape(2, 3)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_sync_infer_returns_writable_arrays(server: FakeServer, binary: bool) -> None:
    with Client(server.url, binary=binary) as client:
        out = client.infer("double", {"x": X}, request_id="r")
    np.testing.assert_array_equal(out["y"], X * 2)
    assert out["y"].dtype == np.float32
    assert out["words"].tolist() == [b"a", b"bc"]
    for array in out.values():
        assert array.flags.writeable
        array[...] = array  # really writable


def test_outputs_version_and_plain_lists(client: Client) -> None:
    out = client.infer("double", {"x": [1.5, 2.5]}, outputs=["y"], version="3")
    assert list(out) == ["y"]
    np.testing.assert_array_equal(out["y"], [3.0, 5.0])
    out = client.infer("pair", {"a": np.array([1, 2]), "b": np.array([10, 20])})
    np.testing.assert_array_equal(out["sum"], [11, 22])


def test_bare_array_fetches_metadata_once(server: FakeServer, client: Client) -> None:
    before = server.metadata_calls
    for _ in range(3):
        out = client.infer("double", X)
        np.testing.assert_array_equal(out["y"], X * 2)
    assert server.metadata_calls == before + 1
    with pytest.raises(InputValidationError, match="takes 2 inputs \\(a, b\\)"):
        client.infer("pair", np.zeros(2))
    with pytest.raises(ServerError, match="unknown model 'nope'") as info:
        client.infer("nope", X)
    assert info.value.status == 404


def test_keep_alive_reuses_one_connection(server: FakeServer, client: Client) -> None:
    server.peers.clear()
    for _ in range(5):
        client.infer("double", {"x": X})
        assert client.live()
    assert len(server.peers) == 1


def test_reconnects_after_the_server_drops_an_idle_connection(
    server: FakeServer, client: Client
) -> None:
    client.infer("double", {"x": X})
    assert client._conn is not None
    assert client._conn.sock is not None
    client._conn.sock.shutdown(socket.SHUT_RDWR)  # as if the server closed it while idle
    np.testing.assert_array_equal(client.infer("double", {"x": X})["y"], X * 2)


@pytest.mark.parametrize(("model", "status"), list(ERRORS.items()))
def test_error_statuses(client: Client, model: str, status: int) -> None:
    with pytest.raises(ServerError) as info:
        client.infer(model, {"x": X})
    error = info.value
    assert isinstance(error, ModelpoolError)
    assert error.status == status
    assert error.message == f"{model} says no"
    assert f"HTTP {status}" in str(error)
    assert error.url.endswith(f"/v2/models/{model}/infer")
    assert isinstance(error, TimeoutError) == (status == 504)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert (again.status, str(again)) == (status, str(error))
    # the connection stays usable after an error answer
    assert client.infer("double", {"x": X})["y"].shape == (2, 3)


def test_non_json_error_and_malformed_answer(client: Client) -> None:
    with pytest.raises(ServerError, match="<h1>oops</h1>") as info:
        client.infer("html", {"x": X})
    assert info.value.status == 502
    with pytest.raises(ServerError, match="inference answer is malformed"):
        client.infer("garbage", {"x": X})


def test_client_timeout(server: FakeServer) -> None:
    with (
        Client(server.url, timeout=0.3) as client,
        pytest.raises(ServerTimeoutError, match=r"no answer within 0\.3 s") as info,
    ):
        client.infer("sleepy", {"x": X})
    assert info.value.status == 0


def test_unreachable_server() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    with Client(f"127.0.0.1:{port}") as client, pytest.raises(ServerError) as info:
        client.live()
    assert info.value.status == 0
    assert "could not reach http://127.0.0.1" in str(info.value)
    assert "check that the server is running" in str(info.value)

    async def run() -> None:
        async with Client(f"http://127.0.0.1:{port}") as client:
            with pytest.raises(ServerError, match="could not reach"):
                await client.alive()

    asyncio.run(run())


def test_health_and_metadata(client: Client) -> None:
    assert client.live()
    assert client.ready()
    assert client.ready("double")
    assert not client.ready("nope")
    assert client.metadata()["name"] == "fake"
    assert client.metadata("pair")["inputs"][1]["name"] == "b"


def test_compressed_answers(server: FakeServer, client: Client) -> None:
    server.gzip_responses = True
    try:
        np.testing.assert_array_equal(client.infer("double", {"x": X})["y"], X * 2)
    finally:
        server.gzip_responses = False


def test_bad_urls() -> None:
    with pytest.raises(ValueError, match="must look like http://host:port"):
        Client("ftp://example.com")
    assert Client("localhost:8000/prefix/").url == "http://localhost:8000/prefix"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_async_client(server: FakeServer, binary: bool) -> None:
    async def run() -> None:
        async with Client(server.url, binary=binary) as client:
            assert await client.alive()
            assert await client.aready()
            assert await client.aready("double")
            assert (await client.ametadata())["name"] == "fake"
            results = await asyncio.gather(*(client.ainfer("double", X * i) for i in range(8)))
            for i, out in enumerate(results):
                np.testing.assert_array_equal(out["y"], X * i * 2)
                assert out["y"].flags.writeable
            out = await client.ainfer("pair", {"a": [1], "b": [2]}, outputs=["sum"])
            assert out["sum"].tolist() == [3]
            with pytest.raises(ServerTimeoutError) as info:
                await client.ainfer("gateway", {"x": X})
            assert (info.value.status, info.value.message) == (504, "gateway says no")
            with pytest.raises(InputValidationError):
                await client.ainfer("pair", X)

    asyncio.run(run())


def test_async_timeout_and_loop_guard(server: FakeServer) -> None:
    client = Client(server.url, timeout=0.3)

    async def first() -> None:
        with pytest.raises(ServerTimeoutError, match=r"no answer within 0\.3 s"):
            await client.ainfer("sleepy", {"x": X})

    async def second() -> None:
        with pytest.raises(RuntimeError, match="belongs to another event loop"):
            await client.alive()

    async def third() -> None:
        assert await client.alive()  # a fresh session on this loop
        await client.aclose()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(first())
        asyncio.run(second())
        loop.run_until_complete(client.aclose())
        asyncio.run(third())
    finally:
        loop.close()
