"""Triton's ``generate`` extension: a request as one flat JSON object, an answer likewise.

``POST /v2/models/M/generate`` (and ``generate_stream``) take ``{"id": ..., "parameters":
{...}, "INPUT": value, ...}``: a top-level key that names one of the model's declared inputs
is that tensor (a scalar or a list, nested or flat, fitted to the declared shape: the fixed
dimensions as declared, the innermost variable one takes the rest, other variable ones are 1;
the datatype is the declared one, BYTES from strings); any other key is a request parameter.
The answer is ``{"model_name", "model_version", "id", "OUTPUT": value, ...}``: each output
as a flat list, or a bare value when it has one element.

Run in the worker, like the other codecs (``_infer``, header length ``GENERATE``): the request
is rewritten as the REST codec's JSON and decoded by it, so that the checks and their messages
are the same. A model must declare its inputs (``TensorSpec``s) to be called this way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from modelpool._exceptions import CodecError, ServerError, ServerTimeoutError
from modelpool._model import TensorSpec
from modelpool._protocol import InferRequest, decode_infer_request, encode_infer_response, short

__all__ = ["Events", "decode_generate", "encode_generate", "generate_body", "read_piece"]


def _flat(value: Any) -> list[Any]:
    if not isinstance(value, list):
        return [value]
    out: list[Any] = []
    for item in value:
        out += _flat(item)
    return out


def _fit(spec: TensorSpec, count: int, where: str) -> list[int]:
    """The declared shape with its variable dimensions filled for ``count`` elements."""
    dims = list(spec.shape)
    fixed = math.prod(d for d in dims if d != -1)
    variable = [i for i, d in enumerate(dims) if d == -1]
    if not variable:
        if count != fixed:
            raise CodecError(f"{where} has {count} values but its shape {dims} needs {fixed}")
        return dims
    if fixed == 0 or count % fixed:
        raise CodecError(
            f"{where} has {count} values, which do not fill shape {dims} (-1 = any): send a "
            f"multiple of {fixed}"
        )
    shape = [1 if d == -1 else d for d in dims]
    shape[variable[-1]] = count // fixed
    return shape


def decode_generate(
    body: bytes | bytearray | memoryview, specs: Sequence[TensorSpec], model: str
) -> InferRequest:
    """A ``generate`` request as the REST codec's ``InferRequest``. Raises ``CodecError``."""
    if not specs:
        raise CodecError(
            f"model {model!r} declares no inputs (TensorSpecs), so a generate request's keys "
            "cannot be read as tensors; call /infer, or declare the model's inputs"
        )
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"the request is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CodecError('a generate request must be a JSON object like {"INPUT": value}')
    by_name = {spec.name: spec for spec in specs}
    parameters = doc.pop("parameters", {})
    if not isinstance(parameters, dict):
        raise CodecError('"parameters" must be a JSON object')
    request: dict[str, Any] = {"inputs": []}
    if "id" in doc:
        request["id"] = doc.pop("id")
    for key, value in doc.items():
        spec = by_name.get(key)
        if spec is None:
            if isinstance(value, dict | list):
                raise CodecError(
                    f"{short(key)} is not an input of model {model!r} (its inputs: "
                    f"{', '.join(by_name)}), and a parameter must be a single value"
                )
            parameters[key] = value
            continue
        data = _flat(value)
        shape = _fit(spec, len(data), f"input {short(key)}")
        tensor = {"name": key, "datatype": spec.datatype, "shape": shape, "data": data}
        request["inputs"].append(tensor)
    request["parameters"] = parameters
    decoded = decode_infer_request(orjson.dumps(request))
    decoded.binary_default = False  # (the answer is JSON, whatever the parameters say)
    return decoded


def encode_generate(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: Mapping[str, Any],
    request: InferRequest | None = None,
) -> bytes:
    """A ``generate`` answer: every output (those the request names) by name, flat, a
    single element bare. Raises as ``encode_infer_response`` does."""
    data, _ = encode_infer_response(model_name, model_version, request_id, outputs, request)
    doc = orjson.loads(data)
    answer: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        answer["model_version"] = model_version
    if request_id is not None:
        answer["id"] = request_id
    for output in doc["outputs"]:
        values = output["data"]
        answer[output["name"]] = values[0] if len(values) == 1 else values
    return orjson.dumps(answer)


# ----------------------------------------------------------------------------- the client's side

#: the keys of an answer that are not outputs
_ANSWER_KEYS = frozenset({"model_name", "model_version", "id"})


def generate_body(
    inputs: Mapping[str, Any], parameters: Mapping[str, Any] | None, request_id: str | None
) -> bytes:
    """A ``generate`` request: each input by name (an array as a nested list, a string or a
    number as it is), the parameters, the id."""
    doc: dict[str, Any] = {}
    for name, value in inputs.items():
        if name in ("id", "parameters"):
            raise CodecError(f"an input cannot be named {name!r} in a generate request")
        doc[name] = value.tolist() if hasattr(value, "tolist") else value
    if parameters:
        doc["parameters"] = dict(parameters)
    if request_id is not None:
        doc["id"] = request_id
    try:
        return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as exc:
        raise CodecError(f"the inputs cannot be sent as JSON: {exc}") from None


class Events:
    """Server-Sent Events from the lines of a ``generate_stream`` answer: ``feed`` each line
    (with or without its newline); an event comes out, as (its name, its data), at the blank
    line that ends it."""

    def __init__(self) -> None:
        self._name = "message"
        self._data: list[str] = []

    def feed(self, line: bytes) -> tuple[str, str] | None:
        text = line.decode("utf-8").rstrip("\r\n")
        if not text:
            if not self._data:
                return None
            event = (self._name, "\n".join(self._data))
            self._name, self._data = "message", []
            return event
        field, _, value = text.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._name = value
        elif field == "data":
            self._data.append(value)
        return None  # (comments and other fields are ignored, as the standard says)


def read_piece(event: tuple[str, str], url: str) -> dict[str, Any]:
    """A ``generate_stream`` event's outputs (name -> the JSON value: a number, a string or a
    flat list). An error event raises ``ServerError`` (``ServerTimeoutError`` for a 504)
    with its message and status."""
    name, data = event
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ServerError(200, f"an event of the stream is not JSON ({exc})", url=url) from None
    if not isinstance(doc, dict):
        raise ServerError(200, "an event of the stream is not a JSON object", url=url)
    if name == "error" or "error" in doc:
        status = doc.get("status", 500)
        status = status if isinstance(status, int) else 500
        cls = ServerTimeoutError if status == 504 else ServerError
        raise cls(status, str(doc.get("error", data)), url=url)
    return {key: value for key, value in doc.items() if key not in _ANSWER_KEYS}
