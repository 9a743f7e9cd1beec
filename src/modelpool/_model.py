"""The ``Model`` base class, ``TensorSpec`` and input validation against a declared signature."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from ._exceptions import InputValidationError, ModelSpecError

__all__ = ["DATATYPES", "Model", "TensorSpec", "normalize_inputs"]

#: Open Inference Protocol datatype names and the NumPy dtypes they travel as.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a model's signature.

    ``datatype`` is an Open Inference Protocol name (``"FP32"``, ``"INT64"``, ``"BYTES"``, ...);
    ``shape`` lists dimensions, ``-1`` for any size.
    """

    name: str
    datatype: str
    shape: Sequence[int]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ModelSpecError(f"TensorSpec name must be a non-empty string, got {self.name!r}")
        if self.datatype not in DATATYPES:
            raise ModelSpecError(
                f"TensorSpec {self.name!r}: unknown datatype {self.datatype!r}; "
                f"use one of {', '.join(DATATYPES)}"
            )
        shape = tuple(self.shape)
        if not all(isinstance(d, int) and d >= -1 for d in shape):
            raise ModelSpecError(
                f"TensorSpec {self.name!r}: shape must be a list of ints >= -1 "
                f"(-1 = any size), got {list(self.shape)!r}"
            )
        object.__setattr__(self, "shape", shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        """The NumPy dtype this tensor travels as."""
        return DATATYPES[self.datatype]

    def check(self, value: Any, model_name: str) -> None:
        """Raise ``InputValidationError`` unless ``value`` fits this spec."""
        if (
            type(value) is np.ndarray
            and value.dtype == self.dtype
            and value.ndim == len(self.shape)
            and all(e == -1 or e == got for e, got in zip(self.shape, value.shape, strict=True))
        ):
            return  # (the usual case, in one test: each check below words one failure)
        where = f"model {model_name!r}, input {self.name!r}"
        if not isinstance(value, np.ndarray):
            if _is_torch_tensor(value):
                return  # torch tensors are checked by the model itself
            raise InputValidationError(
                f"{where}: expected a NumPy array, got {type(value).__name__}; "
                f"pass np.asarray(value, dtype=np.{self.dtype.name})",
                problem=f"input {self.name!r}: expected a {self.datatype} tensor, "
                f"got {type(value).__name__}",
            )
        if value.dtype != self.dtype and not (
            self.datatype == "BYTES" and value.dtype.kind in "OSU"
        ):
            got = _DATATYPE_OF.get(value.dtype, value.dtype.name)
            raise InputValidationError(
                f"{where}: expected datatype {self.datatype} ({self.dtype.name}), got "
                f"{value.dtype.name}; convert with .astype(np.{self.dtype.name})",
                problem=f"input {self.name!r}: expected datatype {self.datatype}, got {got}",
            )
        expected = self.shape
        if value.ndim != len(expected) or any(
            e != -1 and e != got for e, got in zip(expected, value.shape, strict=True)
        ):
            fact = f"expected shape {list(expected)} (-1 = any), got {list(value.shape)}"
            raise InputValidationError(f"{where}: {fact}", problem=f"input {self.name!r}: {fact}")


#: NumPy dtype -> Open Inference Protocol datatype name (for messages)
_DATATYPE_OF: dict[np.dtype[Any], str] = {dtype: name for name, dtype in DATATYPES.items()}


def _is_torch_tensor(value: Any) -> bool:
    return type(value).__module__ == "torch" and type(value).__name__ == "Tensor"


class Model(abc.ABC):
    """Base class for models served by a ``modelpool.Pool``.

    Everything here runs inside a worker process, after the worker has set its thread limits,
    seeds and signal handling:

    * ``__init__(**options)`` receives the pool's ``options``. Subclasses may define their own
      ``__init__`` and need not call ``super().__init__``.
    * ``setup()`` loads weights; it is bounded by the pool's ``setup_timeout``.
    * ``predict(inputs)`` maps a dict of arrays to a dict of arrays.
    * ``teardown()`` runs on graceful stop.

    ``inputs`` / ``outputs`` optionally declare the signature; inputs are then validated in the
    caller's process before they are sent.
    """

    inputs: ClassVar[Sequence[TensorSpec]] = ()
    outputs: ClassVar[Sequence[TensorSpec]] = ()
    #: The most rows (axis 0) one predict call accepts, if the model has a hard limit. A pool
    #: never batches beyond it, and refuses a single request larger than it.
    max_batch_size: ClassVar[int | None] = None

    def __init__(self, **options: Any) -> None:
        self.options = options

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Load weights and other resources. Runs once per worker, before any request."""

    @abc.abstractmethod
    def predict(self, inputs: dict[str, Any]) -> Any:
        """Compute outputs for one request (or one batch)."""

    def teardown(self) -> None:  # noqa: B027 - optional hook
        """Release resources. Runs when the worker is stopped gracefully."""


def normalize_inputs(inputs: Any, specs: Sequence[TensorSpec], model_name: str) -> Any:
    """Check ``inputs`` against ``specs`` and return what the worker's ``predict`` receives.

    With no declared inputs, ``inputs`` passes through unchanged. A bare array is accepted for a
    model that declares exactly one input.
    """
    if not specs:
        return inputs
    if not isinstance(inputs, Mapping):
        if len(specs) == 1 and (isinstance(inputs, np.ndarray) or _is_torch_tensor(inputs)):
            inputs = {specs[0].name: inputs}
        else:
            names = ", ".join(s.name for s in specs)
            fact = f"takes named inputs ({names}); got {type(inputs).__name__}"
            raise InputValidationError(f"model {model_name!r} {fact}", problem=fact)
    if type(inputs) is dict and len(inputs) == len(specs):
        for spec in specs:
            value = inputs.get(spec.name)
            if value is None:
                break  # a name the model does not have, or a missing input: worded below
            spec.check(value, model_name)
        else:
            return dict(inputs)
    known = {s.name for s in specs}
    unknown = [k for k in inputs if k not in known]
    if unknown:
        fact = (
            f"no input named {', '.join(map(repr, unknown))}; "
            f"its inputs are {', '.join(sorted(known))}"
        )
        raise InputValidationError(f"model {model_name!r} has {fact}", problem=fact)
    for spec in specs:
        if spec.name not in inputs:
            fact = f"missing input {spec.name!r} ({spec.datatype}, shape {list(spec.shape)})"
            raise InputValidationError(f"model {model_name!r}: {fact}", problem=fact)
        spec.check(inputs[spec.name], model_name)
    return dict(inputs)


def declared(cls: type) -> tuple[tuple[TensorSpec, ...], int | None]:
    """A model class's declared inputs and ``max_batch_size`` (rows per call), as read by the
    pool (which checks them when it is created)."""
    return tuple(getattr(cls, "inputs", ()) or ()), getattr(cls, "max_batch_size", None)


def check_rows(inputs: Any, limit: int | None, model_name: str) -> None:
    """A request larger than the model's own declared limit is refused, never cut."""
    if limit is None:
        return
    rows = max(
        (
            v.shape[0]
            for v in (inputs.values() if isinstance(inputs, Mapping) else [inputs])
            if getattr(v, "shape", None)
        ),
        default=1,
    )
    if rows > limit:
        fact = (
            f"accepts at most {limit} rows per call (its max_batch_size), and this request "
            f"has {rows}; split it"
        )
        raise InputValidationError(f"model {model_name!r} {fact}", problem=fact)
