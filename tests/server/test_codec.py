"""The Open Inference Protocol codec: round trips, every error path, fuzzing, real clients."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _deps import need_installed, need_module
from _scripts import RESULT, run_script
from modelpool._compression import decompress
from modelpool._exceptions import BodyTooLarge
from modelpool._protocol import (
    CodecError,
    InferRequest,
    RequestedOutput,
    UnsupportedDatatypeError,
    datatype_of,
    decode_infer_request,
    decode_infer_response,
    encode_infer_request,
    encode_infer_response,
)

SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "INT8": np.array([[-128, 0, 127]], dtype=np.int8),
    "INT16": np.array([-(2**15), 2**15 - 1], dtype=np.int16),
    "INT32": np.array([[-(2**31)], [2**31 - 1]], dtype=np.int32),
    "INT64": np.array([-(2**63), 2**63 - 1, 0], dtype=np.int64),
    "UINT8": np.array([0, 255], dtype=np.uint8),
    "UINT16": np.array([0, 2**16 - 1], dtype=np.uint16),
    "UINT32": np.array([0, 2**32 - 1], dtype=np.uint32),
    "UINT64": np.array([0, 2**64 - 1], dtype=np.uint64),
    "FP16": np.array([[0.5, -1.25], [65504, 1e-3]], dtype=np.float16),
    "FP32": np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7,
    "FP64": np.array([1e-300, -1e300, 0.1], dtype=np.float64),
    "BYTES": np.array([[b"", b"abc"], ["h\u00e9llo".encode(), b"\x00\x01"]], dtype=object),
}
JSON_BYTES = np.array([[b"", b"abc"], ["h\u00e9llo".encode(), b"x"]], dtype=object)


def _sample(datatype: str, binary: bool) -> np.ndarray:
    return JSON_BYTES if datatype == "BYTES" and not binary else SAMPLES[datatype]


def _body(doc: dict[str, Any], *binary: bytes) -> tuple[bytes, int | None]:
    header = json.dumps(doc).encode()
    return header + b"".join(binary), (len(header) if binary else None)


def _input(name: str = "x", **fields: Any) -> dict[str, Any]:
    return {"name": name, "datatype": "FP32", "shape": [2], **fields}


def _as_bytes(array: np.ndarray) -> np.ndarray:
    """Clients hand back JSON BYTES as str; make them bytes to compare."""
    if array.dtype != object:
        return array
    items = [x.encode() if isinstance(x, str) else x for x in array.ravel().tolist()]
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out.reshape(array.shape)


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert got.dtype == (np.dtype(object) if want.dtype.kind in "OSU" else want.dtype)
    assert got.flags.writeable
    np.testing.assert_array_equal(got, want)


# -- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_request_round_trip(datatype: str, binary: bool) -> None:
    array = _sample(datatype, binary)
    body, length = encode_infer_request({"t": array}, binary=binary, request_id="r1")
    assert (length is not None) == binary
    request = decode_infer_request(body, length)
    assert request.id == "r1"
    assert request.binary_default is binary
    assert datatype_of(array) == datatype
    _assert_same(request.inputs["t"], array)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_response_round_trip(datatype: str, binary: bool) -> None:
    array = _sample(datatype, binary)
    request = InferRequest(id=None, inputs={}, binary_default=binary)
    body, length = encode_infer_response("m", "2", "r", {"out": array}, request)
    assert (length is not None) == binary
    doc = json.loads(body[:length])
    assert doc["model_name"] == "m"
    assert doc["model_version"] == "2"
    assert doc["id"] == "r"
    _assert_same(decode_infer_response(bytearray(body), length)["out"], array)
    _assert_same(decode_infer_response(body, length)["out"], array)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_many_tensors_scalars_and_empty(binary: bool) -> None:
    arrays = {
        "scalar": np.array(3.5, dtype=np.float64),
        "empty": np.zeros((0, 3), dtype=np.int32),
        "empty_bytes": np.empty((2, 0), dtype=object),
        "flags": np.array([True]),
        "half": np.array([1, 2, 3], dtype=np.float16),
        "wide": np.arange(5, dtype=np.float64),
    }
    body, length = encode_infer_request(arrays, binary=binary)
    request = decode_infer_request(body, length)
    assert list(request.inputs) == list(arrays)
    for name, array in arrays.items():
        _assert_same(request.inputs[name], array)


def test_json_data_may_be_nested_or_flat() -> None:
    nested = [[1, 2, 3], [4, 5, 6]]
    for data in (nested, [1, 2, 3, 4, 5, 6]):
        doc = {"inputs": [_input(data=data, shape=[2, 3], datatype="INT32")]}
        got = decode_infer_request(*_body(doc)).inputs["x"]
        _assert_same(got, np.array(nested, dtype=np.int32))
    doc = {"inputs": [_input(data=[["a", "b"], ["c", "d"]], shape=[2, 2], datatype="BYTES")]}
    got = decode_infer_request(*_body(doc)).inputs["x"]
    assert got.tolist() == [[b"a", b"b"], [b"c", b"d"]]
    doc = {"inputs": [_input(data=7, shape=[], datatype="INT64")]}
    assert decode_infer_request(*_body(doc)).inputs["x"] == np.int64(7)


def test_non_finite_floats_in_json() -> None:
    array = np.array([np.nan, np.inf, -np.inf, 1.5], dtype=np.float32)
    body, _ = encode_infer_response("m", None, None, {"y": array}, None)
    assert json.loads(body)["outputs"][0]["data"] == ["NaN", "Infinity", "-Infinity", 1.5]
    np.testing.assert_array_equal(decode_infer_response(body)["y"], array)
    for text in (
        b'["NaN", "Infinity", "-Infinity", 1.5]',
        b"[NaN, Infinity, -Infinity, 1.5]",  # what Python's json and rapidjson write
    ):
        doc = b'{"inputs": [{"name": "x", "datatype": "FP64", "shape": [4], "data": %s}]}' % text
        got = decode_infer_request(doc).inputs["x"]
        np.testing.assert_array_equal(got, array.astype(np.float64))
    doc = {"inputs": [_input(data=[None, 2.0])]}  # orjson writes NaN as null
    assert np.isnan(decode_infer_request(*_body(doc)).inputs["x"][0])


def test_requested_outputs_and_binary_precedence() -> None:
    doc = {
        "id": "abc",
        "inputs": [_input(data=[1, 2])],
        "outputs": [
            {"name": "a", "parameters": {"binary_data": True}},
            {"name": "b", "parameters": {"binary_data": False}},
            {"name": "c"},
        ],
        "parameters": {"binary_data_output": False, "priority": 3},
    }
    request = decode_infer_request(*_body(doc))
    assert request.outputs == [
        RequestedOutput("a", True),
        RequestedOutput("b", False),
        RequestedOutput("c", None),
    ]
    assert request.binary_default is False
    assert request.parameters["priority"] == 3
    outs = {name: np.arange(3, dtype=np.float32) for name in "abcd"}
    body, length = encode_infer_response("m", None, request.id, outs, request, True)
    sent = {o["name"]: "data" not in o for o in json.loads(body[:length])["outputs"]}
    assert sent == {"a": True, "b": False, "c": False}  # request default beats server default
    request.binary_default = None
    body, length = encode_infer_response("m", None, None, outs, request, True)
    sent = {o["name"]: "data" not in o for o in json.loads(body[:length])["outputs"]}
    assert sent == {"a": True, "b": False, "c": True}
    request.outputs = [RequestedOutput("nope")]
    with pytest.raises(CodecError, match="has no output 'nope'; its outputs are 'a', 'b'"):
        encode_infer_response("m", None, None, outs, request)
    empty = decode_infer_request(*_body({"inputs": [], "outputs": []}))
    assert empty.outputs is None
    assert empty.binary_default is None


def test_zero_copy_from_a_writable_body_and_one_copy_otherwise() -> None:
    array = np.arange(1000, dtype=np.float64)
    body, length = encode_infer_request({"x": array})
    assert length is not None
    assert length % 64 == 0  # the JSON part is padded so binary tensors start aligned
    owned = bytearray(body)
    got = decode_infer_request(owned, length).inputs["x"]
    assert np.shares_memory(got, np.frombuffer(owned, dtype=np.uint8))
    got = decode_infer_request(memoryview(owned), length).inputs["x"]
    assert np.shares_memory(got, np.frombuffer(owned, dtype=np.uint8))
    copied = decode_infer_request(body, length).inputs["x"]
    assert copied.flags.writeable
    assert not np.shares_memory(copied, np.frombuffer(body, dtype=np.uint8))
    copied[0] = 5.0
    np.testing.assert_array_equal(copied[1:], array[1:])
    # a misaligned tensor is copied once into aligned memory
    doc = {"inputs": [{"name": "x", "datatype": "FP64", "shape": [3], "parameters": {}}]}
    doc["inputs"][0]["parameters"]["binary_data_size"] = 24
    header = json.dumps(doc).encode() + b" " * 3
    misaligned = bytearray(b"\0" + header + np.arange(3.0).tobytes())[1:]
    got = decode_infer_request(misaligned, len(header)).inputs["x"]
    assert got.flags.aligned
    assert got.flags.writeable
    np.testing.assert_array_equal(got, np.arange(3.0))


def test_triton_byte_layout() -> None:
    body, length = encode_infer_request({"s": np.array([b"ab", b""], dtype=object)})
    assert body[length:] == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)
    body, length = encode_infer_request({"h": np.array([1.0, -2.0], dtype=">f2")})
    assert body[length:] == np.array([1.0, -2.0], dtype="<f2").tobytes()


def test_datatype_of() -> None:
    assert datatype_of(np.array(["a"])) == "BYTES"
    assert datatype_of(np.array([b"a"])) == "BYTES"
    assert datatype_of(np.zeros(2, dtype=">i4")) == "INT32"
    for bad in (np.zeros(2, dtype=np.complex64), np.array(["2020-01-01"], dtype="M8[D]")):
        with pytest.raises(UnsupportedDatatypeError, match="has no Open Inference Protocol"):
            datatype_of(bad)


def test_bytes_encoding_rules() -> None:
    mixed = np.array([b"raw", "text", 7], dtype=object)
    body, length = encode_infer_request({"s": mixed})
    got = decode_infer_request(body, length).inputs["s"]
    assert got.tolist() == [b"raw", b"text", b"7"]
    with pytest.raises(CodecError, match="not UTF-8 and cannot be sent as JSON"):
        encode_infer_response("m", None, None, {"s": np.array([b"\xff"], dtype=object)}, None)


def test_unencodable_id_is_a_codec_error() -> None:
    body = b'{"id": "\\ud800", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], '
    body += b'"data": [NaN]}]}'  # NaN sends decoding to the stdlib, which allows lone surrogates
    request = decode_infer_request(body)
    with pytest.raises(CodecError, match="not valid UTF-8"):
        encode_infer_response("m", None, request.id, {"y": np.zeros(1)}, request)


def test_codec_errors_are_modelpool_errors_and_keep_their_builtin_bases() -> None:
    import modelpool
    from modelpool import client

    for cls, builtin in [
        (CodecError, ValueError),
        (BodyTooLarge, ValueError),
        (UnsupportedDatatypeError, TypeError),
        (client.ServerTimeoutError, TimeoutError),
    ]:
        assert issubclass(cls, modelpool.ModelpoolError), cls
        assert issubclass(cls, builtin), cls
    assert issubclass(BodyTooLarge, CodecError)
    assert client.ServerError is modelpool.ServerError
    assert issubclass(client.ServerTimeoutError, client.ServerError)


def test_an_error_answer_decodes_to_its_message() -> None:
    body = json.dumps({"error": "model is gone \u00e9"}).encode()
    with pytest.raises(CodecError, match="model is gone \u00e9"):
        decode_infer_response(body)


# -- compression --------------------------------------------------------------------------------


PAYLOAD = b'{"inputs": []}' * 1000


def _gzip(data: bytes, compresslevel: int = 9) -> bytes:
    """gzip without a timestamp: the same bytes (so the same test ids) in every test process."""
    return gzip.compress(data, compresslevel=compresslevel, mtime=0)


@pytest.mark.parametrize(
    ("encoding", "compressed"),
    [
        (None, PAYLOAD),
        ("identity", PAYLOAD),
        ("gzip", _gzip(PAYLOAD)),
        ("GZIP", _gzip(PAYLOAD[:7]) + _gzip(PAYLOAD[7:])),  # two members
        ("x-gzip", _gzip(PAYLOAD)),
        ("deflate", zlib.compress(PAYLOAD)),
        ("deflate", zlib.compress(PAYLOAD)[2:-4]),  # raw deflate, as some clients send
        ("deflate, gzip", _gzip(zlib.compress(PAYLOAD))),
    ],
)
def test_decompress(encoding: str | None, compressed: bytes) -> None:
    assert bytes(decompress(compressed, encoding, len(PAYLOAD))) == PAYLOAD


def test_decompressed_body_decodes_without_copy() -> None:
    body, length = encode_infer_request({"x": np.arange(100, dtype=np.int64)})
    plain = decompress(_gzip(body), "gzip", 10_000)
    assert isinstance(plain, bytearray)
    got = decode_infer_request(plain, length).inputs["x"]
    assert np.shares_memory(got, np.frombuffer(plain, dtype=np.uint8))


def test_decompression_bomb_stops_at_the_limit() -> None:
    bomb = _gzip(b"\0" * 200_000_000, compresslevel=9)  # ~200 KB
    assert len(bomb) < 1_000_000
    with pytest.raises(BodyTooLarge, match="more than 1000000 bytes"):
        decompress(bomb, "gzip", 1_000_000)
    with pytest.raises(BodyTooLarge):
        decompress(zlib.compress(b"\0" * 5_000_000), "deflate", 1000)
    with pytest.raises(BodyTooLarge, match="the limit is 10 bytes"):
        decompress(b"x" * 11, "identity", 10)


@pytest.mark.parametrize(
    ("encoding", "body", "match"),
    [
        ("br", b"x", "unsupported Content-Encoding 'br'"),
        ("gzip", b"", "truncated"),
        ("gzip", _gzip(PAYLOAD)[:-9], "truncated"),
        ("gzip", b"not gzip at all", "not valid gzip data"),
        ("gzip", _gzip(b"ab") + b"junk", "not valid gzip data"),
        ("deflate", zlib.compress(b"ab") + b"junk", "4 stray bytes"),
        ("deflate", b"\x78\x9c\xff\xff", "not valid deflate data"),
    ],
)
def test_decompress_errors(encoding: str, body: bytes, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decompress(body, encoding, 1 << 20)


# -- decoding errors ----------------------------------------------------------------------------


F32 = np.arange(2, dtype=np.float32).tobytes()
BIN = {"binary_data_size": 8}
REQUEST_ERRORS: list[tuple[bytes, Any, str]] = [
    (b"", None, "not valid UTF-8 JSON"),
    (b"{", None, "not valid UTF-8 JSON"),
    (b'{"inputs": []}\xff', None, "not valid UTF-8 JSON"),
    (b"[1]", None, 'the request must be a JSON object like {"inputs"'),
    (b"{}", None, '"inputs" must be a list'),
    (b'{"inputs": [1]}', None, 'input #0 must be an object with a string "name"'),
    (*_body({"inputs": [_input(data=[1, 2]), _input(data=[1, 2])]}), "appears twice"),
    (*_body({"inputs": [_input(datatype="BF16", data=[1, 2])]}), "datatype 'BF16' is not"),
    (*_body({"inputs": [_input(shape=[-1], data=[1, 2])]}), "shape must hold integers >= 0"),
    (*_body({"inputs": [_input(shape=[True], data=[1])]}), "shape must hold integers"),
    (*_body({"inputs": [_input(shape="2", data=[1, 2])]}), "shape must be a list"),
    (*_body({"inputs": [_input(shape=[1] * 33, data=[1])]}), "at most 32 integers"),
    (*_body({"inputs": [_input(shape=[0, 2**30, 2**30], data=[])]}), "too large for any"),
    (*_body({"inputs": [_input()]}), 'neither "data" nor parameters.binary_data_size'),
    (*_body({"inputs": [_input(data=[1, 2], parameters=[])]}), "parameters must be an object"),
    (*_body({"inputs": [_input(parameters={"shared_memory_region": "r"})]}), "shared memory"),
    (*_body({"inputs": [_input(data=[1, 2, 3])]}), "data has 3 values but shape"),
    (*_body({"inputs": [_input(data=[[1], [2]])]}), "nested as \\[2, 1\\] but shape"),
    (*_body({"inputs": [_input(data=[[1, 2], [3]], shape=[2, 2])]}), "same length"),
    (*_body({"inputs": [_input(data=[1, "x"])]}), "must be numbers"),
    (*_body({"inputs": [_input(data=[True, False])]}), "FP32 data must be numbers"),
    (*_body({"inputs": [_input(data=[{}, 1])]}), "must be numbers"),
    (*_body({"inputs": [_input(data=[1e300, 1])]}), "too large for FP32"),
    (*_body({"inputs": [_input(data=[10**400, 1])]}), "must be numbers"),
    (*_body({"inputs": [_input(name="n" * 1000, data=[1])]}), "input 'nnnnn.*\\.\\.\\.: data"),
    (*_body({"inputs": [_input(data=[7e4, 1], datatype="FP16")]}), "too large for FP16"),
    (*_body({"inputs": [_input(data=[1, 2], datatype="BOOL")]}), "JSON true/false"),
    (*_body({"inputs": [_input(data=[1.5, 2], datatype="INT32")]}), "integers in"),
    (*_body({"inputs": [_input(data=[128, 2], datatype="INT8")]}), "\\[-128, 127\\]"),
    (*_body({"inputs": [_input(data=[-1, 2], datatype="UINT64")]}), "integers in"),
    (*_body({"inputs": [_input(data=[2**64, 2], datatype="UINT64")]}), "integers in"),
    (*_body({"inputs": [_input(data=[2**70, 2], datatype="INT64")]}), "integers in"),
    (*_body({"inputs": [_input(data=[None, 2], datatype="INT64")]}), "integers in"),
    (*_body({"inputs": [_input(data=["a", 2], datatype="BYTES")]}), "must be UTF-8 strings"),
    (*_body({"inputs": [_input(data=["a"], datatype="BYTES")]}), "data has 1 values"),
    (*_body({"inputs": [_input(data=[["a"], ["b"]], datatype="BYTES")]}), "nested exactly"),
    (*_body({"inputs": [_input(data=["\ud800", "b"], datatype="BYTES")]}), "UTF-8 strings"),
    (*_body({"inputs": [_input(parameters=BIN)]}), "no Inference-Header-Content-Length"),
    (*_body({"inputs": [_input(data=[1, 2], parameters=BIN)]}, F32), "both"),
    (*_body({"inputs": [_input(parameters={"binary_data_size": -1})]}, F32), "integer >= 0"),
    (*_body({"inputs": [_input(parameters={"binary_data_size": 1.0})]}, F32), "integer >= 0"),
    (*_body({"inputs": [_input(parameters={"binary_data_size": 12})]}, F32), "only 8 bytes"),
    (*_body({"inputs": [_input(parameters={"binary_data_size": 4})]}, F32), "needs 8"),
    (*_body({"inputs": [_input(parameters=BIN)]}, F32, b"!"), "1 bytes after the last"),
    (*_body({"inputs": [_input(data=[1, 2])]}, b"!"), "1 bytes after the last"),
    (
        *_body(
            {"inputs": [_input(datatype="BOOL", parameters={"binary_data_size": 2})]}, b"\x01\x02"
        ),
        "bytes 0 or 1",
    ),
    (
        *_body(
            {"inputs": [_input(datatype="BYTES", parameters={"binary_data_size": 6})]},
            struct.pack("<I", 5) + b"ab",
        ),
        "says it has 5 bytes but only 2 remain",
    ),
    (
        *_body(
            {"inputs": [_input(datatype="BYTES", parameters={"binary_data_size": 6})]},
            struct.pack("<I", 0) + b"ab",
        ),
        "ends inside an element's 4-byte length",
    ),
    (
        *_body(
            {"inputs": [_input(datatype="BYTES", parameters={"binary_data_size": 12})]},
            struct.pack("<III", 0, 0, 0),
        ),
        "more than the 2 elements",
    ),
    (
        *_body(
            {"inputs": [_input(datatype="BYTES", parameters={"binary_data_size": 4})]},
            struct.pack("<I", 0),
        ),
        "has 1 elements, shape needs 2",
    ),
    (b'{"inputs": []}', "x1", "must be a byte count"),
    (b'{"inputs": []}', "\u00b2", "must be a byte count"),
    (b'{"inputs": []}', "99", "Content-Length is 99"),
    (b'{"inputs": [], "id": 5}', None, '"id" must be a string'),
    (b'{"inputs": [], "parameters": [1]}', None, "request: parameters must be an object"),
    (b'{"inputs": [], "parameters": {"binary_data_output": 1}}', None, "true or false"),
    (b'{"inputs": [], "outputs": {}}', None, '"outputs" must be a list'),
    (b'{"inputs": [], "outputs": [{}]}', None, "output #0 must be an object with a string"),
    (*_body({"inputs": [], "outputs": [{"name": "a", "parameters": 1}]}), "must be an object"),
    (*_body({"inputs": [], "outputs": [{"name": "a"}, {"name": "a"}]}), "appears twice"),
    (
        *_body({"inputs": [], "outputs": [{"name": "a", "parameters": {"binary_data": 1}}]}),
        "binary_data must be true or false",
    ),
    (
        *_body({"inputs": [], "outputs": [{"name": "a", "parameters": {"classification": 3}}]}),
        "classification is not supported",
    ),
    (b"[" * 100_000 + b"]" * 100_000, None, "not valid UTF-8 JSON"),
]


@pytest.mark.parametrize(("body", "length", "match"), REQUEST_ERRORS)
def test_request_errors(body: bytes, length: Any, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode_infer_request(body, length)


@pytest.mark.parametrize(
    ("body", "match"),
    [(b"[]", "must be a JSON object"), (b"{}", '"outputs" must be a list'), (b"{", "JSON")],
)
def test_response_errors(body: bytes, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode_infer_response(body)


# -- fuzzing ------------------------------------------------------------------------------------

VALID_BODIES = [
    encode_infer_request({"x": SAMPLES[t], "s": SAMPLES["BYTES"]}, binary=b, outputs=o)
    for t in ("FP32", "INT8", "BOOL", "FP16", "UINT64")
    for b in (True, False)
    for o in (None, ["y"])
    if b or t != "FP16"
]


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    _containers,
    max_leaves=12,
)
tensor = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "y", ""]) | json_values,
        "datatype": st.sampled_from(["FP32", "BYTES", "BOOL", "INT8", "UINT64", "FP16", "X"]),
        "shape": st.lists(st.integers(-1, 3), max_size=3) | json_values,
    },
    optional={
        "data": json_values,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-2, 9)})
        | json_values,
    },
)
FUZZ = settings(
    max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ
@given(st.binary(max_size=300), st.none() | st.integers(-5, 400) | st.text(max_size=4))
def test_fuzz_random_bytes(body: bytes, length: Any) -> None:
    try:
        decode_infer_request(body, length)
    except CodecError:
        pass


@FUZZ
@given(
    st.sampled_from(VALID_BODIES),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    st.integers(0, 10_000),
    st.integers(-3, 3),
)
def test_fuzz_mutated_bodies(
    valid: tuple[bytes, int | None], flips: list[tuple[int, int]], cut: int, shift: int
) -> None:
    body, length = valid
    mutated = bytearray(body[: max(cut, len(body) // 2)])
    for position, value in flips:
        if mutated:
            mutated[position % len(mutated)] = value
    new_length = None if length is None else length + shift
    for candidate in (bytes(mutated), mutated):
        try:
            decode_infer_request(candidate, new_length)
            decode_infer_response(candidate, new_length)
        except CodecError:
            pass


@FUZZ
@given(
    st.lists(tensor, max_size=3),
    json_values,
    st.binary(max_size=40),
    st.booleans(),
)
def test_fuzz_structured_requests(
    inputs: list[dict[str, Any]], outputs: Any, tail: bytes, with_length: bool
) -> None:
    doc = {"inputs": inputs, "outputs": outputs, "parameters": {"binary_data_output": True}}
    header = json.dumps(doc).encode()
    try:
        request = decode_infer_request(header + tail, len(header) if with_length else None)
    except CodecError:
        return
    for array in request.inputs.values():
        assert array.flags.writeable


def _paths(node: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) in a JSON document, to replace one value."""
    found: list[tuple[Any, Any]] = []
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        found.append((node, key))
        if isinstance(value, dict | list):
            found += _paths(value)
    return found


@FUZZ
@given(
    st.sampled_from(VALID_BODIES),
    st.lists(st.tuples(st.integers(0, 1000), json_values), min_size=1, max_size=3),
    st.integers(-2, 2),
)
def test_fuzz_mutated_documents(
    valid: tuple[bytes, int | None], edits: list[tuple[int, Any]], shift: int
) -> None:
    body, length = valid
    doc = json.loads(body[:length])
    for where, value in edits:
        paths = _paths(doc)
        container, key = paths[where % len(paths)]
        container[key] = value
    header = json.dumps(doc).encode()
    tail = body[length:] if length is not None else b""
    new_length = None if length is None else len(header) + shift
    try:
        decode_infer_request(header + tail, new_length)
    except CodecError:
        pass


@FUZZ
@given(
    st.binary(max_size=200) | st.sampled_from([gzip.compress(PAYLOAD), zlib.compress(PAYLOAD)]),
    st.sampled_from(["gzip", "deflate", "identity", "gzip, deflate", "zstd", ""]),
    st.integers(0, 10_000),
)
def test_fuzz_decompress(body: bytes, encoding: str, cut: int) -> None:
    try:
        decompress(body[: max(cut, 1)], encoding, 5000)
    except CodecError:
        pass


# -- real clients -------------------------------------------------------------------------------


def _triton_inputs(binary: bool) -> tuple[list[Any], dict[str, np.ndarray]]:
    http = need_module("tritonclient.http")
    inputs, arrays = [], {}
    for datatype in SAMPLES:
        array = _sample(datatype, binary)
        tensor = http.InferInput(f"in_{datatype}", list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
        arrays[f"in_{datatype}"] = array
    return inputs, arrays


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_requests_decode(binary: bool) -> None:
    utils = need_module("tritonclient.http._utils")
    http = need_module("tritonclient.http")
    inputs, arrays = _triton_inputs(binary)
    wanted = [http.InferRequestedOutput("o1", binary_data=False), http.InferRequestedOutput("o2")]
    body, length = utils._get_inference_request(
        inputs, "req-7", wanted, 0, False, False, 0, None, {"custom": 1}
    )
    request = decode_infer_request(body, length)
    assert request.id == "req-7"
    assert request.outputs == [RequestedOutput("o1", False), RequestedOutput("o2", True)]
    assert request.parameters == {"custom": 1}
    for name, array in arrays.items():
        _assert_same(request.inputs[name], array)
    body, length = utils._get_inference_request(inputs, "", None, 0, False, False, 0, None, None)
    assert decode_infer_request(body, length).binary_default is True


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_parses_responses(binary: bool) -> None:
    http = need_module("tritonclient.http")
    outputs = {datatype: _sample(datatype, binary) for datatype in SAMPLES}
    outputs["special"] = np.array([np.nan, np.inf, -np.inf], dtype=np.float32)
    request = InferRequest(id=None, inputs={}, binary_default=binary)
    body, length = encode_infer_response("m", "1", "id-1", outputs, request)
    result = http.InferResult.from_response_body(body, header_length=length)
    assert result.get_response()["id"] == "id-1"
    for name, array in outputs.items():
        _assert_same(_as_bytes(np.array(result.as_numpy(name))), array)
    compressed = http.InferResult.from_response_body(
        gzip.compress(body), header_length=length, content_encoding="gzip"
    )
    _assert_same(np.array(compressed.as_numpy("FP32")), outputs["FP32"])


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_kserve_interop(binary: bool) -> None:
    """KServe's own codec against ours, in a child interpreter (``kserve_interop``): KServe's
    protocol messages and tritonclient.grpc's clash in one process, and other tests here load
    the latter."""
    need_installed("kserve")
    code = f"""
        import sys
        sys.path.insert(0, "server")
        import test_codec
        test_codec.kserve_interop(sys.argv[1] == "binary")
        print({RESULT!r} + "true")
    """
    assert run_script(code, "binary" if binary else "json", timeout=120) is True


def kserve_interop(binary: bool) -> None:
    """Requests KServe's client encodes decode here, our answers decode there (every
    datatype, binary or JSON)."""
    import kserve.protocol.infer_type as infer_type

    arrays = {
        t: _sample(t, binary) for t in SAMPLES if binary or t != "FP16"
    }  # kserve: no FP16 JSON
    kinputs = []
    for name, array in arrays.items():
        tensor = infer_type.InferInput(name, list(array.shape), name)
        tensor.set_data_from_numpy(array, binary_data=binary)
        kinputs.append(tensor)
    krequest = infer_type.InferRequest("m", kinputs, request_id="k1")
    body, length = krequest.to_rest()
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    request = decode_infer_request(body, length)
    assert request.id == "k1"
    for name, array in arrays.items():
        _assert_same(request.inputs[name], array)

    outputs = {**arrays, "special": np.array([np.nan, np.inf, -np.inf, 2.0])}
    ours = InferRequest(id=None, inputs={}, binary_default=binary)
    body, length = encode_infer_response("m", None, "k1", outputs, ours)
    response = infer_type.InferResponse.from_bytes(body, len(body) if length is None else length)
    assert response.model_name == "m"
    assert response.id == "k1"
    for name, array in outputs.items():
        got = response.get_output_by_name(name).as_numpy()
        _assert_same(_as_bytes(got).reshape(array.shape), array)
