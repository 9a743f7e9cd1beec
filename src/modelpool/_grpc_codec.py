"""The Open Inference Protocol's gRPC ``ModelInfer`` messages, decoded and encoded.

Pure functions over bytes, like ``_protocol`` (the REST codec), and run where it runs: in the
worker, so that the server's front process does no tensor or protobuf work on the hot path.
The front reads only a request's model name, version and id, with ``scan_header``: a walk over
the message's top-level fields that costs microseconds even for a 64 MiB message.

A request's inputs come either raw (``raw_input_contents``: one entry per input, in order,
the bytes of the REST binary extension) or typed (``contents``: the datatype's field; 8- and
16-bit integers in the 32-bit fields, range-checked here). FP16 has no typed field. The answer
is always raw, one ``raw_output_contents`` entry per output: what Triton answers, and what
``tritonclient``'s ``as_numpy`` reads. Errors are ``CodecError`` with the REST codec's words
where the problem is the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, Final

import numpy as np

from modelpool._exceptions import CodecError
from modelpool._grpc_schema import messages
from modelpool._model import DATATYPES
from modelpool._protocol import (
    WIRE_DTYPES,
    InferRequest,
    RequestedOutput,
    check_shape,
    datatype_of,
    from_binary,
    select_outputs,
    short,
    to_binary,
)

__all__ = [
    "decode_model_infer",
    "empty_response",
    "encode_model_infer",
    "scan_header",
    "stream_answer",
    "stream_error",
]

#: the typed contents field of each datatype (FP16 has none: raw only)
_FIELDS: Final = {
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
_ALL_FIELDS: Final = tuple(sorted(set(_FIELDS.values())))
_TYPES_HINT: Final = ", ".join(DATATYPES)


# -- the front's look at a request -------------------------------------------------------------


def _varint(data: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise CodecError("the request is not a ModelInferRequest message (a broken varint)")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, int, int, int]]:
    """``(number, wire type, start, end)`` of each top-level field of a serialized message
    (``start:end``: a length-delimited field's payload; the whole field otherwise)."""
    at = 0
    while at < len(data):
        first = at
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, at = _varint(data, at)
        elif wire == 1:
            at += 8
        elif wire == 5:
            at += 4
        elif wire == 2:
            length, at = _varint(data, at)
            first, at = at, at + length
        else:
            raise CodecError(f"the request is not a ModelInferRequest message (wire type {wire})")
        if at > len(data):
            raise CodecError("the request is not a ModelInferRequest message (it ends early)")
        yield number, wire, first, at


def scan_header(body: bytes | memoryview) -> tuple[str, str, str]:
    """``(model_name, model_version, id)`` of a serialized ``ModelInferRequest``, read from its
    top-level fields without decoding the rest. Raises ``CodecError`` for bytes that are not
    such a message."""
    data = memoryview(body)
    found: dict[int, str] = {}
    for number, wire, start, end in _fields(data):
        if number in (1, 2, 3) and wire == 2:
            try:
                found[number] = str(data[start:end], "utf-8")
            except UnicodeDecodeError:
                raise CodecError("the request's model name, version or id is not UTF-8") from None
    return found.get(1, ""), found.get(2, ""), found.get(3, "")


def _split_raw(body: bytes | bytearray | memoryview) -> tuple[bytes, list[memoryview]]:
    """The message without its ``raw_input_contents`` (field 7), and those entries as views
    into ``body``: protobuf would copy each big entry twice, this not at all."""
    data = memoryview(body).cast("B")
    rest: list[memoryview] = []
    raw: list[memoryview] = []
    previous = 0  # (fields are contiguous: each spans from the previous one's end to its own)
    for number, wire, start, end in _fields(data):
        if number == 7 and wire == 2:
            raw.append(data[start:end])
        else:
            rest.append(data[previous:end])
        previous = end
    return b"".join(rest), raw


# -- decoding (in the worker) ------------------------------------------------------------------


def _parameter(value: Any) -> Any:
    kind = value.WhichOneof("parameter_choice")
    return None if kind is None else getattr(value, kind)


def _parameters(mapping: Any) -> dict[str, Any]:
    return {name: _parameter(value) for name, value in mapping.items()}


def _typed(tensor: Any, datatype: str, shape: list[int], where: str) -> np.ndarray:
    count = math.prod(shape)
    contents = tensor.contents
    field = _FIELDS.get(datatype)
    given = [name for name in _ALL_FIELDS if len(getattr(contents, name))]
    if field is None:
        if given or count:
            raise CodecError(
                f"{where}: {datatype} has no typed contents field; send it in raw_input_contents"
            )
        return np.empty(shape, dtype=DATATYPES[datatype])
    wrong = [name for name in given if name != field]
    if wrong:
        raise CodecError(
            f"{where}: its contents are in {', '.join(wrong)}, but datatype {datatype} takes "
            f"{field}"
        )
    values = getattr(contents, field)
    if len(values) != count:
        raise CodecError(
            f"{where}: {field} has {len(values)} values but shape {shape} needs {count}"
        )
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out.reshape(shape)
    dtype = DATATYPES[datatype]
    if dtype.itemsize < 4 and dtype.kind in "iu":  # (carried in a 32-bit field)
        wide = np.fromiter(values, np.int64, count=count)
        info = np.iinfo(dtype)
        if count and (wide.min() < info.min or wide.max() > info.max):
            raise CodecError(
                f"{where}: {datatype} data must be integers in [{info.min}, {info.max}]"
            )
        return wide.astype(dtype).reshape(shape)
    return np.fromiter(values, dtype, count=count).reshape(shape)


def _inputs(request: Any, raw: list[memoryview]) -> dict[str, np.ndarray]:
    if raw and len(raw) != len(request.inputs):
        raise CodecError(
            f"the request has {len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
            "send one entry per input, in the inputs' order"
        )
    tensors: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        where = f"input {short(name)}"
        if not name:
            raise CodecError(f"input #{index} has no name")
        if name in tensors:
            raise CodecError(f"{where} appears twice; each input may be given once")
        datatype = tensor.datatype
        if datatype not in DATATYPES:
            raise CodecError(
                f"{where}: datatype {short(datatype)} is not supported; use one of {_TYPES_HINT}"
            )
        shape = check_shape(list(tensor.shape), where)
        if "shared_memory_region" in tensor.parameters:
            raise CodecError(f"{where}: shared memory is not supported; send the data in the body")
        if raw:
            if tensor.HasField("contents"):
                raise CodecError(
                    f"{where} has both contents and raw_input_contents; send one of them"
                )
            tensors[name] = _raw(raw[index], datatype, shape, where)
        elif tensor.HasField("contents") or not math.prod(shape):
            tensors[name] = _typed(tensor, datatype, shape, where)
        else:
            raise CodecError(f"{where} has no data; send it in raw_input_contents or contents")
    return tensors


def _raw(data: memoryview, datatype: str, shape: list[int], where: str) -> np.ndarray:
    """A tensor from its raw bytes (a view into the request: copied once when the request is
    read-only, as ``_protocol.from_binary`` does, so that the array is writable)."""
    if datatype != "BYTES":
        need = math.prod(shape) * WIRE_DTYPES[datatype].itemsize
        if len(data) != need:
            raise CodecError(
                f"{where}: raw_input_contents has {len(data)} bytes but shape {shape} of "
                f"{datatype} needs {need}"
            )
    return from_binary(data, 0, len(data), datatype, shape, where)


def decode_model_infer(body: bytes | bytearray | memoryview) -> InferRequest:
    """A serialized ``ModelInferRequest`` as the REST codec's ``InferRequest`` (writable
    arrays). Raises ``CodecError`` (and nothing else) for a malformed one."""
    cls = messages().ModelInferRequest
    rest, raw = _split_raw(body)
    try:
        request = cls.FromString(rest)
    except Exception as exc:  # (protobuf's DecodeError; upb may raise others)
        raise CodecError(f"the request is not a valid ModelInferRequest message: {exc}") from None
    outputs: list[RequestedOutput] = []
    for item in request.outputs:
        where = f"requested output {short(item.name)}"
        for unsupported in ("classification", "shared_memory_region"):
            if unsupported in item.parameters:
                raise CodecError(f"{where}: {unsupported} is not supported; drop the parameter")
        if any(o.name == item.name for o in outputs):
            raise CodecError(f"{where} appears twice; request each output once")
        outputs.append(RequestedOutput(item.name))
    return InferRequest(
        id=request.id or None,
        inputs=_inputs(request, raw),
        outputs=outputs or None,
        parameters=_parameters(request.parameters),
    )


# -- encoding (in the worker) ------------------------------------------------------------------


def encode_model_infer(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: Mapping[str, Any],
    request: InferRequest | None = None,
) -> bytes:
    """A serialized ``ModelInferResponse``: the outputs the request names (all, in the model's
    order, if it names none), each raw. Raises ``CodecError`` for a requested output the model
    does not have, ``UnsupportedDatatypeError`` for an array no datatype fits."""
    tensor = messages().ModelInferResponse.InferOutputTensor
    parts = [empty_response(model_name, model_version, request_id)]
    raws = []
    for name, value, _ in select_outputs(model_name, outputs, request):
        array = value if isinstance(value, np.ndarray) else np.asarray(value)
        datatype = datatype_of(array)
        meta = tensor(name=name, datatype=datatype, shape=array.shape)
        _field(parts, 5, meta.SerializeToString())
        raws.append(to_binary(array, datatype))
    for raw in raws:  # (written by hand: protobuf's serializer copies big ones slowly)
        _field(parts, 6, raw)
    return b"".join(parts)


def stream_answer(response: bytes, final: bool | None = True) -> bytes:
    """A ``ModelStreamInferResponse`` carrying a serialized ``ModelInferResponse`` (as the
    worker encodes it), with the parameter ``triton_final_response`` set to ``final`` (True:
    the request's last answer, as a model that does not stream gives each request; False: a
    piece of a streamed answer; None: not set)."""
    inner = [response]
    if final is not None:
        entry: list[Any] = []
        _field(entry, 1, b"triton_final_response")
        _field(entry, 2, b"\x08\x01" if final else b"\x08\x00")  # InferParameter{bool_param}
        _field(inner, 4, b"".join(entry))  # (appended: a repeated map field merges)
    parts: list[Any] = []
    _field(parts, 2, b"".join(inner))
    return b"".join(parts)


def empty_response(model_name: str, model_version: str | None, request_id: str | None) -> bytes:
    """A serialized ``ModelInferResponse`` with no outputs (the empty last answer of a
    streamed one, which Triton's clients ask for with ``triton_enable_empty_final_response``)."""
    parts: list[Any] = []
    for number, text in ((1, model_name), (2, model_version), (3, request_id)):
        if text:
            _field(parts, number, text.encode())
    return b"".join(parts)


def stream_error(message: str, model_name: str, request_id: str) -> bytes:
    """A ``ModelStreamInferResponse`` saying that one request of the stream failed (the stream
    goes on): its message, and a response holding only the request's model and id, so that
    the client knows which request it was."""
    m = messages()
    response = m.ModelInferResponse(model_name=model_name, id=request_id)
    data: bytes = m.ModelStreamInferResponse(
        error_message=message, infer_response=response
    ).SerializeToString()
    return data


def _field(parts: list[Any], number: int, payload: Any) -> None:
    """A length-delimited field (wire type 2): its key, its length, the bytes (not copied)."""
    parts += (_varint_bytes(number << 3 | 2), _varint_bytes(len(payload)), payload)


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
