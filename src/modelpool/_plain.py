"""The common JSON request and answer, on a short path.

Most REST inference requests are one JSON document holding ``"inputs"`` (and maybe ``"id"``),
each input a flat list of numbers with ``name``, ``datatype``, ``shape`` and ``data`` and
nothing else; most answers are every output as JSON numbers. ``_protocol``'s general codec
checks every field of every request with many small steps, and under load (the server's
processes taking turns on the CPUs, each turn starting on cold caches) those steps cost two
to three times what they cost in a tight loop: measured on a 2-CPU machine, a worker spent
about 58 us of CPU per small request more than a handler decoding the same JSON with a few
lines (docs/benchmarks.md).

So ``_protocol`` first offers a request (and an answer) to this module. What it recognises
it decodes (encodes) with a few checks; anything else, including every malformed request,
gets None and takes the general path, which then answers or words the error exactly as
before. The short path never refuses anything itself, so the two paths cannot disagree about
what is valid; for what it accepts, it gives the same arrays (and the same answer bytes) as
the general path (tests/server/test_plain.py compares them on generated requests).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import orjson

__all__ = ["answer_head", "decode_inputs", "encode_outputs"]

#: datatypes decoded here: JSON numbers, read as float64 and converted (FP32: overflow checked)
_FLOATS: Final[dict[str, np.dtype[Any]]] = {
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_FLOAT64: Final = np.dtype(np.float64)
_FP32_MAX: Final = float(np.finfo(np.float32).max)
#: output dtypes encoded here (native byte order), and their datatypes
_OUT: Final = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32",
}
_TENSOR_KEYS: Final = frozenset({"name", "datatype", "shape", "data"})
_MAX_DIMS: Final = 32


def decode_inputs(doc: Any) -> tuple[str | None, dict[str, np.ndarray]] | None:
    """``(id, inputs)`` of a request document of the common kind (module docstring), else
    None. ``doc`` is the parsed JSON of a body without binary tensors."""
    if type(doc) is not dict:
        return None
    items = doc.get("inputs")
    rid = doc.get("id")
    if type(items) is not list or len(doc) != (2 if "id" in doc else 1):
        return None  # parameters, outputs, anything else: the general path reads them
    if rid is not None and type(rid) is not str:
        return None
    tensors: dict[str, np.ndarray] = {}
    for item in items:
        if type(item) is not dict or item.keys() != _TENSOR_KEYS:
            return None
        name, shape, data = item["name"], item["shape"], item["data"]
        dtype = _FLOATS.get(item["datatype"])
        if (
            dtype is None
            or type(name) is not str
            or name in tensors
            or type(shape) is not list
            or type(data) is not list
            or not 0 < len(shape) <= _MAX_DIMS
        ):
            return None
        count = 1
        for d in shape:
            if type(d) is not int or d <= 0:
                return None
            count *= d
        if count != len(data):
            return None
        try:
            array = np.array(data)
        except Exception:  # (nested unevenly, huge integers...: the general path words it)
            return None
        if array.dtype != _FLOAT64 or array.ndim != 1:
            return None  # integers, booleans, strings, nulls, nesting: the general path
        if dtype is not _FLOAT64:
            if np.abs(array).max() > _FP32_MAX:
                return None  # too large for FP32: the general path refuses it
            array = array.astype(dtype)
        tensors[name] = array.reshape(shape)
    return rid, tensors


def answer_head(
    model_name: str, model_version: str | None, request_id: str | None
) -> dict[str, Any]:
    """The fields of an inference answer before its outputs (both paths start from them)."""
    doc: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = model_version
    if request_id is not None:
        doc["id"] = request_id
    return doc


def encode_outputs(doc: dict[str, Any], outputs: Mapping[str, Any]) -> bytes | None:
    """The JSON answer ``doc`` with every output of ``outputs`` as JSON numbers, when each is
    named by a string and an array of a common numeric dtype with finite values; else None."""
    items = []
    for name, value in outputs.items():
        if type(name) is not str or type(value) is not np.ndarray:
            return None
        datatype = _OUT.get(value.dtype)
        if datatype is None:
            return None
        items.append(
            {"name": name, "datatype": datatype, "shape": list(value.shape), "data": value.ravel()}
        )
    doc["outputs"] = items
    try:
        data = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError:
        return None
    # orjson writes NaN and infinities as null; the general path writes them as "NaN" etc.
    # (a name or id holding "null" only sends the answer the long way)
    return None if b"null" in data else data
