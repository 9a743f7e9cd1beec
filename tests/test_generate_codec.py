"""Triton's generate extension's codec (``_generate``): flat JSON to tensors fitted to the
declared shapes, other keys as parameters, flat answers; its errors."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from modelpool import TensorSpec
from modelpool._exceptions import CodecError
from modelpool._generate import decode_generate, encode_generate

SPECS = (
    TensorSpec("x", "FP32", [-1, 4]),
    TensorSpec("text_input", "BYTES", [-1]),
    TensorSpec("k", "INT64", [1]),
)


def test_keys_naming_inputs_are_tensors_fitted_to_the_declared_shape() -> None:
    body = {
        "id": "g1",
        "x": [[1, 2, 3, 4], [5, 6, 7, 8]],
        "text_input": "h\u00e9llo",
        "k": 3,
        "temperature": 0.5,
        "parameters": {"stream": False},
    }
    request = decode_generate(orjson.dumps(body), SPECS, "m")
    assert request.id == "g1"
    np.testing.assert_array_equal(
        request.inputs["x"], np.arange(1, 9, dtype=np.float32).reshape(2, 4)
    )
    assert request.inputs["x"].dtype == np.float32
    assert request.inputs["text_input"].tolist() == ["h\u00e9llo".encode()]
    assert request.inputs["k"].tolist() == [3]
    assert request.parameters == {"stream": False, "temperature": 0.5}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"[1, 2]", 'must be a JSON object like {"INPUT": value}'),
        (b"{", "not valid UTF-8 JSON"),
        (b'{"x": [1, 2, 3]}', "input 'x' has 3 values, which do not fill shape [-1, 4]"),
        (b'{"k": [1, 2]}', "input 'k' has 2 values but its shape [1] needs 1"),
        (b'{"other": [1]}', "'other' is not an input of model 'm' (its inputs: x, text_input, k)"),
        (b'{"parameters": 3}', '"parameters" must be a JSON object'),
        (b'{"x": ["a", "b", "c", "d"]}', "FP32 data must be numbers"),
    ],
)
def test_bad_requests_say_what_is_wrong(body: bytes, words: str) -> None:
    with pytest.raises(CodecError) as caught:
        decode_generate(body, SPECS, "m")
    assert words in str(caught.value)


def test_a_model_without_declared_inputs_cannot_be_called_this_way() -> None:
    with pytest.raises(CodecError, match=r"declares no inputs .* call /infer"):
        decode_generate(b'{"x": 1}', (), "m")


def test_answers_are_flat_and_single_values_bare() -> None:
    outputs = {
        "text_output": np.array([b"HELLO"], dtype=object),
        "scores": np.array([[0.5, 0.25], [1.0, 2.0]], np.float32),
    }
    answer = orjson.loads(encode_generate("m", "1", "g1", outputs))
    assert answer == {
        "model_name": "m",
        "model_version": "1",
        "id": "g1",
        "text_output": "HELLO",
        "scores": [0.5, 0.25, 1.0, 2.0],
    }
