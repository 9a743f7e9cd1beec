"""Models with the problems ``modelpool doctor`` looks for, each produced for real (one stub,
said so: CUDA on a machine without a GPU)."""

from __future__ import annotations

import ctypes
import glob
from typing import Any

import numpy as np

import modelpool

#: LLVM's OpenMP runtime (Debian's libomp5), the second runtime beside GNU libgomp
LLVM_LIBOMP = sorted(glob.glob("/usr/lib/x86_64-linux-gnu/libomp.so*"))
GNU_LIBGOMP = sorted(glob.glob("/usr/lib/x86_64-linux-gnu/libgomp.so.1"))


class Clean(modelpool.Model):
    inputs = [modelpool.TensorSpec("x", "FP32", [-1, 3]), modelpool.TensorSpec("s", "BYTES", [1])]
    outputs = [modelpool.TensorSpec("y", "FP32", [-1, 3])]

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        assert inputs["s"][0] == b"modelpool doctor"
        return {"y": inputs["x"] * self.options.get("scale", 2)}


class TwoOpenMP(modelpool.Model):
    """Loads GNU libgomp and LLVM libomp into one process, as a torch wheel beside a
    conda-built library does."""

    def setup(self) -> None:
        for path in (GNU_LIBGOMP[0], LLVM_LIBOMP[0]):
            ctypes.CDLL(path)

    def predict(self, inputs: Any) -> Any:
        return inputs


class SetsItsOwnThreads(modelpool.Model):
    """Overrides the worker's budget: OpenCV's pool set to 8 threads in setup() (a worker
    sets it back after setup; other hosts of the class may not)."""

    def setup(self) -> None:
        import cv2

        cv2.setNumThreads(8)

    def predict(self, inputs: Any) -> Any:
        return inputs


class SetupFails(modelpool.Model):
    def setup(self) -> None:
        raise RuntimeError("the weights file /nonexistent/model.pt is missing")

    def predict(self, inputs: Any) -> Any:
        return inputs


class PredictFails(modelpool.Model):
    inputs = [modelpool.TensorSpec("x", "FP32", [-1, 3])]

    def predict(self, inputs: dict[str, Any]) -> Any:
        return np.linalg.inv(inputs["x"])  # (1, 3) is not square: LinAlgError


def _made_in_a_function() -> type:
    class Local(modelpool.Model):
        def predict(self, inputs: Any) -> Any:
            return inputs

    return Local


#: a class defined inside a function: importable by this name, not picklable by reference
Local = _made_in_a_function()
