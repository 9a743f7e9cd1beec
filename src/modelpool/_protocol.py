"""The Open Inference Protocol (KServe v2 REST) codec, with Triton's binary tensor extension.

Pure functions over bytes, no I/O: the server decodes requests and encodes responses with them,
``modelpool.client`` the reverse; a compressed body is undone first (``_compression``). Outside
``modelpool.server`` so that the client loads neither the server nor its dependencies (aiohttp,
pydantic): it needs NumPy and orjson only.

Wire format: one JSON object, then optionally a binary section whose start the
``Inference-Header-Content-Length`` header gives. Each binary tensor has
``parameters.binary_data_size`` and its bytes follow the others' in JSON order: numeric tensors
as raw little-endian row-major bytes (``BOOL`` one byte 0/1), ``BYTES`` elements as a 4-byte
little-endian length and then the element.

BYTES: decoded ``BYTES`` tensors are object arrays of ``bytes``, from JSON strings (UTF-8) or
binary alike. Encoding takes object, ``S`` and ``U`` arrays: ``bytes`` as is, ``str`` as UTF-8,
anything else as ``str(x)``; bytes that are not UTF-8 cannot go as JSON (ask for binary).

NaN and infinity: JSON has neither, so encoding writes the strings ``"NaN"``, ``"Infinity"``,
``"-Infinity"``: strict JSON that every parser reads and that ``np.array(data, dtype)`` (what
tritonclient's and kserve's ``as_numpy`` do) turns back into the exact float. Decoding takes
those, ``null`` (NaN, as orjson writes it) and the bare ``NaN`` / ``Infinity`` tokens of
Python's json and rapidjson (tritonclient).

Ownership: a decoded binary tensor is a view into the body when the body is writable (a
``bytearray`` or writable ``memoryview``) and the tensor aligned; the arrays then own the body,
which the caller must not modify or reuse. A read-only body (``bytes``) or a misaligned tensor
costs one copy. Every returned array is writable. Encoders pad the JSON part with spaces to a
multiple of 64 bytes, so that binary tensors start aligned.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import orjson

from modelpool import _plain
from modelpool._compression import Buffer
from modelpool._exceptions import CodecError, UnsupportedDatatypeError
from modelpool._model import DATATYPES

__all__ = [
    "WIRE_DTYPES",
    "CodecError",
    "InferRequest",
    "RequestedOutput",
    "UnsupportedDatatypeError",
    "check_shape",
    "datatype_of",
    "decode_infer_request",
    "decode_infer_response",
    "encode_infer_request",
    "encode_infer_response",
    "from_binary",
    "infer_request_of",
    "select_outputs",
    "short",
    "to_binary",
]

_ALIGN: Final = 64
_MAX_DIMS: Final = 32
_LENGTH = struct.Struct("<I")
WIRE_DTYPES: Final = {  # little-endian; native where the host is (the usual case)
    name: dt if sys.byteorder == "little" else dt.newbyteorder("<")
    for name, dt in DATATYPES.items()
}
_BY_KIND_SIZE: Final = {
    (dt.kind, dt.itemsize): name for name, dt in DATATYPES.items() if name != "BYTES"
}
_NON_FINITE: Final = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_TYPES_HINT: Final = ", ".join(DATATYPES)


@dataclass(slots=True)
class RequestedOutput:
    """An output named in a request's ``outputs``; ``binary`` is None when not specified."""

    name: str
    binary: bool | None = None


@dataclass(slots=True)
class InferRequest:
    """A decoded inference request.

    ``outputs`` is None when the request wants every output. ``binary_default`` is the
    request's ``parameters.binary_data_output``, None when not given.
    """

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] | None = None
    binary_default: bool | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


# -- JSON -------------------------------------------------------------------------------------


def _loads(data: Buffer, what: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        first = exc  # orjson is strict; the stdlib also reads NaN tokens and huge ints
    try:
        return json.loads(bytes(data) if isinstance(data, memoryview) else data)
    except (ValueError, RecursionError):
        raise CodecError(f"{what} is not valid UTF-8 JSON: {first}") from None


def _dumps(doc: Any) -> bytes:
    try:
        return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError:
        raise CodecError("a name or id is not valid UTF-8 (a lone surrogate?)") from None


# -- decoding ---------------------------------------------------------------------------------


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _header_length(value: int | str | None, size: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit() and len(text) < 20):
            raise CodecError(
                f"Inference-Header-Content-Length must be a byte count, got {value[:40]!r}"
            )
        value = int(text)
    if not 0 <= value <= size:
        raise CodecError(
            f"Inference-Header-Content-Length is {value} but the body has {size} bytes; it "
            "must be the size of the JSON part that starts the body"
        )
    return value


def _params(item: dict[str, Any], where: str) -> dict[str, Any]:
    params = item.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise CodecError(f"{where}: parameters must be an object")
    return params


def _document(body: Buffer, header_length: int | str | None, what: str, key: str) -> Any:
    length = _header_length(header_length, len(body))
    doc = _loads(body if length is None else memoryview(body)[:length], what)
    return _object(doc, what, key), length


def _object(doc: Any, what: str, key: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise CodecError(f'{what} must be a JSON object like {{"{key}": [...]}}')
    return doc


def check_shape(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or len(value) > _MAX_DIMS:
        raise CodecError(f"{where}: shape must be a list of at most {_MAX_DIMS} integers")
    if any(type(d) is not int or d < 0 for d in value):
        raise CodecError(f"{where}: shape must hold integers >= 0, got {short(value)}")
    if math.prod(d for d in value if d) > 1 << 48:
        raise CodecError(f"{where}: shape {short(value)} is too large for any tensor")
    return value


def _unpack_bytes(buf: memoryview, count: int, where: str) -> np.ndarray:
    items: list[bytes] = []
    offset, end = 0, len(buf)
    while offset < end:
        if offset + 4 > end or len(items) == count:
            raise CodecError(
                f"{where}: the binary BYTES data holds more than the {count} elements that "
                "the shape says, or ends inside an element's 4-byte length"
            )
        (length,) = _LENGTH.unpack_from(buf, offset)
        offset += 4
        if offset + length > end:
            raise CodecError(
                f"{where}: a BYTES element says it has {length} bytes but only "
                f"{end - offset} remain; each element is a 4-byte little-endian length and "
                "then that many bytes"
            )
        items.append(bytes(buf[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise CodecError(
            f"{where}: binary BYTES data has {len(items)} elements, shape needs {count}"
        )
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def from_binary(
    body: Buffer, offset: int, size: int, datatype: str, shape: list[int], where: str
) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        return _unpack_bytes(memoryview(body)[offset : offset + size], count, where).reshape(shape)
    dtype = WIRE_DTYPES[datatype]
    if size != count * dtype.itemsize:
        raise CodecError(
            f"{where}: binary_data_size is {size} bytes but shape {shape} of {datatype} "
            f"needs {count * dtype.itemsize}"
        )
    if count == 0:
        return np.empty(shape, dtype=dtype)
    array = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    if not (array.flags.writeable and array.flags.aligned):
        array = array.copy()
    if datatype == "BOOL" and array.view(np.uint8).max() > 1:
        raise CodecError(f"{where}: binary BOOL elements must be bytes 0 or 1")
    return array.reshape(shape)


def _from_json(data: Any, datatype: str, shape: list[int], where: str) -> np.ndarray:
    count = math.prod(shape)
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        return _bytes_from_json(data, shape, count, where)
    try:
        array = np.array(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise CodecError(
            f"{where}: data must be a flat or nested list of {datatype} values with the same "
            "length on every level"
        ) from None
    if list(array.shape) != shape:
        if array.ndim != 1:
            raise CodecError(
                f"{where}: data is nested as {list(array.shape)} but shape is {shape}; send it "
                "flat (row-major) or nested exactly like the shape"
            )
        if array.size != count:
            raise CodecError(
                f"{where}: data has {array.size} values but shape {shape} needs {count}"
            )
    dtype = DATATYPES[datatype]
    if count == 0:
        return np.zeros(shape, dtype=dtype)
    got = array.dtype.kind
    if dtype.kind == "b":
        if got != "b":
            raise CodecError(f"{where}: BOOL data must be JSON true/false")
    elif dtype.kind == "f":
        if got not in "iufUO":
            raise CodecError(f"{where}: {datatype} data must be numbers")
        try:
            with np.errstate(over="raise"):
                array = (
                    np.array(data, dtype=dtype) if got in "UO" else array.astype(dtype, copy=False)
                )
        except FloatingPointError:
            raise CodecError(f"{where}: a value is too large for {datatype}") from None
        except (ValueError, TypeError, OverflowError):
            raise CodecError(
                f'{where}: {datatype} data must be numbers (or null, "NaN", "Infinity", '
                '"-Infinity")'
            ) from None
    else:
        info = np.iinfo(dtype)
        if got in "fO":  # ints too wide for one NumPy type (e.g. 0 and 2**64-1), or floats
            exact = np.array(data, dtype=object)
            if all(type(x) is int and info.min <= x <= info.max for x in exact.flat):
                return exact.astype(dtype).reshape(shape)
        if got not in "iu" or (
            array.dtype != dtype and (array.min() < info.min or array.max() > info.max)
        ):
            raise CodecError(
                f"{where}: {datatype} data must be integers in [{info.min}, {info.max}]"
            )
        array = array.astype(dtype, copy=False)
    return array.reshape(shape)


def _bytes_from_json(data: list[Any], shape: list[int], count: int, where: str) -> np.ndarray:
    if any(type(x) is list for x in data):
        flat: list[Any] = []

        def walk(node: Any, dim: int) -> None:
            leaf = dim == len(shape)
            if leaf and type(node) is not list:
                flat.append(node)
            elif not leaf and type(node) is list and len(node) == shape[dim]:
                for item in node:
                    walk(item, dim + 1)
            else:
                raise CodecError(
                    f"{where}: BYTES data must be a flat list of {count} strings or nested "
                    f"exactly like shape {shape}"
                )

        walk(data, 0)
        data = flat
    if len(data) != count:
        raise CodecError(f"{where}: data has {len(data)} values but shape {shape} needs {count}")
    try:
        items = [s.encode() for s in data]
    except (AttributeError, UnicodeEncodeError):
        raise CodecError(f"{where}: BYTES data sent as JSON must be UTF-8 strings") from None
    out = np.empty(count, dtype=object)
    out[:] = items
    return out.reshape(shape)


def _decode_tensors(
    items: Any, kind: str, body: Buffer, header_length: int | None
) -> dict[str, np.ndarray]:
    if not isinstance(items, list):
        raise CodecError(f'"{kind}s" must be a list of tensor objects')
    tensors: dict[str, np.ndarray] = {}
    offset = len(body) if header_length is None else header_length
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise CodecError(f'{kind} #{index} must be an object with a string "name"')
        name = item["name"]
        where = f"{kind} {short(name)}"
        if name in tensors:
            raise CodecError(f"{where} appears twice; each {kind} may be given once")
        datatype = item.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise CodecError(
                f"{where}: datatype {short(datatype)} is not supported; use one of {_TYPES_HINT}"
            )
        shape = check_shape(item.get("shape"), where)
        params = _params(item, where)
        if "shared_memory_region" in params:
            raise CodecError(f"{where}: shared memory is not supported; send the data in the body")
        size = params.get("binary_data_size")
        data = item.get("data")
        if size is None:
            if data is None:
                raise CodecError(f'{where} has neither "data" nor parameters.binary_data_size')
            tensors[name] = _from_json(data, datatype, shape, where)
            continue
        if data is not None:
            raise CodecError(f'{where} has both "data" and binary_data_size; send one of them')
        if type(size) is not int or size < 0:
            raise CodecError(
                f"{where}: binary_data_size must be an integer >= 0, got {short(size)}"
            )
        if header_length is None:
            raise CodecError(
                f"{where} has binary_data_size but there is no Inference-Header-Content-Length "
                "header; set it to the size of the JSON part of the body"
            )
        if offset + size > len(body):
            raise CodecError(
                f"{where}: binary_data_size is {size} but only {len(body) - offset} bytes of "
                "binary data are left in the body"
            )
        tensors[name] = from_binary(body, offset, size, datatype, shape, where)
        offset += size
    if offset != len(body):
        raise CodecError(
            f"the body has {len(body) - offset} bytes after the last binary tensor; the "
            "binary_data_size values must add up to the body size minus "
            "Inference-Header-Content-Length"
        )
    return tensors


def _requested_outputs(value: Any) -> list[RequestedOutput] | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise CodecError('"outputs" must be a list of objects like {"name": "..."}')
    outputs: list[RequestedOutput] = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise CodecError(f'requested output #{index} must be an object with a string "name"')
        where = f"requested output {short(item['name'])}"
        params = _params(item, where)
        for unsupported in ("classification", "shared_memory_region"):
            if unsupported in params:
                raise CodecError(f"{where}: {unsupported} is not supported; drop the parameter")
        binary = params.get("binary_data")
        if binary is not None and type(binary) is not bool:
            raise CodecError(f"{where}: binary_data must be true or false")
        if any(o.name == item["name"] for o in outputs):
            raise CodecError(f"{where} appears twice; request each output once")
        outputs.append(RequestedOutput(item["name"], binary))
    return outputs


def decode_infer_request(body: Buffer, header_length: int | str | None = None) -> InferRequest:
    """Decode an inference request body; ``header_length`` is ``Inference-Header-Content-Length``.

    Raises ``CodecError`` (and nothing else) for any malformed body. Binary tensors follow the
    ownership rule in the module docstring.
    """
    doc, length = _document(body, header_length, "the request", "inputs")
    return infer_request_of(doc, body, length)


def infer_request_of(doc: Any, body: Buffer, length: int | None) -> InferRequest:
    """``decode_infer_request`` for a body whose JSON part is parsed already: ``doc``, and
    ``length`` its ``Inference-Header-Content-Length`` (None: the body is all JSON)."""
    doc = _object(doc, "the request", "inputs")
    if length is None and (plain := _plain.decode_inputs(doc)) is not None:
        return InferRequest(id=plain[0], inputs=plain[1])  # the common kind (``_plain``)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise CodecError(f'"id" must be a string, got {short(request_id)}')
    params = _params(doc, "the request")
    binary_default = params.get("binary_data_output")
    if binary_default is not None and type(binary_default) is not bool:
        raise CodecError("parameters.binary_data_output must be true or false")
    return InferRequest(
        id=request_id,
        inputs=_decode_tensors(doc.get("inputs"), "input", body, length),
        outputs=_requested_outputs(doc.get("outputs")),
        binary_default=binary_default,
        parameters=params,
    )


def decode_infer_response(
    body: Buffer, header_length: int | str | None = None
) -> dict[str, np.ndarray]:
    """Decode an inference response body into writable arrays, by output name.

    The ownership rule of the module docstring applies: pass a ``bytearray`` for zero copy.
    A body holding ``{"error": ...}`` raises ``CodecError`` with that message.
    """
    doc, length = _document(body, header_length, "the response", "outputs")
    if "outputs" not in doc and isinstance(doc.get("error"), str):
        raise CodecError(doc["error"])
    return _decode_tensors(doc.get("outputs"), "output", body, length)


# -- encoding ---------------------------------------------------------------------------------


def datatype_of(array: np.ndarray) -> str:
    """The Open Inference Protocol datatype an array travels as (object/str/bytes: BYTES)."""
    kind = array.dtype.kind
    if kind in "OSU":
        return "BYTES"
    name = _BY_KIND_SIZE.get((kind, array.dtype.itemsize))
    if name is None:
        raise UnsupportedDatatypeError(
            f"dtype {array.dtype} has no Open Inference Protocol datatype; convert the array "
            f"to one of {_TYPES_HINT} (e.g. .astype(np.float32), or an object array for BYTES)"
        )
    return name


def _bytes_elements(array: np.ndarray) -> list[bytes]:
    return [
        x if isinstance(x, bytes) else (x.encode() if isinstance(x, str) else str(x).encode())
        for x in array.reshape(-1).tolist()
    ]


def to_binary(array: np.ndarray, datatype: str) -> Buffer:
    if datatype == "BYTES":
        parts: list[bytes] = []
        for item in _bytes_elements(array):
            parts += (_LENGTH.pack(len(item)), item)
        return b"".join(parts)
    flat = np.ascontiguousarray(array, dtype=WIRE_DTYPES[datatype]).reshape(-1)
    return flat.data.cast("B") if flat.size else b""


def _to_json(array: np.ndarray, datatype: str, where: str) -> Any:
    if datatype == "BYTES":
        try:
            return [item.decode() for item in _bytes_elements(array)]
        except UnicodeDecodeError:
            raise CodecError(
                f"{where} holds bytes that are not UTF-8 and cannot be sent as JSON; request "
                "it with binary_data=true"
            ) from None
    flat = np.ascontiguousarray(array.reshape(-1), dtype=DATATYPES[datatype])
    if datatype.startswith("FP") and not np.isfinite(flat).all():
        return [_NON_FINITE.get(repr(x), x) for x in flat.tolist()]
    return flat


def _encode(
    doc: dict[str, Any], key: str, tensors: Iterable[tuple[str, Any, bool]], what: str
) -> tuple[bytes, int | None]:
    items: list[dict[str, Any]] = []
    chunks: list[Buffer] = []
    for name, value, binary in tensors:
        array = value if isinstance(value, np.ndarray) else np.asarray(value)
        datatype = datatype_of(array)
        item: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = to_binary(array, datatype)
            item["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            item["data"] = _to_json(array, datatype, f"{what} {name!r}")
        items.append(item)
    doc[key] = items
    header = _dumps(doc)
    if not chunks:
        return header, None
    header += b" " * (-len(header) % _ALIGN)
    return b"".join([header, *chunks]), len(header)


def select_outputs(
    model_name: str,
    outputs: Mapping[str, Any],
    request: InferRequest | None,
    binary_by_default: bool = False,
) -> list[tuple[str, Any, bool]]:
    """``(name, array, binary)`` of each output to send: those the request names, in its
    order (all, in the model's order, if it names none); ``binary`` as the request says for
    it, else per ``binary_data_output``, else per ``binary_by_default``. Raises ``CodecError``
    for a requested output the model does not have."""
    default = binary_by_default
    if request is not None and request.binary_default is not None:
        default = request.binary_default
    if request is None or request.outputs is None:
        return [(name, array, default) for name, array in outputs.items()]
    chosen = []
    for wanted in request.outputs:
        if wanted.name not in outputs:
            raise CodecError(
                f"model {model_name!r} has no output {wanted.name!r}; its outputs are "
                f"{', '.join(map(repr, outputs)) or 'none'}"
            )
        binary = default if wanted.binary is None else wanted.binary
        chosen.append((wanted.name, outputs[wanted.name], binary))
    return chosen


def encode_infer_response(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: Mapping[str, np.ndarray],
    request: InferRequest | None = None,
    binary_by_default: bool = False,
) -> tuple[bytes, int | None]:
    """Encode a response: ``(body, Inference-Header-Content-Length or None)``.

    Sends the outputs the request names (all, in the model's order, if it names none). An
    output goes binary if the request says so for it, else per ``binary_data_output``, else
    per ``binary_by_default``. Raises ``CodecError`` for a requested output the model does not
    have, ``UnsupportedDatatypeError`` for an output array no datatype fits.
    """
    doc = _plain.answer_head(model_name, model_version, request_id)
    plain = request is None or (request.outputs is None and request.binary_default is None)
    if plain and not binary_by_default and (data := _plain.encode_outputs(doc, outputs)):
        return data, None  # all of them as JSON numbers (``_plain``)
    chosen = select_outputs(model_name, outputs, request, binary_by_default)
    return _encode(doc, "outputs", chosen, "output")


def encode_infer_request(
    inputs: Mapping[str, np.ndarray],
    *,
    outputs: Sequence[str] | None = None,
    binary: bool = True,
    binary_outputs: bool | None = None,
    request_id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Encode a request: ``(body, Inference-Header-Content-Length or None)``.

    ``binary`` sends the inputs as binary tensors; ``binary_outputs`` (default: ``binary``)
    asks for binary outputs. ``outputs`` names the outputs wanted (default: all).
    """
    want_binary = binary if binary_outputs is None else binary_outputs
    doc: dict[str, Any] = {}
    if request_id is not None:
        doc["id"] = request_id
    params = dict(parameters or {})
    if outputs:
        doc["outputs"] = [{"name": n, "parameters": {"binary_data": want_binary}} for n in outputs]
    else:
        params["binary_data_output"] = want_binary
    doc["parameters"] = params
    return _encode(doc, "inputs", ((n, a, binary) for n, a in inputs.items()), "input")
