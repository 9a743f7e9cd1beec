"""Sample tensors of every Open Inference Protocol datatype, with their edge values, shared by
the codec and server tests (REST and gRPC)."""

from __future__ import annotations

import numpy as np

ALL_TYPES = {
    "BOOL": np.array([[True, False, True]]),
    "INT8": np.array([[-128, 0, 127]], np.int8),
    "INT16": np.array([[-32768, 1, 32767]], np.int16),
    "INT32": np.array([[-(2**31), 2, 2**31 - 1]], np.int32),
    "INT64": np.array([[-(2**63), 3, 2**63 - 1]], np.int64),
    "UINT8": np.array([[0, 1, 255]], np.uint8),
    "UINT16": np.array([[0, 2, 65535]], np.uint16),
    "UINT32": np.array([[0, 3, 2**32 - 1]], np.uint32),
    "UINT64": np.array([[0, 4, 2**64 - 1]], np.uint64),
    "FP16": np.array([[0.5, -1.25, 65504]], np.float16),
    "FP32": np.array([[0.1, -2.5, 3.4e38]], np.float32),
    "FP64": np.array([[0.1, -2.5, 1e300]], np.float64),
    "BYTES": np.array([[b"abc", b"", "h\u00e9llo".encode()]], dtype=object),
}
