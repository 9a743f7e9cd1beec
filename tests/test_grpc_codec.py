"""The gRPC ModelInfer codec (``_grpc_codec``) and its schema (``_grpc_schema``): raw and typed
inputs of every datatype, the errors a malformed message gets, the front's header scan, raw
answers that tritonclient reads, and the committed descriptor matching the ``.proto``."""

from __future__ import annotations

import base64
import contextlib
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from _deps import need_module
from _tensors import ALL_TYPES as SAMPLES
from modelpool import _grpc_schema
from modelpool._exceptions import CodecError
from modelpool._grpc_codec import decode_model_infer, encode_model_infer, scan_header
from modelpool._grpc_descriptor import DESCRIPTOR_SET
from modelpool._protocol import InferRequest, RequestedOutput, to_binary

TYPED_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _request(**fields: object) -> object:
    return _grpc_schema.messages().ModelInferRequest(**fields)


def _raw_request(arrays: dict[str, np.ndarray], **fields: object) -> bytes:
    request = _request(model_name="m", **fields)
    for name, array in arrays.items():
        datatype = name if name in SAMPLES else "FP32"
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(bytes(to_binary(array, datatype)))
    data: bytes = request.SerializeToString()
    return data


def _same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert got.tolist() == want.tolist()


def test_raw_inputs_of_every_datatype_decode_writable() -> None:
    decoded = decode_model_infer(_raw_request(SAMPLES, id="r1"))
    assert decoded.id == "r1"
    assert decoded.outputs is None
    for name, array in SAMPLES.items():
        got = decoded.inputs[name]
        _same(got, array)
        assert got.flags.writeable, name
        if name != "BYTES":
            assert got.dtype == array.dtype


@pytest.mark.parametrize("datatype", sorted(TYPED_FIELD))
def test_typed_contents_of_every_datatype_decode(datatype: str) -> None:
    array = SAMPLES[datatype]
    request = _request(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=array.shape)
    getattr(tensor.contents, TYPED_FIELD[datatype]).extend(array.reshape(-1).tolist())
    decoded = decode_model_infer(request.SerializeToString())
    _same(decoded.inputs["x"], array)


@pytest.mark.parametrize(
    ("datatype", "value", "words"),
    [
        ("INT8", 128, "INT8 data must be integers in [-128, 127]"),
        ("UINT16", 70000, "UINT16 data must be integers in [0, 65535]"),
    ],
)
def test_narrow_typed_integers_are_range_checked(datatype: str, value: int, words: str) -> None:
    request = _request(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[1])
    getattr(tensor.contents, TYPED_FIELD[datatype]).append(value)
    with pytest.raises(CodecError, match=re.escape(words)):
        decode_model_infer(request.SerializeToString())


def _bad(build: object) -> str:
    request = _request(model_name="m")
    build(request)  # type: ignore[operator]
    with pytest.raises(CodecError) as caught:
        decode_model_infer(request.SerializeToString())
    return str(caught.value)


def test_malformed_requests_are_codec_errors_that_say_what_to_do() -> None:
    def fp16_typed(r: object) -> None:
        r.inputs.add(name="x", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)  # type: ignore[attr-defined]

    assert "FP16 has no typed contents field; send it in raw_input_contents" in _bad(fp16_typed)

    def wrong_field(r: object) -> None:
        r.inputs.add(name="x", datatype="FP32", shape=[1]).contents.int_contents.append(1)  # type: ignore[attr-defined]

    assert "contents are in int_contents, but datatype FP32 takes fp32_contents" in _bad(
        wrong_field
    )

    def count(r: object) -> None:
        r.inputs.add(name="x", datatype="FP32", shape=[2, 2]).contents.fp32_contents.append(1.0)  # type: ignore[attr-defined]

    assert "fp32_contents has 1 values but shape [2, 2] needs 4" in _bad(count)

    def no_data(r: object) -> None:
        r.inputs.add(name="x", datatype="FP32", shape=[2])  # type: ignore[attr-defined]

    assert "has no data; send it in raw_input_contents or contents" in _bad(no_data)

    def both(r: object) -> None:
        r.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)  # type: ignore[attr-defined]
        r.raw_input_contents.append(b"\0\0\0\0")  # type: ignore[attr-defined]

    assert "has both contents and raw_input_contents" in _bad(both)

    def raw_count(r: object) -> None:
        r.inputs.add(name="x", datatype="FP32", shape=[1])  # type: ignore[attr-defined]
        r.inputs.add(name="y", datatype="FP32", shape=[1])  # type: ignore[attr-defined]
        r.raw_input_contents.append(b"\0\0\0\0")  # type: ignore[attr-defined]

    assert "1 raw_input_contents for 2 inputs" in _bad(raw_count)

    def raw_size(r: object) -> None:
        r.inputs.add(name="x", datatype="FP32", shape=[2])  # type: ignore[attr-defined]
        r.raw_input_contents.append(b"\0\0\0\0")  # type: ignore[attr-defined]

    assert "raw_input_contents has 4 bytes but shape [2] of FP32 needs 8" in _bad(raw_size)

    def datatype(r: object) -> None:
        r.inputs.add(name="x", datatype="FP8", shape=[0])  # type: ignore[attr-defined]

    assert "datatype 'FP8' is not supported; use one of BOOL" in _bad(datatype)

    def twice(r: object) -> None:
        for _ in range(2):
            r.inputs.add(name="x", datatype="FP32", shape=[0])  # type: ignore[attr-defined]

    assert "input 'x' appears twice" in _bad(twice)

    def output_twice(r: object) -> None:
        r.outputs.add(name="y")  # type: ignore[attr-defined]
        r.outputs.add(name="y")  # type: ignore[attr-defined]

    assert "requested output 'y' appears twice" in _bad(output_twice)

    with pytest.raises(CodecError, match="is not a ModelInferRequest message"):
        decode_model_infer(b"\xff\xff\xff")


def test_bytes_in_raw_contents_are_length_prefixed() -> None:
    request = _request(model_name="m")
    request.inputs.add(name="x", datatype="BYTES", shape=[2])
    request.raw_input_contents.append(b"\x02\0\0\0ab\x09\0\0\0c")  # the second says 9, has 1
    with pytest.raises(CodecError, match="a BYTES element says it has 9 bytes but only 1 remain"):
        decode_model_infer(request.SerializeToString())


def test_scan_header_reads_only_name_version_and_id() -> None:
    body = _raw_request({"x": np.ones((4, 4), np.float32)}, model_version="2", id="abc")
    assert scan_header(body) == ("m", "2", "abc")
    assert scan_header(b"") == ("", "", "")
    with pytest.raises(CodecError, match="not a ModelInferRequest"):
        scan_header(b"\x0a\x05ab")  # a name that says 5 bytes and has 2
    with pytest.raises(CodecError, match="not a ModelInferRequest"):
        scan_header(b"\x0f")  # wire type 7 does not exist


@given(st.text(), st.text(), st.text(), st.lists(st.binary(), max_size=3))
def test_scan_header_reads_what_protobuf_wrote(
    name: str, version: str, rid: str, raw: list[bytes]
) -> None:
    request = _request(model_name=name, model_version=version, id=rid, raw_input_contents=raw)
    request.parameters["k"].int64_param = -1  # (a varint field inside a nested message)
    assert scan_header(request.SerializeToString()) == (name, version, rid)


@given(st.binary(max_size=64))
def test_scan_header_fails_on_garbage_with_a_codec_error_only(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        scan_header(data)


def test_the_answer_is_raw_in_the_requested_order_and_tritonclient_reads_it() -> None:
    grpcclient = need_module("tritonclient.grpc")
    outputs = dict(SAMPLES)
    request = InferRequest(
        id=None, inputs={}, outputs=[RequestedOutput("INT8"), RequestedOutput("BYTES")]
    )
    data = encode_model_infer("m", "1", "r9", outputs, request)
    response = grpcclient.service_pb2.ModelInferResponse.FromString(data)
    assert [o.name for o in response.outputs] == ["INT8", "BYTES"]
    assert len(response.raw_output_contents) == 2
    result = grpcclient.InferResult(response)
    _same(result.as_numpy("INT8"), SAMPLES["INT8"])
    _same(result.as_numpy("BYTES"), SAMPLES["BYTES"])
    every = grpcclient.InferResult(
        grpcclient.service_pb2.ModelInferResponse.FromString(
            encode_model_infer("m", None, None, outputs)
        )
    )
    for name, array in SAMPLES.items():
        _same(every.as_numpy(name), array)
    with pytest.raises(CodecError, match="model 'm' has no output 'nope'"):
        encode_model_infer(
            "m", None, None, outputs, InferRequest(None, {}, [RequestedOutput("nope")])
        )


def test_the_committed_descriptor_matches_the_proto() -> None:
    """``_grpc_descriptor.py`` is what the ``.proto`` compiles to (regenerate it after an
    edit: ``modelpool._grpc_schema.regenerate()``)."""
    need_module("grpc_tools")
    assert base64.b64decode(DESCRIPTOR_SET) == _grpc_schema.compile_descriptor()


def test_the_messages_live_in_a_private_pool_beside_tritonclients() -> None:
    """tritonclient's ``inference.*`` messages and modelpool's coexist in one process (two
    copies in protobuf's default pool would fail with 'duplicate symbol')."""
    grpcclient = need_module("tritonclient.grpc")
    ours = _grpc_schema.messages()
    theirs = grpcclient.service_pb2.ModelInferRequest(model_name="m", id="x")
    again = ours.ModelInferRequest.FromString(theirs.SerializeToString())
    assert (again.model_name, again.id) == ("m", "x")
    assert ours.ModelInferRequest.DESCRIPTOR.file.pool is not theirs.DESCRIPTOR.file.pool
