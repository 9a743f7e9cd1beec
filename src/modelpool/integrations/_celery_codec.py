"""The ``modelpool`` kombu serializer: msgpack, with NumPy arrays as raw bytes.

An array travels as a msgpack extension: its dtype (``dtype.str``, or the field list of a
structured dtype), its shape and its bytes in C order. It is decoded into memory the receiver
owns, so it is writable. Object arrays (strings, bytes, ``None``, nested lists) travel element by
element; NumPy scalars come back as NumPy scalars; ``datetime``, ``date``, ``time``, ``UUID``
and ``Decimal`` (Celery's own metadata uses some) come back as themselves. Nothing is pickled:
an object of any other type is refused with a ``TypeError`` that names it.
"""

from __future__ import annotations

import datetime
import decimal
import struct
import uuid
from typing import Any

import msgpack
import numpy as np

__all__ = ["CONTENT_TYPE", "NAME", "dumps", "loads", "register"]

#: The serializer's name (``serializer="modelpool"``) and its content type.
NAME = "modelpool"
CONTENT_TYPE = "application/x-modelpool-msgpack"

_ARRAY, _OBJECT_ARRAY, _SCALAR, _VALUE = 1, 2, 3, 4
_LEN = struct.Struct("<I")

_VALUE_TYPES: dict[str, Any] = {
    "datetime": datetime.datetime.fromisoformat,
    "date": datetime.date.fromisoformat,
    "time": datetime.time.fromisoformat,
    "uuid": uuid.UUID,
    "decimal": decimal.Decimal,
}


def _descr(dtype: np.dtype[Any]) -> Any:
    return np.lib.format.dtype_to_descr(dtype) if dtype.fields is not None else dtype.str


def _tuples(descr: Any) -> Any:
    """msgpack turns the tuples of a structured dtype's field list into lists; undo that:
    each field is ``(name or (title, name), descr, [shape])``."""
    if not isinstance(descr, list):
        return descr
    fields = []
    for name, sub, *shape in descr:
        title = tuple(name) if isinstance(name, list) else name
        fields.append((title, _tuples(sub), *(tuple(s) for s in shape)))
    return fields


def _encode_array(array: np.ndarray[Any, Any]) -> msgpack.ExtType:
    if array.dtype.hasobject:
        if array.dtype != object:
            raise TypeError(
                f"arrays of structured dtype {array.dtype} with object fields cannot travel "
                "through the broker; use plain fields or an object array"
            )
        items = array.reshape(-1).tolist() if array.ndim else [array[()]]
        body = _pack([list(array.shape), items])
        return msgpack.ExtType(_OBJECT_ARRAY, body)
    header = _pack([_descr(array.dtype), list(array.shape)])
    return msgpack.ExtType(_ARRAY, b"".join((_LEN.pack(len(header)), header, array.tobytes())))


def _decode_array(data: bytes) -> np.ndarray[Any, Any]:
    (size,) = _LEN.unpack_from(data)
    descr, shape = _unpack(data[_LEN.size : _LEN.size + size])
    dtype = np.dtype(np.lib.format.descr_to_dtype(_tuples(descr)))
    out = np.empty(tuple(shape), dtype=dtype)  # owned and writable
    raw = memoryview(data)[_LEN.size + size :]
    if out.nbytes != len(raw):
        raise ValueError(
            f"array of dtype {dtype} and shape {tuple(shape)} needs {out.nbytes} bytes, "
            f"the message carries {len(raw)}"
        )
    if out.nbytes:
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(raw, dtype=np.uint8)
    return out


def _decode_object_array(data: bytes) -> np.ndarray[Any, Any]:
    shape, items = _unpack(data)
    flat = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):  # element by element: a list item stays one object
        flat[i] = item
    return flat.reshape(tuple(shape))


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _encode_array(obj)
    if isinstance(obj, np.generic):
        return msgpack.ExtType(_SCALAR, _encode_array(np.asarray(obj)).data)
    if isinstance(obj, datetime.datetime):  # before date: a datetime is a date
        return msgpack.ExtType(_VALUE, _pack(["datetime", obj.isoformat()]))
    if isinstance(obj, datetime.date):
        return msgpack.ExtType(_VALUE, _pack(["date", obj.isoformat()]))
    if isinstance(obj, datetime.time):
        return msgpack.ExtType(_VALUE, _pack(["time", obj.isoformat()]))
    if isinstance(obj, uuid.UUID):
        return msgpack.ExtType(_VALUE, _pack(["uuid", str(obj)]))
    if isinstance(obj, decimal.Decimal):
        return msgpack.ExtType(_VALUE, _pack(["decimal", str(obj)]))
    if isinstance(obj, tuple | set | frozenset):
        return list(obj)
    raise TypeError(
        f"{type(obj).__module__}.{type(obj).__qualname__} cannot travel through the broker with "
        "the modelpool serializer (no pickle); use NumPy arrays, numbers, strings, bytes, "
        "lists and dicts"
    )


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _ARRAY:
        return _decode_array(data)
    if code == _OBJECT_ARRAY:
        return _decode_object_array(data)
    if code == _SCALAR:
        return _decode_array(data)[()]
    if code == _VALUE:
        name, text = _unpack(data)
        return _VALUE_TYPES[name](text)
    return msgpack.ExtType(code, data)


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True)  # type: ignore[no-any-return]


def _unpack(data: bytes | bytearray | memoryview) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def dumps(obj: Any) -> bytes:
    """Encode ``obj`` (arrays, numbers, strings, bytes, lists, dicts...) to bytes."""
    return _pack(obj)


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Decode bytes made by ``dumps``; arrays come back writable."""
    if isinstance(data, str):  # a transport that handed the body back as text
        data = data.encode("latin-1")
    return _unpack(data)


def register() -> None:
    """Register the serializer with kombu (idempotent)."""
    from kombu import serialization

    registry: Any = serialization.registry
    registry.register(NAME, dumps, loads, content_type=CONTENT_TYPE, content_encoding="binary")
