"""The front process's share of an inference: HTTP only. Without batching a worker decodes,
predicts and encodes (``_infer``), and the event loop that took the request reads the answer
(``_loopside``): no codec call and no thread hand-off in the front."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from _spies import delivering_threads
from modelpool import _protocol
from modelpool.config import Config
from modelpool.server import Server

BODY = orjson.dumps(
    {"id": "b-1", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
)


def _forbidden(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the front process ran the codec")


@contextlib.asynccontextmanager
async def _client(batch: int) -> AsyncIterator[tuple[TestClient, Server]]:
    config = Config.from_mapping(
        {
            "models": {
                "echo": {
                    "model": "_server_models:Identity",
                    "workers": 2,
                    "max_batch_size": batch,
                }
            }
        }
    )
    server = Server(config)
    for served in server.models.values():
        await asyncio.to_thread(served.pool.start)
    client = TestClient(TestServer(server.app()))
    await client.start_server()
    try:
        yield client, server
    finally:
        await client.close()
        for served in server.models.values():
            await asyncio.to_thread(served.pool.shutdown)


def test_without_batching_the_front_does_no_codec_work_and_no_thread_reads_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_protocol, "decode_infer_request", _forbidden)
    monkeypatch.setattr(_protocol, "encode_infer_response", _forbidden)

    async def main() -> None:
        async with _client(batch=1) as (client, server):
            threads = delivering_threads(server.models["echo"].pool, monkeypatch)

            async def one() -> dict[str, Any]:
                async with client.post("/v2/models/echo/infer", data=BODY) as response:
                    assert response.status == 200, await response.text()
                    assert response.headers["X-Request-ID"] == "b-1"  # the body's id, adopted
                    answer: dict[str, Any] = orjson.loads(await response.read())
                    return answer

            answers = await asyncio.gather(*(one() for _ in range(20)))
            assert all(a["outputs"][0]["data"] == [1.0, 2.0] for a in answers)
            assert all(a["id"] == "b-1" for a in answers)
            # every answer (readiness probes' too) was settled on this loop's thread
            assert len(threads) >= 20
            assert set(threads) == {threading.current_thread().name}

            bad = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1]}]}'
            async with client.post("/v2/models/echo/infer", data=bad) as response:
                assert response.status == 400  # decoded in the worker, worded as before
                assert "has 1 values but shape [1, 3] needs 3" in (await response.json())["error"]

    asyncio.run(main())


def test_with_batching_the_front_still_decodes_so_the_pool_can_merge() -> None:
    async def main() -> None:
        async with (
            _client(batch=8) as (client, _),
            client.post("/v2/models/echo/infer", data=BODY) as response,
        ):
            assert response.status == 200
            answer = orjson.loads(await response.read())
            assert answer["outputs"][0]["data"] == [1.0, 2.0]

    asyncio.run(main())


def test_a_version_that_is_not_a_plain_segment_is_served_by_the_general_route() -> None:
    config = Config.from_mapping(
        {"models": {"echo": {"model": "_server_models:Identity", "version": "β 1/{x}"}}}
    )
    server = Server(config)
    assert sorted(server.fast_handlers) == ["/v2/models/echo/infer"]
    app = server.app()  # every route registers
    assert len(app.router.routes()) > len(server.fast_handlers)
