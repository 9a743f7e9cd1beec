"""modelpool: run deep-learning models in supervised worker processes, safely and fast.

Importing this package does nothing but define names: no processes, no threads, no probing.
"""

from ._exceptions import (
    BatchError,
    InputValidationError,
    ModelpoolError,
    ModelSetupError,
    ModelSpecError,
    PoolClosedError,
    PoolOverloadedError,
    RemoteError,
    RemoteTraceback,
    RequestTimeoutError,
    UnsafeForkError,
    WorkerCrashedError,
    WorkerError,
)
from ._handle import WorkerStats
from ._model import Model, TensorSpec
from ._pool import Pool, PoolStats
from ._worker import WorkerInfo, current_model, worker_info

__version__ = "0.1.0"

__all__ = [
    "BatchError",
    "InputValidationError",
    "Model",
    "ModelSetupError",
    "ModelSpecError",
    "ModelpoolError",
    "Pool",
    "PoolClosedError",
    "PoolOverloadedError",
    "PoolStats",
    "RemoteError",
    "RemoteTraceback",
    "RequestTimeoutError",
    "TensorSpec",
    "UnsafeForkError",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerInfo",
    "WorkerStats",
    "__version__",
    "current_model",
    "worker_info",
]
