"""modelpool: run deep-learning models in supervised worker processes, safely and fast.

Importing this package does nothing but define names: no processes, no threads, no probing.
"""

import typing as _typing

from ._exceptions import (
    BatchError,
    BodyTooLarge,
    CodecError,
    ConfigError,
    DatabaseError,
    InputValidationError,
    ModelpoolError,
    ModelSetupError,
    ModelSpecError,
    PlacementError,
    PoisonTaskError,
    PoolClosedError,
    PoolOverloadedError,
    ProtocolError,
    RemoteError,
    RemoteTraceback,
    RequestTimeoutError,
    SerializationError,
    ServerError,
    ServerTimeoutError,
    TransportError,
    UnsafeForkError,
    UnsupportedDatatypeError,
    WorkerCrashedError,
    WorkerError,
)
from ._handle import WorkerStats
from ._logs import request_id
from ._model import Model, TensorSpec
from ._pool import Pool, PoolStats
from ._streaming import PredictStream
from ._worker import WorkerInfo, current_model, worker_info

if _typing.TYPE_CHECKING:
    from .client import Client

__version__ = "0.1.0"

_LAZY = {"Client": "client"}


def __getattr__(name: str) -> object:
    """The HTTP client, imported on first use (``modelpool.Client``); its errors are in the
    error tree, imported with the package."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'modelpool' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"modelpool.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "BatchError",
    "BodyTooLarge",
    "Client",
    "CodecError",
    "ConfigError",
    "DatabaseError",
    "InputValidationError",
    "Model",
    "ModelSetupError",
    "ModelSpecError",
    "ModelpoolError",
    "PlacementError",
    "PoisonTaskError",
    "Pool",
    "PoolClosedError",
    "PoolOverloadedError",
    "PoolStats",
    "PredictStream",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "RequestTimeoutError",
    "SerializationError",
    "ServerError",
    "ServerTimeoutError",
    "TensorSpec",
    "TransportError",
    "UnsafeForkError",
    "UnsupportedDatatypeError",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerInfo",
    "WorkerStats",
    "__version__",
    "current_model",
    "request_id",
    "worker_info",
]
