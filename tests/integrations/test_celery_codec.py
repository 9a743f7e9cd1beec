"""The ``modelpool`` kombu serializer (``integrations/_celery_codec``): msgpack with NumPy
arrays as raw bytes. Every dtype and layout comes back equal and writable, Celery's own
metadata types as themselves, and nothing else travels (there is no pickle)."""

from __future__ import annotations

import datetime
import decimal
import uuid
from typing import Any

import numpy as np
import pytest

from _deps import deferred_module

# optional: imported by the tests that use them
codec = deferred_module("modelpool.integrations._celery_codec", "msgpack")
kombu_exceptions = deferred_module("kombu.exceptions", "celery")
kombu_serialization = deferred_module("kombu.serialization", "celery")


DTYPES = [
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64", "longdouble", "complex64", "complex128", ">i4", ">f8",
    "datetime64[ns]", "datetime64[D]", "timedelta64[s]", "S5", "U7", "V3",
]  # fmt: skip


def _roundtrip(value: Any) -> Any:
    return codec.loads(codec.dumps(value))


def _example(dtype: str) -> np.ndarray[Any, Any]:
    base = np.arange(12).reshape(3, 4)
    if dtype.startswith("V"):
        return np.frombuffer(bytes(range(36)), dtype=dtype).reshape(3, 4).copy()
    return base.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_round_trips_writable(dtype: str) -> None:
    array = _example(dtype)
    array.flags.writeable = False  # read-only at the sender, like np.frombuffer's arrays
    out = _roundtrip({"x": array})["x"]
    assert (out.dtype, out.shape) == (array.dtype, array.shape)
    assert out.tobytes() == array.tobytes()
    assert out.flags.writeable
    out[...] = out[0, 0]  # writable for real


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12.0).reshape(3, 4).T,  # Fortran order
        np.arange(20)[::3],  # not contiguous
        np.zeros((0, 5), dtype=np.float32),  # zero-size
        np.array(2.5),  # 0-d
        np.array([(1, [2.0, 3.0], (4, b"ab"))], dtype=[
            ("a", "<i4"), ("b", "<f8", (2,)), ("c", [("d", "u1"), ("e", "S2")])
        ]),  # structured, nested
    ],
    ids=["fortran", "strided", "zero-size", "0-d", "structured"],
)  # fmt: skip
def test_layouts_round_trip(array: np.ndarray[Any, Any]) -> None:
    out = _roundtrip(array)
    assert (out.dtype, out.shape) == (array.dtype, array.shape)
    assert out.tobytes() == np.ascontiguousarray(array).tobytes()
    assert out.flags.writeable
    assert out.flags.c_contiguous


def test_object_arrays_carry_strings_bytes_and_none() -> None:
    array = np.array(["text", b"\x00bytes", None, 7, [1, 2]], dtype=object).reshape(5, 1)
    out = _roundtrip(array)
    assert (out.dtype, out.shape) == (object, (5, 1))
    assert out.flags.writeable
    assert out.ravel().tolist() == ["text", b"\x00bytes", None, 7, [1, 2]]
    assert _roundtrip(np.array([], dtype=object)).shape == (0,)


def test_scalars_and_celery_metadata_types_come_back_as_themselves() -> None:
    values = [
        np.float32(1.5), np.int64(-3), np.bool_(True), np.datetime64("2024-01-02"),
        datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC),
        datetime.date(2024, 5, 6), datetime.time(7, 8), uuid.uuid4(), decimal.Decimal("1.10"),
        {"nested": [1, "two", b"three", None, 4.5]}, {3: "int keys"},
    ]  # fmt: skip
    out = _roundtrip(values)
    assert out == values
    assert [type(v) for v in out] == [type(v) for v in values]
    assert _roundtrip((1, 2)) == [1, 2]  # tuples become lists, as with JSON


def test_other_objects_are_refused_with_their_name() -> None:
    class Opaque:
        pass

    with pytest.raises(TypeError, match=r"Opaque cannot travel .* \(no pickle\)"):
        codec.dumps({"x": Opaque()})
    with pytest.raises(TypeError, match="object fields"):
        codec.dumps(np.zeros(2, dtype=[("a", object)]))


def test_registered_with_kombu_and_only_our_content_type_is_decoded() -> None:
    codec.register()
    content_type, encoding, body = kombu_serialization.dumps(
        {"x": np.ones(3)}, serializer="modelpool"
    )
    assert (content_type, encoding) == (codec.CONTENT_TYPE, "binary")
    out = kombu_serialization.loads(body, content_type, encoding, accept=[codec.CONTENT_TYPE])
    assert out["x"].flags.writeable
    assert out["x"].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(kombu_exceptions.ContentDisallowed):
        kombu_serialization.loads(body, content_type, encoding, accept=["application/json"])
