"""The real server process, called by the real clients people use: tritonclient (sync and
asyncio, JSON and binary) and KServe's InferenceRESTClient. Failure paths: a worker killed
mid-request, SIGTERM under load, a second Ctrl+C, bad configuration, bad requests."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _serving import ServerProcess
from _serving import request as _request

from _deps import need_module

ALL_TYPES = {
    "BOOL": np.array([[True, False, True]]),
    "INT8": np.array([[-128, 0, 127]], np.int8),
    "INT16": np.array([[-32768, 1, 32767]], np.int16),
    "INT32": np.array([[-(2**31), 2, 2**31 - 1]], np.int32),
    "INT64": np.array([[-(2**63), 3, 2**63 - 1]], np.int64),
    "UINT8": np.array([[0, 1, 255]], np.uint8),
    "UINT16": np.array([[0, 2, 65535]], np.uint16),
    "UINT32": np.array([[0, 3, 2**32 - 1]], np.uint32),
    "UINT64": np.array([[0, 4, 2**64 - 1]], np.uint64),
    "FP16": np.array([[0.5, -1.25, 65504]], np.float16),
    "FP32": np.array([[0.1, -2.5, 3.4e38]], np.float32),
    "FP64": np.array([[0.1, -2.5, 1e300]], np.float64),
    "BYTES": np.array([[b"abc", b"", "héllo".encode()]], dtype=object),
}


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = {
        "server": {"max_body_size": "2MB", "max_decompressed_size": "4MB"},
        "models": {
            "identity": {"model": "_server_models:Identity", "workers": 2},
            "iris": {"model": "modelpool.demo:IrisClassifier"},
            "buggy": {"model": "_server_models:Buggy"},
        },
    }
    with ServerProcess(config=config, tmp=tmp_path_factory.mktemp("identity")) as server:
        yield server


def _infer_body(name: str, datatype: str, shape: list[int], data: list[Any]) -> bytes:
    tensor = {"name": name, "datatype": datatype, "shape": shape, "data": data}
    return json.dumps({"inputs": [tensor]}).encode()


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


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_kserve_rest_client(identity: ServerProcess, binary: bool) -> None:
    kserve = need_module("kserve")

    async def main() -> None:
        client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", retries=0))
        try:
            assert await client.is_server_live(identity.url)
            assert await client.is_server_ready(identity.url)
            assert await client.is_model_ready(identity.url, "iris")
            x = np.array([[5.1, 3.5, 1.4, 0.2], [6.9, 3.1, 5.8, 2.2]], np.float32)
            item = kserve.InferInput("INPUT0", list(x.shape), "FP32")
            item.set_data_from_numpy(x, binary_data=binary)
            request = kserve.InferRequest(model_name="iris", infer_inputs=[item])
            response = await client.infer(identity.url, request, model_name="iris")
            labels = {o.name: o for o in response.outputs}["LABEL"].as_numpy()
            assert labels.tolist() == [0, 2]
        finally:
            await client.close()

    asyncio.run(main())


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
            _infer_body("INPUT0", "FP32", [1, 3], [1, 2, 3]),
            {},
            400,
            "INPUT0",
        ),
        (
            "/v2/models/iris/infer",
            _infer_body("WRONG", "FP32", [1, 4], [1, 2, 3, 4]),
            {},
            400,
            "WRONG",
        ),
        (
            "/v2/models/iris/infer",
            _infer_body("INPUT0", "FP32", [1, 4], [1, 2, 3]),
            {},
            400,
            "INPUT0",
        ),
        (
            "/v2/models/iris/infer",
            _infer_body("INPUT0", "FP32", [1, 4], [1, 2, 3, 4]),
            {"Inference-Header-Content-Length": "9999"},
            400,
            "Inference-Header-Content-Length",
        ),
        (
            "/v2/models/buggy/infer",
            _infer_body("INPUT0", "FP32", [1], [1]),
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
    good = _infer_body("INPUT0", "FP32", [1, 4], [1, 2, 3, 4])
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
    _request(identity, "POST", "/v2/models/iris/infer", _infer_body("X", "FP32", [1], [1]))
    _request(
        identity, "POST", "/v2/models/iris/infer", _infer_body("INPUT0", "FP32", [1, 4], [1] * 4)
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


# ---------------------------------------------------------------- failures and lifecycle


def _slow_body(seconds: float) -> bytes:
    return _infer_body("SECONDS", "FP64", [1], [seconds])


def _model_status(server: ServerProcess, name: str) -> dict[str, Any]:
    """The model's entry in ``/status.json`` (queued, in_flight, workers, latency_ms...)."""
    status = json.loads(_request(server, "GET", "/status.json")[2])
    (model,) = [m for m in status["models"] if m["name"] == name]
    return model


def _until(condition: Any, what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` (a generous bound: it is an event, not a speed, being waited for)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def test_worker_killed_mid_request(tmp_path: Path) -> None:
    config = {
        "server": {"ready_probe_interval": 0.2},
        "models": {"sleepy": {"model": "_server_models:Sleepy", "workers": 1}},
    }
    with ServerProcess(config=config, tmp=tmp_path) as server:
        answer: dict[str, Any] = {}

        def call() -> None:
            answer["r"] = _request(server, "POST", "/v2/models/sleepy/infer", _slow_body(30))

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
        assert status == 503
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
        status, _, body = _request(server, "POST", "/v2/models/sleepy/infer", _slow_body(0))
        assert status == 200
        assert json.loads(body)["outputs"][0]["data"] != [pid]


def test_sigterm_under_load_answers_every_accepted_request(tmp_path: Path) -> None:
    config = {  # no readiness probe: only the twelve requests below reach the pool
        "server": {"ready_probe_interval": 600},
        "models": {"sleepy": {"model": "_server_models:Sleepy", "workers": 2}},
    }
    server = ServerProcess(config=config, tmp=tmp_path).wait_ready()
    workers = _worker_pids(server)
    results: list[int] = []
    lock = threading.Lock()

    def call() -> None:
        status, _, _ = _request(server, "POST", "/v2/models/sleepy/infer", _slow_body(0.3))
        with lock:
            results.append(status)

    callers = [threading.Thread(target=call) for _ in range(12)]
    for t in callers:
        t.start()

    def accepted() -> int:  # waiting, running, or answered: the pool has them all
        model = _model_status(server, "sleepy")
        return model["queued"] + model["in_flight"] + model["latency_ms"]["count"]

    _until(lambda: accepted() == 12, "all twelve requests to be accepted")
    code = server.stop(signal.SIGTERM)
    for t in callers:
        t.join(60)
    assert code == 0, server.output
    assert results == [200] * 12, (results, server.output)
    assert "stopped" in server.output
    assert not [p for p in workers if _alive(p)]


def test_second_ctrl_c_stops_at_once_and_reaps_workers(tmp_path: Path) -> None:
    config = {  # no readiness probe: only the two requests below reach the pool
        "server": {"ready_probe_interval": 600},
        "models": {"sleepy": {"model": "_server_models:Sleepy", "workers": 2}},
    }
    server = ServerProcess(config=config, tmp=tmp_path).wait_ready()
    workers = _worker_pids(server)
    failures: list[BaseException] = []

    def call() -> None:
        try:
            _request(server, "POST", "/v2/models/sleepy/infer", _slow_body(60))
        except (ConnectionError, http.client.HTTPException) as exc:  # the server is gone
            failures.append(exc)

    callers = [threading.Thread(target=call) for _ in range(2)]
    for t in callers:
        t.start()
    _until(lambda: _model_status(server, "sleepy")["in_flight"] == 2, "both requests to run")
    server.proc.send_signal(signal.SIGINT)
    _until(lambda: "answering requests in flight" in server.output, "the first Ctrl+C to act")
    started = time.monotonic()
    code = server.stop(signal.SIGINT)
    # "at once": well under the 60 s requests (and the 30 s drain) it would otherwise wait for
    assert time.monotonic() - started < 15
    assert code == 130, server.output
    assert not [p for p in workers if _alive(p)]
    for t in callers:
        t.join(60)
    assert len(failures) == 2  # their connections were closed, not left hanging


def _worker_pids(server: ServerProcess) -> list[int]:
    status = json.loads(_request(server, "GET", "/status.json")[2])
    return [w["pid"] for m in status["models"] for w in m["workers"] if w["pid"]]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead but not yet reaped
        return f.read().split()[2] != "Z"


def test_a_model_that_cannot_load_stops_the_server_with_its_error(tmp_path: Path) -> None:
    config = {"models": {"broken": {"model": "_server_models:Broken"}}}
    server = ServerProcess(config=config, tmp=tmp_path)
    code = server.proc.wait(60)
    server.stop()
    assert code == 1
    assert "weights file /models/missing.pt not found" in server.output
    assert "model 'broken' could not be loaded" in server.output


def test_config_errors_name_file_and_field(tmp_path: Path) -> None:
    config = {"models": {"m": {"model": "_server_models:Identity", "wrkers": 2}}}
    server = ServerProcess(config=config, tmp=tmp_path)
    code = server.proc.wait(30)
    server.stop()
    assert code == 2  # a usage error: nothing was started
    assert "modelpool.yaml" in server.output
    assert "models.m.wrkers: unknown field" in server.output
    assert "workers" in server.output  # what is allowed
    assert "listening" not in server.output


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


def test_demo_with_no_arguments_prints_how_to_call_it() -> None:
    with ServerProcess() as server:
        assert "curl" in server.output
        assert "/v2/models/iris/infer" in server.output
        body = _infer_body("INPUT0", "FP32", [1, 4], [6.9, 3.1, 5.8, 2.2])
        status, _, answer = _request(server, "POST", "/v2/models/iris/infer", body)
        assert status == 200
        outputs = {o["name"]: o for o in json.loads(answer)["outputs"]}
        assert outputs["LABEL"]["data"] == [2]
        assert outputs["PROBABILITIES"]["shape"] == [1, 3]


def test_one_model_from_an_import_string_with_flags() -> None:
    with ServerProcess("_server_models:Identity", "--name", "ident", "--workers", "2") as server:
        status, _, body = _request(
            server, "POST", "/v2/models/ident/infer", _infer_body("INPUT0", "INT32", [2], [4, 5])
        )
        assert status == 200
        assert json.loads(body)["outputs"][0]["data"] == [4, 5]
        status, _, body = _request(server, "GET", "/status.json")
        assert len(json.loads(body)["models"][0]["workers"]) == 2


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = {
        "server": {"ready_probe_interval": 60, "retry_after": 2},
        "models": {
            "queue1": {"model": "_server_models:Sleepy", "workers": 1, "max_queue": 1},
            "timed": {"model": "_server_models:Sleepy", "workers": 1, "timeout": 0.5},
        },
    }
    with ServerProcess(config=config, tmp=tmp_path_factory.mktemp("limited")) as server:
        yield server


def test_overloaded_is_503_with_retry_after(limited: ServerProcess) -> None:
    # a request first: the readiness probe (after 60 s of quiet) cannot take the queue's place
    assert _request(limited, "POST", "/v2/models/queue1/infer", _slow_body(0))[0] == 200
    answers: list[tuple[int, dict[str, str], bytes]] = []

    def call(seconds: float) -> None:
        answers.append(_request(limited, "POST", "/v2/models/queue1/infer", _slow_body(seconds)))

    def model() -> dict[str, Any]:
        return _model_status(limited, "queue1")

    # one runs (3 s: it surely outlasts the steps below), one waits, the rest find the queue full
    callers = [threading.Thread(target=call, args=(s,)) for s in (3.0, 0.0, 0.0, 0.0)]
    callers[0].start()
    _until(lambda: model()["in_flight"] == 1, "the first request to run")
    callers[1].start()
    _until(lambda: model()["queued"] == 1, "the second request to queue")
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
    status, headers, body = _request(limited, "POST", "/v2/models/timed/infer", _slow_body(5))
    assert status == 504
    message = _error(status, headers, body)
    assert "timed out" in message
    # named once, as the URL names it: no "model 'timed': request to 'Sleepy' ..." any more
    assert message.count("'timed'") == 1, message
    assert "Sleepy" not in message
    deadline = time.monotonic() + 60
    while True:  # the stuck worker was killed and replaced
        status, _, _ = _request(limited, "POST", "/v2/models/timed/infer", _slow_body(0))
        if status == 200:
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_client_that_goes_away_takes_its_queued_request_with_it(limited: ServerProcess) -> None:
    def served() -> int:
        status = json.loads(_request(limited, "GET", "/status.json")[2])
        (model,) = [m for m in status["models"] if m["name"] == "queue1"]
        return int(model["workers"][0]["served"])

    # a request first: the readiness probe (after 60 s of quiet) cannot run in between
    assert _request(limited, "POST", "/v2/models/queue1/infer", _slow_body(0))[0] == 200
    before = served()
    # 3 s: the running request surely outlasts the steps below
    running = threading.Thread(
        target=_request, args=(limited, "POST", "/v2/models/queue1/infer", _slow_body(3.0))
    )
    running.start()
    _until(lambda: _model_status(limited, "queue1")["in_flight"] == 1, "the request to run")
    body = _slow_body(0)
    host, port = limited.host_port.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:  # queued, then gone
        sock.sendall(
            b"POST /v2/models/queue1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        _until(lambda: _model_status(limited, "queue1")["queued"] == 1, "the request to queue")
    _until(lambda: _model_status(limited, "queue1")["queued"] == 0, "the request to be dropped")
    running.join(60)
    # one worker, a FIFO queue: had the abandoned request stayed queued, it would run first
    assert _request(limited, "POST", "/v2/models/queue1/infer", _slow_body(0))[0] == 200
    assert served() == before + 2  # the running one and the last one: the abandoned never ran


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
    config = {  # ready means a probe answered within 3 s (three intervals)
        "server": {"ready_probe_interval": 1.0},
        "models": {
            "quick": {"model": "_server_models:Identity", "timeout": 0.3},
            "busy": {"model": "_server_models:Sleepy"},
        },
    }
    with ServerProcess(config=config, tmp=tmp_path) as server:
        caller = threading.Thread(
            target=_request, args=(server, "POST", "/v2/models/busy/infer", _slow_body(5.0))
        )
        caller.start()
        # probes every 1 s meanwhile; "busy" cannot answer them. After 4 s, "quick" is ready
        # only if its own probes went on (its last answer before them is over 3 s old)
        time.sleep(4.0)
        status, _, _ = _request(server, "GET", "/v2/models/quick/ready")
        assert status == 200  # a busy model does not hold back another model's probe
        caller.join(60)
        text = _request(server, "GET", "/metrics")[2].decode()
        assert 'modelpool_worker_exits_total{model="quick"' not in text, text


def test_stop_while_loading_is_a_clean_exit(tmp_path: Path) -> None:
    config = {"models": {"slow": {"model": "_models:SlowSetup", "options": {"seconds": 30}}}}
    server = ServerProcess(config=config, tmp=tmp_path)
    deadline = time.monotonic() + 60
    while "loading" not in server.output:
        assert time.monotonic() < deadline, server.output
        time.sleep(0.05)
    code = server.stop(signal.SIGTERM)
    assert code == 0, server.output
    assert "Traceback" not in server.output


def test_a_failed_model_does_not_wait_for_the_others_to_load(tmp_path: Path) -> None:
    config = {
        "models": {
            "broken": {"model": "_server_models:Broken"},
            "slow": {"model": "_models:SlowSetup", "options": {"seconds": 120}},
        }
    }
    started = time.monotonic()
    server = ServerProcess(config=config, tmp=tmp_path)
    try:
        code = server.proc.wait(90)
    finally:
        server.stop()
    assert code == 1
    assert time.monotonic() - started < 60  # far below the 120 s the other model loads for
    assert "model 'broken' could not be loaded" in server.output


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
    body = _infer_body("INPUT0", "FP32", [1, 4], [5.1, 3.5, 1.4, 0.2])
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
