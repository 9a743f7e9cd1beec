"""gRPC (``server.grpc_port``): the Open Inference Protocol's GRPCInferenceService over a real
port, with the real ``tritonclient.grpc`` (sync and asyncio), KServe's gRPC client, and raw
gRPC calls for the typed ``contents`` that tritonclient never sends."""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _serving import ServerProcess, infer_body, model_status, request

from _accounts import store_do
from _deps import need_installed, need_module
from _scripts import RESULT, run_script
from _tensors import ALL_TYPES
from _waiting import wait_for
from modelpool import _grpc_schema, demo
from modelpool.auth._store import Store

IRIS = np.array([[5.1, 3.5, 1.4, 0.2], [6.9, 3.1, 5.8, 2.2]], np.float32)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module server's folder: its configuration, and the gated model's gate file."""
    return tmp_path_factory.mktemp("grpc")


@pytest.fixture(scope="module")
def server(tmp: Path) -> Iterator[ServerProcess]:
    need_module("grpc")
    config = {
        "server": {"grpc_port": 0, "max_body_size": "1MB"},
        "models": {
            "identity": {"model": "_server_models:Identity", "workers": 2},
            "iris": {"model": demo.MODEL},
            "buggy": {"model": "_server_models:Buggy"},
            "abort": {"model": "_server_models:Abort"},
            "gated": {"model": "_models:Gate", "options": {"path": str(tmp / "gate")}},
            "words": {"model": "_server_models:Words"},
        },
    }
    with ServerProcess(config=config, tmp=tmp) as served:
        assert served.grpc_target, served.output
        yield served


def _client(server: ServerProcess) -> Any:
    grpcclient = need_module("tritonclient.grpc")
    return grpcclient.InferenceServerClient(server.grpc_target)


def _error(call: Any) -> Any:
    """The ``InferenceServerException`` ``call()`` raises."""
    utils = need_module("tritonclient.utils")
    with pytest.raises(utils.InferenceServerException) as caught:
        call()
    return caught.value


def test_every_rpc_with_tritonclient(server: ServerProcess) -> None:
    client = _client(server)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("iris")
        assert client.is_model_ready("iris", "1")
        meta = client.get_server_metadata(as_json=True)
        assert meta["name"] == "modelpool"
        assert "binary_tensor_data" in meta["extensions"]
        model = client.get_model_metadata("iris", as_json=True)
        assert model["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": ["-1", "4"]}]
        assert model["versions"] == ["1"]
        config = client.get_model_config("iris", as_json=True)["config"]
        assert config["input"][0]["data_type"] == "TYPE_FP32"
        assert config["instance_group"][0]["kind"] == "KIND_CPU"
        index = client.get_model_repository_index(as_json=True)["models"]
        assert {m["name"]: m["state"] for m in index}["iris"] == "READY"
        for call in (
            lambda: client.get_model_metadata("nope"),
            lambda: client.is_model_ready("nope"),
            lambda: client.get_model_config("iris", "7"),
        ):
            error = _error(call)
            assert error.status() == "StatusCode.NOT_FOUND"
        assert (
            "unknown model 'nope'; this server has: "
            in _error(lambda: client.get_model_metadata("nope")).message()
        )
    finally:
        client.close()


def test_every_datatype_raw_with_the_requested_outputs_and_id(server: ServerProcess) -> None:
    grpcclient = need_module("tritonclient.grpc")
    client = _client(server)
    try:
        inputs = []
        for i, (datatype, array) in enumerate(ALL_TYPES.items()):
            item = grpcclient.InferInput(f"INPUT{i}", list(array.shape), datatype)
            item.set_data_from_numpy(array)
            inputs.append(item)
        result = client.infer("identity", inputs, request_id="req-7")
        assert result.get_response().id == "req-7"
        for i, (datatype, array) in enumerate(ALL_TYPES.items()):
            assert result.get_output(f"OUTPUT{i}").datatype == datatype
            np.testing.assert_array_equal(result.as_numpy(f"OUTPUT{i}"), array, err_msg=datatype)
        wanted = [grpcclient.InferRequestedOutput(n) for n in ("OUTPUT12", "OUTPUT0")]
        some = client.infer("identity", inputs, outputs=wanted).get_response()
        assert [o.name for o in some.outputs] == ["OUTPUT12", "OUTPUT0"]
    finally:
        client.close()


def _raw_call(server: ServerProcess, method: str, message: Any, reply: Any) -> Any:
    """One unary call through a plain channel with modelpool's own message classes."""
    grpc = need_module("grpc")
    with grpc.insecure_channel(server.grpc_target) as channel:
        call = channel.unary_unary(
            f"/{_grpc_schema.SERVICE}/{method}",
            request_serializer=type(message).SerializeToString,
            response_deserializer=reply.FromString,
        )
        return call(message, timeout=60)


def test_typed_contents_of_every_datatype(server: ServerProcess) -> None:
    """What KServe's client sends for ``data=[...]``: each datatype's typed field (FP16 has
    none). The answer is raw either way."""
    m = _grpc_schema.messages()
    request = m.ModelInferRequest(model_name="identity", id="typed")
    fields = {"BOOL": "bool", "UINT64": "uint64", "INT64": "int64", "FP32": "fp32"}
    fields |= {"FP64": "fp64", "BYTES": "bytes"}
    fields |= dict.fromkeys(("UINT8", "UINT16", "UINT32"), "uint")
    fields |= dict.fromkeys(("INT8", "INT16", "INT32"), "int")
    names = {}
    for i, (datatype, field) in enumerate(fields.items()):
        array = ALL_TYPES[datatype]
        tensor = request.inputs.add(name=f"INPUT{i}", datatype=datatype, shape=array.shape)
        getattr(tensor.contents, f"{field}_contents").extend(array.reshape(-1).tolist())
        names[f"OUTPUT{i}"] = datatype
    response = _raw_call(server, "ModelInfer", request, m.ModelInferResponse)
    assert response.id == "typed"
    grpcclient = need_module("tritonclient.grpc")
    theirs = grpcclient.service_pb2.ModelInferResponse.FromString(response.SerializeToString())
    result = grpcclient.InferResult(theirs)
    for name, datatype in names.items():
        np.testing.assert_array_equal(result.as_numpy(name), ALL_TYPES[datatype], datatype)


def test_asyncio_client_concurrent(server: ServerProcess) -> None:
    aio = need_module("tritonclient.grpc.aio")
    grpcclient = need_module("tritonclient.grpc")

    async def main() -> None:
        client = aio.InferenceServerClient(server.grpc_target)
        try:
            assert await client.is_server_ready()

            async def one(i: int) -> None:
                x = np.full((1, 4), i, np.float32)
                item = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
                item.set_data_from_numpy(x)
                result = await client.infer("identity", [item])
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)

            await asyncio.gather(*(one(i) for i in range(40)))
        finally:
            await client.close()

    asyncio.run(main())


KSERVE = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

async def main():
    client = InferenceGRPCClient(sys.argv[1], timeout=30, retries=0)
    try:
        out = {"live": await client.is_server_live(), "ready": await client.is_server_ready(),
               "model_ready": await client.is_model_ready("iris")}
        x = np.array([[5.1, 3.5, 1.4, 0.2], [6.9, 3.1, 5.8, 2.2]], np.float32)
        typed = InferInput("INPUT0", list(x.shape), "FP32", data=x.reshape(-1).tolist())
        raw = InferInput("INPUT0", list(x.shape), "FP32")
        raw.set_data_from_numpy(x)
        for kind, item in (("typed", typed), ("raw", raw)):
            response = await client.infer(InferRequest(model_name="iris", infer_inputs=[item],
                                                       request_id="k-" + kind))
            labels = {o.name: o for o in response.outputs}["LABEL"].as_numpy()
            out[kind] = [response.id, labels.tolist()]
        try:
            await client.infer(InferRequest(model_name="nope", infer_inputs=[raw]))
        except Exception as exc:
            out["error"] = [str(exc.code()), exc.details()]
    finally:
        await client.close()
    print(%(result)r + json.dumps(out))

asyncio.run(main())
"""


def test_kserve_grpc_client(server: ServerProcess) -> None:
    """KServe's client, in its own interpreter: kserve and tritonclient.grpc register the same
    protocol messages in protobuf's default pool and cannot be imported in one process."""
    need_installed("kserve")
    out = run_script(KSERVE % {"result": RESULT}, server.grpc_target, timeout=120)
    assert (out["live"], out["ready"], out["model_ready"]) == (True, True, True)
    assert out["typed"] == ["k-typed", [0, 2]]
    assert out["raw"] == ["k-raw", [0, 2]]
    code, details = out["error"]
    assert code == "StatusCode.NOT_FOUND"
    assert "unknown model 'nope'" in details


def test_errors_carry_the_rest_message_with_the_matching_code(server: ServerProcess) -> None:
    grpcclient = need_module("tritonclient.grpc")
    client = _client(server)
    try:
        bad = grpcclient.InferInput("INPUT0", [2, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((2, 3), np.float32))
        error = _error(lambda: client.infer("iris", [bad]))
        assert error.status() == "StatusCode.INVALID_ARGUMENT"
        body = infer_body("INPUT0", "FP32", [2, 3], [0.0] * 6)
        status, _, rest = request(server, "POST", "/v2/models/iris/infer", body)
        assert status == 400
        assert error.message().endswith(json.loads(rest)["error"])

        item = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        item.set_data_from_numpy(np.zeros((1, 4), np.float32))
        error = _error(lambda: client.infer("buggy", [item]))
        assert error.status() == "StatusCode.INTERNAL"
        assert "model 'buggy' raised KeyError: \"no such feature 'age'\"" in error.message()

        big = grpcclient.InferInput("INPUT0", [1, 300_000], "FP32")  # 1.2 MB > max_body_size
        big.set_data_from_numpy(np.zeros((1, 300_000), np.float32))
        error = _error(lambda: client.infer("identity", [big]))
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"

        error = _error(lambda: client.infer("abort", [item]))
        assert error.status() == "StatusCode.INTERNAL"  # not UNAVAILABLE: clients retry that
        assert "was killed by SIGABRT" in error.message()
        assert "retry the request" in error.message()
        result = client.infer("iris", [_iris(grpcclient)])  # the server serves on
        assert result.as_numpy("LABEL").tolist() == [0, 2]
    finally:
        client.close()


def _iris(grpcclient: Any) -> Any:
    item = grpcclient.InferInput("INPUT0", list(IRIS.shape), "FP32")
    item.set_data_from_numpy(IRIS)
    return item


def _cancel_queued(server: ServerProcess, queued: Any) -> None:
    """A ModelInfer for the gated model, cancelled by the client once ``queued()`` says it
    waits in the pool's queue."""
    grpc = need_module("grpc")
    m = _grpc_schema.messages()
    request = m.ModelInferRequest(model_name="gated")
    request.inputs.add(name="x", datatype="FP32", shape=[1])
    request.raw_input_contents.append(np.array([5.0], np.float32).tobytes())

    async def main() -> None:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            infer = channel.unary_unary(f"/{_grpc_schema.SERVICE}/ModelInfer")
            call = infer(request.SerializeToString(), timeout=60)
            while not await asyncio.to_thread(queued):
                await asyncio.sleep(0.05)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    asyncio.run(main())


def test_a_deadline_or_a_cancel_drops_the_queued_request(server: ServerProcess, tmp: Path) -> None:
    """The client's deadline is the request's: it expires in the pool's queue (the only worker
    is held), the client gets DEADLINE_EXCEEDED, and the request leaves the queue and never
    runs. A call the client cancels leaves it the same way."""
    grpcclient = need_module("tritonclient.grpc")
    client = _client(server)

    def item(x: float) -> Any:
        given = grpcclient.InferInput("x", [1], "FP32")
        given.set_data_from_numpy(np.array([x], np.float32))
        return given

    def model() -> dict[str, Any]:
        return model_status(server, "gated")

    (tmp / "gate").unlink(missing_ok=True)  # (closed: another test may have opened it)
    try:
        assert client.infer("gated", [item(1.0)]).as_numpy("y").tolist() == [2.0]
        before = int(model()["workers"][0]["served"])
        held: list[Any] = []
        holder = threading.Thread(target=lambda: held.append(client.infer("gated", [item(-1.0)])))
        holder.start()
        try:
            wait_for(lambda: model()["in_flight"] == 1, 60, "the first request to run")
            error = _error(lambda: client.infer("gated", [item(3.0)], client_timeout=1.0))
            assert error.status() == "StatusCode.DEADLINE_EXCEEDED"
            wait_for(lambda: model()["queued"] == 0, 60, "the expired request to be dropped")
            _cancel_queued(server, lambda: model()["queued"] == 1)
            wait_for(lambda: model()["queued"] == 0, 60, "the cancelled request to be dropped")
            assert model()["in_flight"] == 1  # the gate still holds the only worker
        finally:
            (tmp / "gate").touch()
            holder.join(60)
        assert held[0].as_numpy("y").tolist() == [-2.0]
        assert client.infer("gated", [item(1.0)]).as_numpy("y").tolist() == [2.0]
        assert int(model()["workers"][0]["served"]) == before + 2  # the dropped ones never ran
    finally:
        client.close()


def test_requests_through_grpc_are_counted_in_the_metrics(server: ServerProcess) -> None:
    grpcclient = need_module("tritonclient.grpc")
    client = _client(server)
    try:
        for _ in range(3):
            client.infer("iris", [_iris(grpcclient)])
    finally:
        client.close()
    metrics = request(server, "GET", "/metrics")[2].decode()
    counted = [
        line
        for line in metrics.splitlines()
        if line.startswith("modelpool_requests_total")
        and 'model="iris"' in line
        and 'code="200"' in line
    ]
    assert counted, metrics
    assert float(counted[0].rsplit(" ", 1)[1]) >= 3


def test_a_grpc_port_in_use_stops_the_server_with_the_reason(tmp_path: Path) -> None:
    need_module("grpc")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = {"server": {"grpc_port": port}, "models": {"iris": {"model": demo.MODEL}}}
        server = ServerProcess(config=config, tmp=tmp_path)
        code = server.proc.wait(60)
        server.stop()
    assert code == 1, server.output
    assert f"cannot bind the gRPC port 127.0.0.1:{port}" in server.output
    assert "--grpc-port or server.grpc_port" in server.output


def test_the_flag_serves_grpc_and_sigterm_answers_a_call_in_flight(tmp_path: Path) -> None:
    """``--grpc-port`` on the command line; SIGTERM while a call runs: it is answered (and
    logged), the server exits 0."""
    grpcclient = need_module("tritonclient.grpc")
    flags = ("--grpc-port", "0", "--workers", "1", "--access-log", "on")
    with ServerProcess("_server_models:Sleepy", *flags) as server:
        client = grpcclient.InferenceServerClient(server.grpc_target)
        try:
            seconds = grpcclient.InferInput("SECONDS", [1], "FP64")
            seconds.set_data_from_numpy(np.array([1.5]))
            answers: list[Any] = []
            caller = threading.Thread(
                target=lambda: answers.append(client.infer("Sleepy", [seconds]))
            )
            caller.start()
            wait_for(lambda: model_status(server, "Sleepy")["in_flight"] == 1, 60, "the call")
            code = server.stop()
            caller.join(60)
        finally:
            client.close()
    assert code == 0, server.output
    assert answers, "the call in flight got no answer"
    assert answers[0].as_numpy("PID").shape == (1,)
    # the call's access log line, as an HTTP request's
    assert '"POST /inference.GRPCInferenceService/ModelInfer gRPC" 200' in server.output


def _keys(url: str) -> dict[str, str]:
    async def go(store: Store) -> dict[str, str]:
        await store.add_user("ann", "correct horse battery")
        return {
            "any": (await store.create_key("ann"))[0],
            "iris-only": (await store.create_key("ann", models=["iris"]))[0],
        }

    return store_do(url, go)


def test_api_keys_in_metadata_guard_every_rpc_but_the_probes(tmp_path: Path) -> None:
    grpcclient = need_module("tritonclient.grpc")
    url = f"sqlite:///{tmp_path / 'modelpool.db'}"
    keys = _keys(url)
    config = {
        "database": url,
        "auth": {"enabled": True},
        "server": {"grpc_port": 0},
        "models": {"iris": {"model": demo.MODEL}, "other": {"model": demo.MODEL}},
    }
    with ServerProcess(config=config, tmp=tmp_path) as server:
        client = grpcclient.InferenceServerClient(server.grpc_target)
        try:
            assert client.is_server_live()  # the probes need no key
            assert client.is_server_ready()
            for call in (
                lambda: client.infer("iris", [_iris(grpcclient)]),
                lambda: client.get_server_metadata(),
                lambda: client.get_model_repository_index(),
                lambda: client.is_model_ready("iris"),
            ):
                error = _error(call)
                assert error.status() == "StatusCode.UNAUTHENTICATED"
                assert "'authorization: Bearer <key>'" in error.message()
            wrong = {"authorization": "Bearer mp_not_a_key"}
            error = _error(lambda: client.infer("iris", [_iris(grpcclient)], headers=wrong))
            assert error.status() == "StatusCode.UNAUTHENTICATED"
            assert "the API key is not valid" in error.message()
            limited = {"authorization": f"Bearer {keys['iris-only']}"}
            result = client.infer("iris", [_iris(grpcclient)], headers=limited)
            assert result.as_numpy("LABEL").tolist() == [0, 2]
            error = _error(lambda: client.infer("other", [_iris(grpcclient)], headers=limited))
            assert error.status() == "StatusCode.PERMISSION_DENIED"
            assert "this API key may not use model 'other'" in error.message()
            good = {"authorization": f"Bearer {keys['any']}"}
            assert client.get_server_metadata(headers=good).name == "modelpool"
            assert client.infer("other", [_iris(grpcclient)], headers=good).as_numpy("LABEL").size
        finally:
            client.close()

        def usage() -> dict[str, Any]:
            status, _, body = request(
                server, "GET", "/status.json", Authorization=f"Bearer {keys['any']}"
            )
            assert status == 200
            return {k["prefix"]: k for k in json.loads(body)["auth"]["keys"]}

        limited_prefix = keys["iris-only"][:11]
        wait_for(lambda: usage()[limited_prefix]["requests"] == 2, 30, "the key's usage")
        assert usage()[limited_prefix]["rows"] == 2  # the infer that ran had 2 rows
        assert usage()[limited_prefix]["errors"] == 1  # the refused one


# ---------------------------------------------------------------- ModelStreamInfer


def test_a_stream_answers_each_request_once_and_goes_on_after_an_error(
    server: ServerProcess,
) -> None:
    """tritonclient's stream API against a model that does not stream: each request gets one
    answer (marked final), in whatever order they finish; a bad one gets its error, with the
    REST message, and the stream serves the others."""
    grpcclient = need_module("tritonclient.grpc")
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = _client(server)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i in range(6):
            if i == 3:
                bad = grpcclient.InferInput("INPUT0", [1, 3], "FP32")
                bad.set_data_from_numpy(np.zeros((1, 3), np.float32))
                client.async_stream_infer("iris", [bad], request_id="bad")
            else:
                client.async_stream_infer("iris", [_iris(grpcclient)], request_id=f"r{i}")
        got = [answers.get(timeout=60) for _ in range(6)]
        client.stop_stream()
    finally:
        client.close()
    results = {r.get_response().id: r for r, e in got if e is None}
    assert sorted(results) == ["r0", "r1", "r2", "r4", "r5"]
    for result in results.values():
        assert result.as_numpy("LABEL").tolist() == [0, 2]
        final = result.get_response().parameters["triton_final_response"]
        assert final.bool_param is True
    (error,) = [e for r, e in got if e is not None]
    status, _, rest = request(
        server, "POST", "/v2/models/iris/infer", infer_body("INPUT0", "FP32", [1, 3], [0.0] * 3)
    )
    assert status == 400
    assert str(error).endswith(json.loads(rest)["error"])


def test_the_asyncio_stream(server: ServerProcess) -> None:
    aio = need_module("tritonclient.grpc.aio")
    grpcclient = need_module("tritonclient.grpc")

    async def main() -> list[str]:
        client = aio.InferenceServerClient(server.grpc_target)

        async def requests() -> Any:
            for i in range(10):
                x = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
                x.set_data_from_numpy(np.full((1, 4), i, np.float32))
                yield {"model_name": "identity", "inputs": [x], "request_id": f"a{i}"}

        seen = []
        try:
            async for result, error in client.stream_infer(requests()):
                assert error is None, error
                i = int(result.get_response().id[1:])
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 4), i))
                seen.append(result.get_response().id)
                if len(seen) == 10:
                    break
        finally:
            await client.close()
        return seen

    assert sorted(asyncio.run(main())) == sorted(f"a{i}" for i in range(10))


def test_a_cancelled_stream_drops_its_queued_requests(server: ServerProcess, tmp: Path) -> None:
    grpc = need_module("grpc")
    m = _grpc_schema.messages()

    def model() -> dict[str, Any]:
        return model_status(server, "gated")

    def body(x: float) -> bytes:
        message = m.ModelInferRequest(model_name="gated", id=str(x))
        message.inputs.add(name="x", datatype="FP32", shape=[1])
        message.raw_input_contents.append(np.array([x], np.float32).tobytes())
        data: bytes = message.SerializeToString()
        return data

    async def main() -> None:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stream = channel.stream_stream(f"/{_grpc_schema.SERVICE}/ModelStreamInfer")
            call = stream(iter([body(-1.0), body(7.0)]), timeout=60)  # the gate, then one more
            while not await asyncio.to_thread(lambda: model()["queued"] == 1):
                await asyncio.sleep(0.05)
            assert model()["in_flight"] == 1
            call.cancel()

    before = int(model()["workers"][0]["served"])
    (tmp / "gate").unlink(missing_ok=True)
    try:
        asyncio.run(main())
        wait_for(lambda: model()["queued"] == 0, 60, "the stream's queued request to be dropped")
    finally:
        (tmp / "gate").touch()
    wait_for(lambda: model()["in_flight"] == 0, 60, "the held request to finish")
    assert int(model()["workers"][0]["served"]) == before + 1  # the dropped one never ran


def test_grpc_with_fork_workers_is_a_usage_error(tmp_path: Path) -> None:
    """grpcio runs threads in the server process; workers forked from it could inherit a held
    lock. The combination is refused before anything starts, saying what to do."""
    server = ServerProcess("--grpc-port", "0", "--start-method", "fork")
    code = server.proc.wait(60)
    server.stop()
    assert code == 2, server.output
    assert "server.grpc_port cannot be combined with start_method: fork" in server.output
    assert "use the default start method (forkserver)" in server.output


# ----------------------------------------------------------------------------- a model that streams


def _text(grpcclient: Any, text: str) -> Any:
    item = grpcclient.InferInput("text_input", [1], "BYTES")
    item.set_data_from_numpy(np.array([text.encode()], dtype=object))
    return item


def _stream(
    server: ServerProcess, text: str, *, until: int, empty_final: bool = False, **start: Any
) -> tuple[list[tuple[Any, Any]], Any]:
    """tritonclient's stream API, one request to ``words``: the first ``until`` callbacks
    (result, error), and the still open client (the caller stops and closes it)."""
    grpcclient = need_module("tritonclient.grpc")
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = _client(server)
    client.start_stream(callback=lambda result, error: answers.put((result, error)), **start)
    client.async_stream_infer(
        "words", [_text(grpcclient, text)], request_id="w1", enable_empty_final_response=empty_final
    )
    return [answers.get(timeout=60) for _ in range(until)], client


def _final(result: Any) -> bool:
    return bool(result.get_response().parameters["triton_final_response"].bool_param)


def test_a_streaming_model_answers_in_pieces_as_tritons_decoupled_models_do(
    server: ServerProcess,
) -> None:
    """One answer per piece, marked not final, then (asked for) an empty final answer."""
    got, client = _stream(server, "a b c", until=4, empty_final=True)
    client.stop_stream()
    client.close()
    assert [e for _, e in got] == [None] * 4
    results = [r for r, _ in got]
    assert [r.as_numpy("text_output").tolist() for r in results[:3]] == [[b"a"], [b"b"], [b"c"]]
    assert [_final(r) for r in results] == [False, False, False, True]
    assert [r.get_response().id for r in results] == ["w1"] * 4
    assert len(results[3].get_response().outputs) == 0


def test_a_crash_mid_stream_is_an_error_after_the_pieces(server: ServerProcess) -> None:
    got, client = _stream(server, "a b crash c", until=3)
    client.stop_stream()
    client.close()
    assert [r.as_numpy("text_output").tolist() for r, _ in got[:2]] == [[b"a"], [b"b"]]
    result, error = got[2]
    assert result is None
    assert "exited with status 9" in str(error), error
    got, client = _stream(server, "again", until=1)  # the worker was replaced
    client.stop_stream()
    client.close()
    assert got[0][0].as_numpy("text_output").tolist() == [b"again"]


def test_cancelling_or_a_deadline_mid_stream_stops_the_models_generator(
    server: ServerProcess, tmp_path: Path
) -> None:
    """The client's cancel (stop_stream(cancel_requests=True)), or the stream's deadline,
    reaches the worker: the generator's ``finally`` runs, within a piece."""
    for way in ("cancel", "deadline"):
        log = tmp_path / f"{way}.log"
        text = f"log:{log} one" + " slow" * 200
        start = {"stream_timeout": 3.0} if way == "deadline" else {}
        got, client = _stream(server, text, until=1, **start)
        assert got[0][0].as_numpy("text_output").tolist() == [b"one"]
        try:
            if way == "cancel":
                client.stop_stream(cancel_requests=True)
            wait_for(_finished(log), 60, f"the model's finally ({way})")
        finally:
            client.stop_stream()
            client.close()
        assert _read(log).count("yielded") < 100, way


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _finished(log: Path) -> Any:
    """Whether the model's generator has run its ``finally`` (its log says so)."""
    return lambda: "finally" in _read(log)


def test_model_infer_refuses_a_streaming_model_saying_what_to_call(server: ServerProcess) -> None:
    grpcclient = need_module("tritonclient.grpc")
    client = _client(server)
    try:
        error = _error(lambda: client.infer("words", [_text(grpcclient, "a b")]))
    finally:
        client.close()
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "streams its answer" in error.message()
    assert "ModelStreamInfer" in error.message()


def test_the_asyncio_client_streams_a_models_pieces(server: ServerProcess) -> None:
    """tritonclient's asyncio ``stream_infer`` with a model that streams: its pieces in order,
    each marked not final."""
    aio = need_module("tritonclient.grpc.aio")
    grpcclient = need_module("tritonclient.grpc")

    async def main() -> list[tuple[list[bytes], bool]]:
        client = aio.InferenceServerClient(server.grpc_target)

        async def requests() -> Any:
            yield {
                "model_name": "words",
                "inputs": [_text(grpcclient, "x y z")],
                "request_id": "s1",
            }  # (this client cannot ask for the empty final answer: it refuses the parameter)

        got: list[tuple[list[bytes], bool]] = []
        try:
            async for result, error in client.stream_infer(requests()):
                assert error is None, error
                output = result.as_numpy("text_output")
                got.append((output.tolist(), _final(result)))
                if len(got) == 3:
                    break
        finally:
            await client.close()
        return got

    assert asyncio.run(main()) == [([b"x"], False), ([b"y"], False), ([b"z"], False)]


def test_models_load_and_unload_with_tritonclients_grpc_calls(server: ServerProcess) -> None:
    """``load_model`` (with a config: the model's settings as a JSON string) and
    ``unload_model``: the same repository as HTTP's (test_repository.py)."""
    grpcclient = need_module("tritonclient.grpc")
    client = _client(server)
    try:
        config = json.dumps({"model": "_server_models:Identity", "workers": 1})
        client.load_model("loaded", config=config)
        assert client.is_model_ready("loaded")
        x = grpcclient.InferInput("INPUT0", [2], "FP32")
        x.set_data_from_numpy(np.array([1.0, 2.0], np.float32))
        assert client.infer("loaded", [x]).as_numpy("OUTPUT0").tolist() == [1.0, 2.0]
        client.unload_model("loaded")
        index = {e["name"]: e for e in client.get_model_repository_index(as_json=True)["models"]}
        assert index["loaded"]["state"] == "UNAVAILABLE"
        error = _error(lambda: client.infer("loaded", [x]))
        assert error.status() == "StatusCode.NOT_FOUND"
        assert "POST /v2/repository/models/loaded/load" in error.message()
        error = _error(lambda: client.load_model("broken", config='{"workers": 0}'))
        assert error.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        client.close()
