"""ONNX Runtime and scikit-learn models served by the tests, with the small model files the
tests generate (``make_onnx``, ``make_sklearn``): nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

import modelpool

#: the tiny ONNX graph's weights: y = relu(x @ W + B), x [N, 4] -> y [N, 3]
W = (np.arange(12, dtype=np.float32).reshape(4, 3) - 5) / 10
B = np.array([0.1, -0.2, 0.3], dtype=np.float32)


def reference(x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ W + B, 0)


def make_onnx(path: Path) -> Path:
    """Write the tiny graph with ``onnx.helper`` (opset 17)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Add", ["h", "B"], ["z"]),
            helper.make_node("Relu", ["z"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # (readable by older runtimes too)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def iris_like(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four features, three classes separated by a rule: data to fit a classifier on."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 0.5)
    return x, y


def make_sklearn(path: Path) -> Path:
    """Fit a small pipeline (scaler + logistic regression) and save it with joblib."""
    import joblib
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = iris_like()
    joblib.dump(make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y), path)
    return path


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


class OnnxMLP(modelpool.Model):
    """The ONNX graph in an ``InferenceSession`` made the plain way: the worker's thread
    budget reaches it through modelpool, not through this code."""

    inputs = [modelpool.TensorSpec("x", "FP32", [-1, 4])]
    outputs = [modelpool.TensorSpec("y", "FP32", [-1, 3])]

    def setup(self) -> None:
        import onnxruntime as ort

        before = _os_threads()
        self.session = ort.InferenceSession(
            self.options["path"], providers=["CPUExecutionProvider"]
        )
        self.threads_started = _os_threads() - before  # (ORT's intra-op pool: n - 1 threads)
        self.intra_op = self.session.get_session_options().intra_op_num_threads

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        (y,) = self.session.run(None, {"x": inputs["x"]})
        return {"y": y}


class SklearnClassifier(modelpool.Model):
    """A fitted scikit-learn pipeline loaded with joblib: labels and probabilities."""

    inputs = [modelpool.TensorSpec("x", "FP32", [-1, 4])]
    outputs = [
        modelpool.TensorSpec("label", "INT64", [-1]),
        modelpool.TensorSpec("proba", "FP64", [-1, 3]),
    ]

    def setup(self) -> None:
        import joblib

        self.pipeline = joblib.load(self.options["path"])

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        x = inputs["x"]
        return {"label": self.pipeline.predict(x), "proba": self.pipeline.predict_proba(x)}


def onnx_threads() -> dict[str, int]:
    """(Pool.submit) the ONNX model's intra-op setting and the threads its session started."""
    model = modelpool.current_model()
    return {"intra_op": model.intra_op, "threads_started": model.threads_started}


def openmp_threads() -> list[int]:
    """(Pool.submit) the sizes of the OpenMP pools loaded in this worker (scikit-learn's)."""
    from threadpoolctl import threadpool_info

    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "openmp"]
