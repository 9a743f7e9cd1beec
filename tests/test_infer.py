"""An HTTP inference request answered whole by a worker (``_infer``): the front process sends
the body's bytes and gets the answer's bytes back."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import numpy as np
import orjson
import pytest

import modelpool
from _models import Crashy, Doubler, Limited
from modelpool import _infer, _logs, _protocol
from modelpool._infer import BAD_OUTPUTS


class _Model:
    """In-process stand-in: returns what ``outputs`` says, records what it got."""

    inputs = Doubler.inputs
    max_batch_size = 2

    def __init__(self, outputs: Any = None) -> None:
        self.outputs = outputs
        self.got: Any = None
        self.request_id: str | None = None

    def predict(self, inputs: Any) -> Any:
        self.got = inputs
        self.request_id = _logs.request_id()
        return self.outputs if self.outputs is not None else {"y": inputs["x"] * 2}


def _body(rows: int = 1, **extra: Any) -> bytes:
    x = {"name": "x", "datatype": "FP32", "shape": [rows, 4], "data": [1.0] * (4 * rows)}
    return orjson.dumps({"inputs": [x], **extra})


def _handle(model: Any, body: bytes, header_length: int | None = None, **kw: Any) -> Any:
    payload = _infer.request_payload(
        "m", "1", body, header_length, kw.get("tag", "t-1"), kw.get("adopt_id", True)
    )
    payload = pickle.loads(pickle.dumps(payload, protocol=5))  # as it crosses to a worker
    token = _logs.REQUEST_ID.set(kw.get("tag", "t-1"))
    try:
        return _infer.handle(model, payload)
    finally:
        _logs.REQUEST_ID.reset(token)


def test_a_json_request_is_decoded_predicted_and_encoded() -> None:
    model = _Model()
    status, data, json_length, body_id, rows = _handle(model, _body())
    assert (status, json_length, body_id, rows) == (200, None, None, 1)
    answer = orjson.loads(data)
    assert answer["model_name"] == "m"
    assert answer["model_version"] == "1"
    assert answer["id"] == "t-1"  # the front's request id, as before
    assert answer["outputs"][0]["data"] == [2.0] * 4
    assert model.got["x"].flags.writeable


@pytest.mark.parametrize(
    ("body", "data"),
    [
        (_body(outputs=[{"name": "y", "parameters": {"binary_data": False}}]), [2.0] * 4),
        (_body(parameters={"binary_data_output": False}), [2.0] * 4),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], '
            b'"data": [NaN, 1, 1, 1]}]}',
            ["NaN", 2.0, 2.0, 2.0],
        ),  # (only the stdlib reads NaN)
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], '
            b'"data": ["Infinity", 1, 1, 1]}]}',
            ["Infinity", 2.0, 2.0, 2.0],
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], '
            b'"data": [[1, 1, 1, 1]]}]}',
            [2.0] * 4,
        ),  # (nested)
    ],
)
def test_json_requests_off_the_short_path_are_answered_by_the_general_one(
    body: bytes, data: list[Any]
) -> None:
    status, answer, json_length, _, rows = _handle(_Model(), body)
    assert (status, json_length, rows) == (200, None, 1), answer
    assert orjson.loads(answer)["outputs"][0]["data"] == data


def test_a_binary_request_gives_the_model_writable_arrays_and_a_binary_answer() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    body, length = _protocol.encode_infer_request({"x": x}, binary=True, outputs=None)
    model = _Model()
    status, data, json_length, _, _ = _handle(model, body, length)
    assert status == 200
    assert model.got["x"].flags.writeable  # never a read-only view of the body's bytes
    outputs = _protocol.decode_infer_response(bytes(data), json_length)
    np.testing.assert_array_equal(outputs["y"], x * 2)


def test_the_bodys_id_becomes_the_request_id_unless_a_header_named_it() -> None:
    model = _Model()
    _, data, _, body_id, _ = _handle(model, _body(id="from-body"))
    assert body_id == "from-body"
    assert model.request_id == "from-body"
    assert orjson.loads(data)["id"] == "from-body"
    _, data, _, body_id, _ = _handle(model, _body(id="from-body"), adopt_id=False)
    assert model.request_id == "t-1"  # the header's id stays the request id
    assert orjson.loads(data)["id"] == "from-body"  # and the answer echoes the body's id


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{not json", 400, "not valid UTF-8 JSON"),
        (_body(rows=3), 400, "accepts at most 2 rows per call"),
        (
            orjson.dumps(
                {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1], "data": [1]}]}
            ),
            400,
            "no input named 'z'",
        ),
        (_body(outputs=[{"name": "nope"}]), 400, "has no output 'nope'"),
    ],
)
def test_bad_requests_are_answered_with_the_codecs_words(
    body: bytes, status: int, words: str
) -> None:
    answer = _handle(_Model(), body)
    assert answer[0] == status
    assert words in answer[1]


@pytest.mark.parametrize(
    ("outputs", "words"),
    [
        (["not", "a", "dict"], "list, but predict() must return a dict"),
        ({"y": np.array([1 + 2j])}, "complex128"),
        ({1: np.array([1.0], np.float32)}, "dict of output name -> array"),
    ],
)
def test_outputs_the_protocol_cannot_carry_are_the_models_fault(outputs: Any, words: str) -> None:
    status, message, _, _, rows = _handle(_Model(outputs), _body())
    assert rows == 0  # (no answer: no rows counted)
    assert status == BAD_OUTPUTS
    assert words in message


def test_predicts_exceptions_propagate() -> None:
    class Boom(_Model):
        def predict(self, inputs: Any) -> Any:
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        _handle(Boom(), _body())


def test_a_pool_answers_the_bytes_in_a_worker_json_and_large_binary() -> None:
    big = np.random.default_rng(0).standard_normal((2**18, 4)).astype(np.float32)  # 4 MiB
    big_body, big_length = _protocol.encode_infer_request({"x": big}, binary=True, outputs=None)

    async def main(pool: modelpool.Pool) -> None:
        pool.attach_loop()
        try:
            started = pool.start_infer(_body(), request_id="r-7")
            status, data, _, _, rows = await started.wait()
            assert rows == 1
            assert status == 200
            assert started.worker_pid is not None
            assert orjson.loads(data)["outputs"][0]["data"] == [2.0] * 4
            status, data, json_length, _, _ = await pool.start_infer(
                big_body, big_length, version="3"
            ).wait()
            assert status == 200
            out = _protocol.decode_infer_response(bytes(data), json_length)
            np.testing.assert_array_equal(out["y"], big * 2)
        finally:
            pool.detach_loop()

    with modelpool.Pool(Doubler, workers=1) as pool:
        asyncio.run(main(pool))
        # not attached: the supervisor's path answers the same way
        status, _data, _, _, _ = pool.start_infer(_body()).future.result(timeout=60)
        assert status == 200


def test_a_pool_fails_start_infer_like_predict() -> None:
    with modelpool.Pool(Crashy, workers=1, options={"stage": "predict"}) as pool:
        future = pool.start_infer(_body()).future
        with pytest.raises(RuntimeError, match="boom on purpose"):
            future.result(timeout=60)
    with modelpool.Pool(Limited, workers=1) as pool:  # the rows limit is checked in the worker
        body = orjson.dumps(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [5, 1], "data": [1] * 5}]}
        )
        status, message, _, _, _ = pool.start_infer(body).future.result(timeout=60)
        assert status == 400
        assert "accepts at most 4 rows per call" in message
    with modelpool.Pool(workers=1) as pool, pytest.raises(modelpool.ModelSpecError):
        pool.start_infer(_body())


# ---------------------------------------------------------------- batches of bodies


class _Recording:
    """Records every predict's rows; fails on a NaN in its input. (No declared inputs: any
    width goes.)"""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def predict(self, inputs: Any) -> Any:
        x = inputs["x"]
        if np.isnan(x).any():
            raise ValueError("NaN in the input")
        self.calls.append(x.shape[0])
        return {"y": x * 2}


def _payload(body: bytes, tag: str) -> tuple[Any, ...]:
    return _infer.request_payload("m", "1", body, None, tag, True)


def test_a_batch_of_bodies_is_grouped_predicted_together_and_answered_each() -> None:
    model = _Recording()
    wide = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
    )
    bodies = [_body(1), _body(2), wide, b"{not json", _body(1), wide]
    results = _infer.handle_batch(model, [_payload(b, f"t{i}") for i, b in enumerate(bodies)], 8)
    # the 4-wide ones together (4 rows), the 2-wide ones together: two predicts, not five
    assert sorted(model.calls) == [2, 4]
    statuses = [r[0] for r in results]
    assert statuses == [200, 200, 200, 400, 200, 200]
    assert "JSON" in results[3][1]
    rows = [len(orjson.loads(r[1])["outputs"][0]["data"]) for r in results if r[0] == 200]
    assert rows == [4, 8, 2, 4, 2]  # each answer has its own rows (values), in order
    assert orjson.loads(results[0][1])["id"] == "t0"


def test_a_batch_never_gives_predict_more_than_max_batch_size_rows() -> None:
    model = _Recording()
    bodies = [_body(2), _body(2), _body(1), _body(4)]
    results = _infer.handle_batch(model, [_payload(b, "t") for b in bodies], 4)
    assert [r[0] for r in results] == [200] * 4
    assert model.calls == [4, 1, 4]  # arrival order, cut where the next would not fit


def test_an_exception_in_a_batch_fails_that_predicts_requests_only() -> None:
    model = _Recording()
    nan = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": ["NaN"] * 4}]}
    )
    wide = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
    )
    results = _infer.handle_batch(model, [_payload(b, "t") for b in (_body(), nan, wide)], 8)
    from modelpool._transport import RemoteException

    assert isinstance(results[0], RemoteException)
    assert isinstance(results[1], RemoteException)
    assert "NaN" in str(results[1].rebuild())
    assert results[2][0] == 200  # another predict: not failed with them


def test_a_model_that_drops_rows_in_a_batch_is_the_models_fault() -> None:
    class Dropper(_Recording):
        def predict(self, inputs: Any) -> Any:
            return {"y": inputs["x"][:1]}

    results = _infer.handle_batch(Dropper(), [_payload(_body(), "t") for _ in range(3)], 8)
    assert [r[0] for r in results] == [BAD_OUTPUTS] * 3
    assert "batch" in results[0][1]


def test_a_pool_with_batching_batches_bodies_in_the_worker() -> None:
    async def main() -> list[Any]:
        with modelpool.Pool(Doubler, workers=1, max_batch_size=16, max_batch_delay=0.2) as pool:
            pool.start()
            started = [pool.start_infer(_body(), request_id=f"r{i}") for i in range(6)]
            answers = [await s.wait() for s in started]
            assert sum(n * k for n, k in pool.stats().batch_sizes.items()) == 6
            assert max(pool.stats().batch_sizes) > 1  # merged, not one by one
            return answers

    answers = asyncio.run(main())
    assert [a[0] for a in answers] == [200] * 6
    assert [orjson.loads(a[1])["id"] for a in answers] == [f"r{i}" for i in range(6)]
