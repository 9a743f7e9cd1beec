"""The short path for common JSON requests and answers (``modelpool._plain``) gives what the
general codec gives, and leaves everything else to it."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from modelpool import _plain, _protocol


@pytest.fixture
def general(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run a codec call on the general path only (the short path declines everything)."""

    def run(call: Any, *args: Any, **kwargs: Any) -> Any:
        with monkeypatch.context() as m:
            m.setattr(_plain, "decode_inputs", lambda doc: None)
            m.setattr(_plain, "encode_outputs", lambda doc, outputs: None)
            return call(*args, **kwargs)

    return run


def _requests(seed: int, count: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(count):
        inputs = []
        for n in range(int(rng.integers(1, 4))):
            shape = [int(d) for d in rng.integers(1, 5, size=int(rng.integers(1, 4)))]
            values = rng.standard_normal(int(np.prod(shape))) * 10.0 ** rng.integers(
                -3, 30 if i % 2 else 300
            )
            data: list[Any] = values.tolist()
            if i % 3 == 0 and len(data) > 1:
                data[0] = int(data[0] % 1000)  # integers among floats: still numbers
            datatype = "FP32" if i % 2 else "FP64"
            inputs.append({"name": f"in{n}", "datatype": datatype, "shape": shape, "data": data})
        doc: dict[str, Any] = {"inputs": inputs}
        if i % 4 == 1:
            doc["id"] = f"req-{i}"
        docs.append(doc)
    return docs


@pytest.mark.parametrize("doc", _requests(7, 40))
def test_a_common_request_decodes_as_on_the_general_path(doc: dict[str, Any], general: Any) -> None:
    body = orjson.dumps(doc)
    assert _plain.decode_inputs(orjson.loads(body)) is not None  # (it took the short path)
    short = _protocol.decode_infer_request(body)
    long = general(_protocol.decode_infer_request, body)
    assert (short.id, short.outputs, short.binary_default, short.parameters) == (
        long.id,
        long.outputs,
        long.binary_default,
        long.parameters,
    )
    assert list(short.inputs) == list(long.inputs)
    for name, array in short.inputs.items():
        assert array.dtype == long.inputs[name].dtype
        assert array.shape == long.inputs[name].shape
        assert array.flags.writeable
        assert array.flags.c_contiguous
        np.testing.assert_array_equal(array, long.inputs[name])


_X = {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.5, 2.5]}


@pytest.mark.parametrize(
    "doc",
    [
        {"inputs": [_X], "parameters": {"binary_data_output": True}},
        {"inputs": [_X], "outputs": [{"name": "y"}]},
        {"inputs": [_X], "model_name": "m"},
        {"inputs": [_X], "id": 7},
        {"inputs": [{**_X, "parameters": {}}]},
        {"inputs": [{**_X, "datatype": "INT32", "data": [1, 2]}]},
        {"inputs": [{**_X, "datatype": "FP16"}]},
        {"inputs": [{**_X, "data": [1, 2]}]},  # integers only
        {"inputs": [{**_X, "data": [True, False]}]},
        {"inputs": [{**_X, "data": [None, 1.5]}]},
        {"inputs": [{**_X, "data": ["1.5", "2"]}]},
        {"inputs": [{**_X, "data": [[1.5], [2.5]]}]},
        {"inputs": [{**_X, "shape": [2, 1], "data": [[1.5], 2.5]}]},
        {"inputs": [{**_X, "data": [1e300, 1.0]}]},  # too large for FP32
        {"inputs": [{**_X, "data": [1.5]}]},  # fewer values than the shape says
        {"inputs": [{**_X, "shape": [0], "data": []}]},
        {"inputs": [{**_X, "shape": [], "data": [1.5]}]},
        {"inputs": [{**_X, "shape": [2.0]}]},
        {"inputs": [{**_X, "shape": [True, 2]}]},
        {"inputs": [{**_X, "name": 3}]},
        {"inputs": [_X, _X]},  # the same name twice
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}]},
        {"inputs": {"x": _X}},
        {"inputs": ["x"]},
        [_X],
    ],
)
def test_anything_else_is_left_to_the_general_path(doc: Any) -> None:
    assert _plain.decode_inputs(doc) is None


def test_the_general_path_still_words_what_the_short_path_declines() -> None:
    body = orjson.dumps({"inputs": [{**_X, "data": [1e300, 1.0]}]})
    with pytest.raises(_protocol.CodecError, match="too large for FP32"):
        _protocol.decode_infer_request(body)


def _outputs() -> list[dict[str, Any]]:
    rng = np.random.default_rng(3)
    big = rng.standard_normal((4, 6))
    return [
        {"y": rng.standard_normal((1, 10)).astype(np.float32)},
        {"y": big, "z": np.arange(6, dtype=np.int64).reshape(2, 3)},
        {"y": big.T},  # not contiguous
        {"y": big[:, ::2].astype(np.float32)},
        {"i": np.array([1, -2], dtype=np.int32), "e": np.zeros((0, 3), np.float32)},
        {"s": np.array(2.5)},  # 0-d
    ]


@pytest.mark.parametrize("outputs", _outputs())
@pytest.mark.parametrize("rid", [None, "abc"])
def test_a_common_answer_is_the_same_bytes_as_on_the_general_path(
    outputs: dict[str, np.ndarray], rid: str | None, general: Any
) -> None:
    request = _protocol.InferRequest(id=rid, inputs={})
    doc: dict[str, Any] = {"model_name": "m", "model_version": "2"}
    if rid is not None:
        doc["id"] = rid
    assert _plain.encode_outputs(doc, outputs) is not None  # (it took the short path)
    short = _protocol.encode_infer_response("m", "2", rid, outputs, request)
    long = general(_protocol.encode_infer_response, "m", "2", rid, outputs, request)
    assert short == long
    assert short[1] is None


@pytest.mark.parametrize(
    "outputs",
    [
        {"y": np.array([np.nan, 1.0], np.float32)},  # written as "NaN" by the general path
        {"y": np.array([np.inf], np.float64)},
        {"y": np.array([1, 2], np.uint8)},
        {"y": np.array([1.5], np.float16)},
        {"y": np.array([1.5], ">f4")},
        {"y": np.array(["a"], object)},
        {"y": [1.0, 2.0]},
        {"y": np.ma.masked_array([1.0])},
        {1: np.array([1.0], np.float32)},  # (a name must be a string)
    ],
)
def test_other_answers_are_left_to_the_general_path(outputs: dict[str, Any]) -> None:
    assert _plain.encode_outputs({"model_name": "m"}, outputs) is None


def test_non_finite_outputs_keep_their_json_spelling() -> None:
    outputs = {"y": np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)}
    body, _ = _protocol.encode_infer_response("m", None, None, outputs)
    assert orjson.loads(body)["outputs"][0]["data"] == ["NaN", "Infinity", "-Infinity", 1.0]


def test_answers_with_requested_or_binary_outputs_take_the_general_path() -> None:
    outputs = {"y": np.array([1.0, 2.0], np.float32), "z": np.array([3.0], np.float32)}
    request = _protocol.decode_infer_request(
        orjson.dumps({"inputs": [_X], "outputs": [{"name": "z"}]})
    )
    body, _ = _protocol.encode_infer_response("m", None, None, outputs, request)
    assert [o["name"] for o in orjson.loads(body)["outputs"]] == ["z"]
    body, length = _protocol.encode_infer_response(
        "m", None, None, outputs, None, binary_by_default=True
    )
    assert length is not None
