"""The application (``server/_app``), end to end: a real ``modelpool serve`` process called
by the real clients people use (tritonclient sync and asyncio, JSON and binary; KServe's
InferenceRESTClient; ``modelpool.Client``). Errors and their statuses, limits, metrics,
readiness probes, a worker killed mid-request, overload, timeouts, clients that go away or
hang up, and thousands of tensors in one request. Starting and stopping: test_main.py."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _serving import ServerProcess, infer_body, model_status, slow_body
from _serving import request as _request

from _deps import need_installed, need_module
from _scripts import RESULT, run_script
from _tensors import ALL_TYPES
from _waiting import wait_for
from modelpool import demo


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = {
        "server": {"max_body_size": "2MB", "max_decompressed_size": "4MB"},
        "models": {
            "identity": {"model": "_server_models:Identity", "workers": 2},
            "iris": {"model": demo.MODEL},
            "buggy": {"model": "_server_models:Buggy"},
        },
    }
    with ServerProcess(config=config, tmp=tmp_path_factory.mktemp("identity")) as server:
        yield server


# ---------------------------------------------------------------- tritonclient


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_sync_all_datatypes(identity: ServerProcess, binary: bool) -> None:
    httpclient = need_module("tritonclient.http")
    client = httpclient.InferenceServerClient(identity.host_port)
    try:
        inputs, outputs = [], []
        for i, (datatype, array) in enumerate(ALL_TYPES.items()):
            item = httpclient.InferInput(f"INPUT{i}", list(array.shape), datatype)
            item.set_data_from_numpy(array, binary_data=binary)
            inputs.append(item)
            outputs.append(httpclient.InferRequestedOutput(f"OUTPUT{i}", binary_data=binary))
        result = client.infer("identity", inputs, outputs=outputs, request_id="req-7")
        assert result.get_response()["id"] == "req-7"
        for i, (datatype, array) in enumerate(ALL_TYPES.items()):
            got = result.as_numpy(f"OUTPUT{i}")
            assert result.get_output(f"OUTPUT{i}")["datatype"] == datatype
            if datatype == "BYTES" and not binary:  # JSON carries strings (as Triton does)
                array = np.vectorize(bytes.decode, otypes=[object])(array)
            np.testing.assert_array_equal(got, array, err_msg=datatype)
    finally:
        client.close()


def test_tritonclient_metadata_health_config_and_index(identity: ServerProcess) -> None:
    httpclient = need_module("tritonclient.http")
    client = httpclient.InferenceServerClient(identity.host_port)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("iris")
        assert client.is_model_ready("iris", "1")
        assert not client.is_model_ready("nope")
        meta = client.get_server_metadata()
        assert meta["name"] == "modelpool"
        assert "binary_tensor_data" in meta["extensions"]
        model = client.get_model_metadata("iris")
        assert model["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 4]}]
        config = client.get_model_config("iris")
        assert config["input"][0]["data_type"] == "TYPE_FP32"
        index = client.get_model_repository_index()
        assert {m["name"]: m["state"] for m in index}["iris"] == "READY"
        with pytest.raises(need_module("tritonclient.utils").InferenceServerException) as info:
            client.get_model_metadata("nope")
        assert "unknown model 'nope'" in str(info.value)
    finally:
        client.close()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compressed_request_and_response(
    identity: ServerProcess, algorithm: str
) -> None:
    httpclient = need_module("tritonclient.http")
    client = httpclient.InferenceServerClient(identity.host_port)
    try:
        array = np.arange(20_000, dtype=np.float32).reshape(1, -1)
        item = httpclient.InferInput("INPUT0", list(array.shape), "FP32")
        item.set_data_from_numpy(array)
        result = client.infer(
            "identity",
            [item],
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), array)
    finally:
        client.close()


def test_tritonclient_asyncio_concurrent(identity: ServerProcess) -> None:
    aio = need_module("tritonclient.http.aio")
    httpclient = need_module("tritonclient.http")

    async def main() -> None:
        client = aio.InferenceServerClient(identity.host_port)
        try:
            assert await client.is_server_ready()

            async def one(i: int) -> None:
                x = np.full((1, 4), i, np.float32)
                item = httpclient.InferInput("INPUT0", [1, 4], "FP32")
                item.set_data_from_numpy(x, binary_data=i % 2 == 0)
                result = await client.infer("identity", [item])
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)

            await asyncio.gather(*(one(i) for i in range(40)))
        finally:
            await client.close()

    asyncio.run(main())


# ---------------------------------------------------------------- KServe's client


KSERVE_REST = """
import asyncio, json, sys
import numpy as np
import kserve

async def main(url, binary):
    client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", retries=0))
    try:
        out = {"live": await client.is_server_live(url),
               "ready": await client.is_server_ready(url),
               "model_ready": await client.is_model_ready(url, "iris")}
        x = np.array([[5.1, 3.5, 1.4, 0.2], [6.9, 3.1, 5.8, 2.2]], np.float32)
        item = kserve.InferInput("INPUT0", list(x.shape), "FP32")
        item.set_data_from_numpy(x, binary_data=binary)
        request = kserve.InferRequest(model_name="iris", infer_inputs=[item])
        response = await client.infer(url, request, model_name="iris")
        out["labels"] = {o.name: o for o in response.outputs}["LABEL"].as_numpy().tolist()
    finally:
        await client.close()
    print(%(result)r + json.dumps(out))

asyncio.run(main(sys.argv[1], sys.argv[2] == "binary"))
"""


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_kserve_rest_client(identity: ServerProcess, binary: bool) -> None:
    """KServe's client, in its own interpreter: its protocol messages and tritonclient.grpc's
    clash in one process (tests/server/test_grpc.py)."""
    need_installed("kserve")
    code = KSERVE_REST % {"result": RESULT}
    out = run_script(code, identity.url, "binary" if binary else "json", timeout=120)
    assert out == {"live": True, "ready": True, "model_ready": True, "labels": [0, 2]}


# ---------------------------------------------------------------- modelpool.Client


def test_modelpool_client_returns_writable_arrays(identity: ServerProcess) -> None:
    import modelpool

    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    with modelpool.Client(identity.url) as client:
        out = client.infer("identity", {"INPUT0": x})
        assert out["OUTPUT0"].flags.writeable
        np.testing.assert_array_equal(out["OUTPUT0"], x)
        labels = client.infer("iris", x)["LABEL"]  # a bare array for a one-input model
        assert labels.shape == (3,)


# ---------------------------------------------------------------- errors


def _error(status: int, headers: dict[str, str], body: bytes) -> str:
    assert headers["Content-Type"] == "application/json", (status, headers, body)
    message = json.loads(body)["error"]
    assert isinstance(message, str)
    assert message
    return message


def test_errors_are_json_with_the_right_status(identity: ServerProcess) -> None:
    cases: list[tuple[str, bytes, dict[str, str], int, str]] = [
        ("/v2/models/nope/infer", b"{}", {}, 404, "unknown model 'nope'"),
        ("/v2/models/iris/versions/9/infer", b"{}", {}, 404, "no version '9'"),
        ("/v2/models/iris/infer", b"{not json", {}, 400, "JSON"),
        ("/v2/models/iris/infer", b"[]", {}, 400, "object"),
        (
            "/v2/models/iris/infer",
            infer_body("INPUT0", "FP32", [1, 3], [1, 2, 3]),
            {},
            400,
            "INPUT0",
        ),
        (
            "/v2/models/iris/infer",
            infer_body("WRONG", "FP32", [1, 4], [1, 2, 3, 4]),
            {},
            400,
            "WRONG",
        ),
        (
            "/v2/models/iris/infer",
            infer_body("INPUT0", "FP32", [1, 4], [1, 2, 3]),
            {},
            400,
            "INPUT0",
        ),
        (
            "/v2/models/iris/infer",
            infer_body("INPUT0", "FP32", [1, 4], [1, 2, 3, 4]),
            {"Inference-Header-Content-Length": "9999"},
            400,
            "Inference-Header-Content-Length",
        ),
        (
            "/v2/models/buggy/infer",
            infer_body("INPUT0", "FP32", [1], [1]),
            {},
            500,
            "KeyError",
        ),
        (
            "/v2/models/iris/infer",
            b"xx",
            {"Content-Encoding": "br"},
            400,
            "br",
        ),
    ]
    for path, body, headers, status, fragment in cases:
        got, answer_headers, answer = _request(identity, "POST", path, body, **headers)
        assert got == status, (path, body, got, answer)
        assert fragment in _error(got, answer_headers, answer), (fragment, answer)


def test_unknown_paths_and_methods_are_json_with_a_request_id(identity: ServerProcess) -> None:
    status, headers, body = _request(identity, "GET", "/nope/deeper")
    assert status == 404
    assert _error(status, headers, body) == "Not Found"
    assert headers["X-Request-ID"]
    # a known path with a method it does not take: 405, saying which it does
    for path in ("/v2/models/iris/infer", "/v2/models/iris/versions/1/infer", "/v2/models/x/infer"):
        status, headers, body = _request(identity, "GET", path)
        assert status == 405, (path, body)
        assert _error(status, headers, body) == "Method Not Allowed"
        assert headers["Allow"] == "POST"
        assert headers["X-Request-ID"]
    status, headers, body = _request(identity, "DELETE", "/v2/health/live")
    assert status == 405
    assert set(headers["Allow"].split(",")) == {"GET", "HEAD"}
    assert _request(identity, "HEAD", "/v2/health/live")[0] == 200
    # a model's own infer paths (exact routes) and the general ones answer alike
    body = infer_body("INPUT0", "FP32", [1, 4], [1, 2, 3, 4])
    for path in ("/v2/models/iris/infer", "/v2/models/iris/versions/1/infer"):
        status, headers, answer = _request(identity, "POST", path, body)
        assert status == 200, answer
        assert json.loads(answer)["model_name"] == "iris"


def test_body_over_the_limit_is_refused_before_it_is_read(identity: ServerProcess) -> None:
    host, port = identity.host_port.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n"
        )
        answer = sock.recv(65536).decode("latin-1")  # we sent no body: it must not wait for one
    assert answer.startswith("HTTP/1.1 413"), answer
    assert "max_body_size" in answer


def test_decompressed_size_is_limited(identity: ServerProcess) -> None:
    bomb = gzip.compress(b" " * (8 * 2**20))  # 8 MiB of spaces in a few KiB
    status, headers, body = _request(
        identity, "POST", "/v2/models/identity/infer", bomb, **{"Content-Encoding": "gzip"}
    )
    assert status == 413
    assert "decompress" in _error(status, headers, body).lower()


def test_malformed_requests_never_break_the_server(identity: ServerProcess) -> None:
    rng = np.random.default_rng(7)
    good = infer_body("INPUT0", "FP32", [1, 4], [1, 2, 3, 4])
    statuses = set()
    for i in range(300):
        body = bytearray(good)
        for _ in range(int(rng.integers(1, 6))):
            body[int(rng.integers(len(body)))] = int(rng.integers(256))
        headers = {}
        if i % 3 == 0:
            headers["Inference-Header-Content-Length"] = str(int(rng.integers(0, len(body) + 5)))
        status, answer_headers, answer = _request(
            identity, "POST", "/v2/models/iris/infer", bytes(body), **headers
        )
        statuses.add(status)
        assert status in (200, 400), (bytes(body), status, answer)
        if status != 200:
            _error(status, answer_headers, answer)
    assert 400 in statuses
    status, _, _ = _request(identity, "POST", "/v2/models/iris/infer", good)
    assert status == 200


def test_metrics_count_requests_errors_and_workers(identity: ServerProcess) -> None:
    _request(identity, "POST", "/v2/models/iris/infer", infer_body("X", "FP32", [1], [1]))
    _request(
        identity, "POST", "/v2/models/iris/infer", infer_body("INPUT0", "FP32", [1, 4], [1] * 4)
    )
    status, headers, body = _request(identity, "GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    assert 'modelpool_requests_total{model="iris",code="200"}' in text
    assert 'modelpool_request_errors_total{model="iris",code="400"}' in text
    assert 'modelpool_request_duration_seconds_bucket{model="iris",le="+Inf"}' in text
    assert 'modelpool_workers{model="identity",state="idle"} 2' in text
    assert 'modelpool_queue_depth{model="iris"} 0' in text
    assert "modelpool_worker_rss_bytes{" in text
    assert "modelpool_worker_restarts_total{" in text


# ---------------------------------------------------------------- failures, overload and timeouts


def test_worker_killed_mid_request(tmp_path: Path) -> None:
    config = {
        "server": {"ready_probe_interval": 0.2},
        "models": {"sleepy": {"model": "_server_models:Sleepy", "workers": 1}},
    }
    with ServerProcess(config=config, tmp=tmp_path) as server:
        answer: dict[str, Any] = {}

        def call() -> None:
            answer["r"] = _request(server, "POST", "/v2/models/sleepy/infer", slow_body(30))

        caller = threading.Thread(target=call)
        caller.start()
        deadline = time.monotonic() + 60
        while True:  # our request, not a quick readiness probe, is running
            (worker,) = json.loads(_request(server, "GET", "/status.json")[2])["models"][0][
                "workers"
            ]
            if worker["state"] == "busy" and worker["busy_for"] > 0.5:
                break
            assert time.monotonic() < deadline
            time.sleep(0.02)
        pid = worker["pid"]
        os.kill(pid, signal.SIGKILL)
        caller.join(60)
        status, headers, body = answer["r"]
        assert status == 503, (body, server.output)
        assert headers["Retry-After"]
        message = _error(status, headers, body)
        assert "SIGKILL" in message
        assert str(pid) in message
        # readiness dips while the only worker is replaced, then recovers
        status, _, _ = _request(server, "GET", "/v2/models/sleepy/ready")
        seen = {status}
        deadline = time.monotonic() + 60
        while status != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
            status, _, _ = _request(server, "GET", "/v2/models/sleepy/ready")
            seen.add(status)
        assert 503 in seen
        status, _, body = _request(server, "POST", "/v2/models/sleepy/infer", slow_body(0))
        assert status == 200
        assert json.loads(body)["outputs"][0]["data"] != [pid]


def test_devices_reach_each_worker(tmp_path: Path) -> None:
    config = {
        "models": {
            "env": {"model": "_server_models:Env", "workers": 2, "devices": ["cuda:1", "cpu"]}
        }
    }
    with ServerProcess(config=config, tmp=tmp_path) as server:
        seen: dict[int, str] = {}
        deadline = time.monotonic() + 20
        while len(seen) < 2:
            assert time.monotonic() < deadline
            _, _, body = _request(server, "POST", "/v2/models/env/infer", b'{"inputs": []}')
            outputs = {o["name"]: o["data"] for o in json.loads(body)["outputs"]}
            seen[outputs["INDEX"][0]] = outputs["DEVICES"][0]
    assert seen == {0: "1", 1: ""}


@pytest.fixture(scope="module")
def limited_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("limited")


@pytest.fixture(scope="module")
def limited(limited_tmp: Path) -> Iterator[ServerProcess]:
    config = {
        "server": {"ready_probe_interval": 60, "retry_after": 2},
        "models": {
            "queue1": {"model": "_server_models:Sleepy", "workers": 1, "max_queue": 1},
            "timed": {"model": "_server_models:Sleepy", "workers": 1, "timeout": 0.5},
            # a request with a negative x runs until the file "gate" exists
            "gated": {"model": "_models:Gate", "options": {"path": str(limited_tmp / "gate")}},
        },
    }
    with ServerProcess(config=config, tmp=limited_tmp) as server:
        yield server


def test_overloaded_is_503_with_retry_after(limited: ServerProcess) -> None:
    # a request first: the readiness probe (after 60 s of quiet) cannot take the queue's place
    assert _request(limited, "POST", "/v2/models/queue1/infer", slow_body(0))[0] == 200
    answers: list[tuple[int, dict[str, str], bytes]] = []

    def call(seconds: float) -> None:
        answers.append(_request(limited, "POST", "/v2/models/queue1/infer", slow_body(seconds)))

    def model() -> dict[str, Any]:
        return model_status(limited, "queue1")

    # one runs (3 s: it surely outlasts the steps below), one waits, the rest find the queue full
    callers = [threading.Thread(target=call, args=(s,)) for s in (3.0, 0.0, 0.0, 0.0)]
    callers[0].start()
    wait_for(lambda: model()["in_flight"] == 1, 60, "the first request to run")
    callers[1].start()
    wait_for(lambda: model()["queued"] == 1, 60, "the second request to queue")
    for t in callers[2:]:
        t.start()
    for t in callers:
        t.join(60)
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200, 200, 503, 503], statuses
    for status, headers, body in answers:
        if status == 503:
            assert headers["Retry-After"] == "2"
            assert "max_queue" in _error(status, headers, body)


def test_timeout_is_504_and_the_model_keeps_serving(limited: ServerProcess) -> None:
    status, headers, body = _request(limited, "POST", "/v2/models/timed/infer", slow_body(5))
    assert status == 504
    message = _error(status, headers, body)
    assert "timed out" in message
    # named once, as the URL names it: no "model 'timed': request to 'Sleepy' ..." any more
    assert message.count("'timed'") == 1, message
    assert "Sleepy" not in message
    deadline = time.monotonic() + 60
    while True:  # the stuck worker was killed and replaced
        status, _, _ = _request(limited, "POST", "/v2/models/timed/infer", slow_body(0))
        if status == 200:
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_client_that_goes_away_takes_its_queued_request_with_it(
    limited: ServerProcess, limited_tmp: Path
) -> None:
    """A request whose client hangs up while it waits in the pool's queue leaves the queue at
    once (the one worker is still held, so it cannot have started) and never runs."""

    def model() -> dict[str, Any]:
        return model_status(limited, "gated")

    def infer(x: float) -> int:
        return _request(
            limited, "POST", "/v2/models/gated/infer", infer_body("x", "FP32", [1], [x])
        )[0]

    # a request first: the readiness probe (after 60 s of quiet) cannot run in between
    assert infer(1.0) == 200
    before = int(model()["workers"][0]["served"])
    held: list[int] = []
    holder = threading.Thread(target=lambda: held.append(infer(-1.0)))  # until the gate opens
    holder.start()
    try:
        wait_for(lambda: model()["in_flight"] == 1, 60, "the first request to run")
        body = infer_body("x", "FP32", [1], [1.0])
        host, port = limited.host_port.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /v2/models/gated/infer HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json"
                + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            wait_for(lambda: model()["queued"] == 1, 60, "the request to be queued in the pool")
        wait_for(lambda: model()["queued"] == 0, 60, "the request to be dropped")
        assert model()["in_flight"] == 1  # the gate holds the worker: dropped, not run
    finally:
        (limited_tmp / "gate").touch()
        holder.join(60)
    assert held == [200]
    # one worker, a FIFO queue: had the abandoned request stayed queued, it would run first
    assert infer(1.0) == 200
    # the held one and the last one: the abandoned one never ran
    assert int(model()["workers"][0]["served"]) == before + 2


def test_modelpool_client_async(identity: ServerProcess) -> None:
    import modelpool

    async def main() -> None:
        async with modelpool.Client(identity.url) as client:
            assert await client.aready("iris")
            xs = [np.full((1, 4), i, np.float32) for i in range(10)]
            outs = await asyncio.gather(*(client.ainfer("identity", {"INPUT0": x}) for x in xs))
            for x, out in zip(xs, outs, strict=True):
                assert out["OUTPUT0"].flags.writeable
                np.testing.assert_array_equal(out["OUTPUT0"], x)
            with pytest.raises(modelpool.ServerError) as info:
                await client.ainfer("nope", {"INPUT0": xs[0]})
            assert info.value.status == 404

    asyncio.run(main())


def test_readiness_probes_do_not_kill_idle_workers_with_a_short_timeout(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    config = {  # ready means a probe answered within 3 s (three intervals)
        "server": {"ready_probe_interval": 1.0, "log_level": "debug"},
        "models": {
            "quick": {"model": "_server_models:Identity", "timeout": 0.3},
            # a request with a negative x runs until the file "gate" exists
            "busy": {"model": "_models:Gate", "options": {"path": str(gate)}},
        },
    }

    def probes(model: str) -> int:
        return server.output.count(f"readiness probe of {model!r} answered")

    with ServerProcess(config=config, tmp=tmp_path) as server:
        body = infer_body("x", "FP32", [1], [-1.0])
        caller = threading.Thread(
            target=_request, args=(server, "POST", "/v2/models/busy/infer", body)
        )
        caller.start()
        try:
            wait_for(lambda: model_status(server, "busy")["in_flight"] == 1, 60, "busy to be busy")
            # "busy" cannot answer its probes now; "quick" is ready only if its own probes go
            # on: five more answers span over 4 s, past the 3 s an older answer would count
            seen = probes("quick")
            wait_for(lambda: probes("quick") >= seen + 5, 60, "five more probes of quick")
            status, _, _ = _request(server, "GET", "/v2/models/busy/ready")
            assert status == 503  # its probes were held: the situation is the one meant
            status, _, _ = _request(server, "GET", "/v2/models/quick/ready")
            assert status == 200  # a busy model does not hold back another model's probe
        finally:
            gate.touch()
            caller.join(60)
        text = _request(server, "GET", "/metrics")[2].decode()
        assert 'modelpool_worker_exits_total{model="quick"' not in text, text


def _raw(server: ServerProcess, head: bytes) -> str:
    host, port = server.host_port.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        return sock.recv(65536).decode("latin-1")


def test_expect_100_continue_is_refused_before_the_body_when_too_big(
    identity: ServerProcess,
) -> None:
    head = (
        b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        b"\r\nExpect: 100-continue\r\nContent-Length: 50000000\r\n\r\n"
    )
    answer = _raw(identity, head)
    assert answer.startswith("HTTP/1.1 413"), answer  # not "100 Continue" first
    assert '"error"' in answer
    assert "max_body_size" in answer
    head = head.replace(b"50000000", b"2").replace(b"100-continue", b"something-else")
    answer = _raw(identity, head)
    assert answer.startswith("HTTP/1.1 417"), answer
    assert '"error"' in answer


def test_expect_100_continue_within_the_limit_is_served(identity: ServerProcess) -> None:
    body = infer_body("INPUT0", "FP32", [1, 4], [5.1, 3.5, 1.4, 0.2])
    host, port = identity.host_port.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            + f"\r\nExpect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        answer = sock.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 200"), answer


# ---------------------------------------------------------------- clients that hang up
#
# HTTP clients that hang up before their answer (a load generator stopping, timeouts, a
# closed browser tab) must never wedge the batch queue: the next live request is answered
# within the batch delay plus its service time. Reproduces what a user saw after
# ``wrk -c8 -d2s``.


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    gate = tmp_path / "open"
    config = {
        "server": {"ready_probe_interval": 600},  # no probe may wake the queue for us
        "models": {
            "gate": {
                "model": "_models:Gate",
                "workers": 2,
                "max_batch_size": 32,
                "max_batch_delay": 0.005,
                "options": {"path": str(gate)},
            }
        },
    }
    with ServerProcess(config=config, tmp=tmp_path) as server:
        yield server, gate


def _body(value: float, width: int = 3) -> bytes:
    tensor = {"name": "x", "datatype": "FP32", "shape": [1, width], "data": [value] * width}
    return json.dumps({"inputs": [tensor]}).encode()


def _post(server: ServerProcess, body: bytes) -> int:
    conn = http.client.HTTPConnection(server.host_port, timeout=60)
    try:
        conn.request("POST", "/v2/models/gate/infer", body=body)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _gauge(server: ServerProcess, name: str) -> int:
    conn = http.client.HTTPConnection(server.host_port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    match = re.search(rf'^{name}{{model="gate"}} (\d+)', text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return int(match.group(1))


def _hang_up_burst(server: ServerProcess, n: int) -> None:
    """``n`` clients send a request, wait until it is queued, then close the connection."""
    host, port = server.host_port.rsplit(":", 1)
    body = _body(1.0)
    head = (
        "POST /v2/models/gate/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    socks = [socket.create_connection((host, int(port)), timeout=30) for _ in range(n)]
    try:
        for sock in socks:
            sock.sendall(head + body)
        wait_for(lambda: _gauge(server, "modelpool_queue_depth") >= n, 60, "the burst to queue")
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: _gauge(server, "modelpool_queue_depth") == 0, 60, "the server to see hang-ups")


def test_clients_that_hang_up_never_wedge_the_batch_queue(
    gated: tuple[ServerProcess, Path],
) -> None:
    server, gate = gated
    statuses: list[int] = []
    holders = []
    for width in (3, 4):  # one batch per worker: both busy until the gate opens
        holder = threading.Thread(
            target=lambda w=width: statuses.append(_post(server, _body(-1, w)))
        )
        holder.start()
        holders.append(holder)
        wait_for(
            lambda w=width: _gauge(server, "modelpool_in_flight") == w - 2, 60, "a busy worker"
        )
    for _ in range(3):
        _hang_up_burst(server, 8)
    gate.touch()
    for holder in holders:
        holder.join(60)
    assert statuses == [200, 200]
    wait_for(lambda: _gauge(server, "modelpool_in_flight") == 0, 60, "both workers to be idle")

    t0 = time.monotonic()
    status = _post(server, _body(1.0))
    elapsed = time.monotonic() - t0
    assert status == 200
    # 5 ms of batch delay plus a tiny predict; a wedged queue answers never (or seconds late)
    assert elapsed < 1.0, f"a request after clients hung up took {elapsed:.2f} s"


# ---------------------------------------------------------------- thousands of tensors


def test_ten_thousand_inputs_to_a_model_that_declares_none(tmp_path: Path) -> None:
    n = 10_000
    tensors = [
        {"name": f"INPUT{i}", "datatype": "FP32", "shape": [1, 2], "data": [i, -i]}
        for i in range(n)
    ]
    config = {"models": {"identity": {"model": "_server_models:Identity", "workers": 1}}}
    with ServerProcess(config=config, tmp=tmp_path) as server:
        conn = http.client.HTTPConnection(server.host_port, timeout=60)
        try:
            conn.request("POST", "/v2/models/identity/infer", json.dumps({"inputs": tensors}))
            response = conn.getresponse()
            status, body = response.status, response.read()
        finally:
            conn.close()
    assert status == 200, body[:500]
    outputs = {o["name"]: o for o in json.loads(body)["outputs"]}
    assert len(outputs) == n
    assert outputs[f"OUTPUT{n - 1}"]["data"] == [n - 1, -(n - 1)]
