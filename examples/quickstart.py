"""A small NumPy model served by a modelpool.Pool.

Run it with ``python examples/quickstart.py``. The model is a fixed linear classifier over the
four Iris measurements (sepal length, sepal width, petal length, petal width, in cm).
"""

from __future__ import annotations

import os

import numpy as np

import modelpool

SPECIES = ("setosa", "versicolor", "virginica")


class LinearClassifier(modelpool.Model):
    """Softmax over a linear score. Everything in this class runs in the worker processes."""

    # Optional signature: the pool checks inputs against it in the caller, before sending.
    inputs = [modelpool.TensorSpec("INPUT0", "FP32", [-1, 4])]
    outputs = [
        modelpool.TensorSpec("PROBABILITIES", "FP32", [-1, 3]),
        modelpool.TensorSpec("LABEL", "INT64", [-1]),
    ]

    def setup(self) -> None:
        # Load weights here (a real model would read a file). Pool(options=...) arrive as
        # keyword arguments of __init__; the base class keeps them in self.options.
        self.temperature = float(self.options.get("temperature", 1.0))
        self.weights = np.array(
            [[0.4, 1.0, -2.2, -1.0], [0.4, -1.4, 0.5, -1.3], [-1.7, -1.5, 2.4, 2.6]],
            dtype=np.float32,
        )
        self.bias = np.array([0.3, 1.9, -2.2], dtype=np.float32)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["INPUT0"]  # float32, shape (n, 4), writable
        logits = (x @ self.weights.T + self.bias) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        return {"PROBABILITIES": p.astype(np.float32), "LABEL": p.argmax(axis=1).astype(np.int64)}


def describe_worker() -> str:
    """Runs in a worker through Pool.submit; reaches that worker's loaded model."""
    info = modelpool.worker_info()
    model = modelpool.current_model()
    return f"pid {os.getpid()}, worker {info.index}, temperature {model.temperature}"


if __name__ == "__main__":  # required: workers re-import this file when they start
    flowers = np.array(
        [[5.1, 3.5, 1.4, 0.2], [6.0, 2.7, 4.1, 1.0], [6.9, 3.1, 5.8, 2.2]], dtype=np.float32
    )
    with modelpool.Pool(
        LinearClassifier, workers=2, options={"temperature": 0.5}, timeout=10.0
    ) as pool:
        out = pool.predict({"INPUT0": flowers})
        for row, label in zip(flowers, out["LABEL"], strict=True):
            print(row, "->", SPECIES[label])

        # A single-input model also takes a bare array.
        print("bare array:", SPECIES[pool.predict(flowers[:1])["LABEL"][0]])

        # Inputs that do not match the signature fail in this process, before anything is sent.
        try:
            pool.predict({"INPUT0": flowers.astype(np.float64)})
        except modelpool.InputValidationError as exc:
            print("rejected:", exc)

        print("submit:", pool.submit(describe_worker).result())

        stats = pool.stats()
        print(f"{stats.start_method}, {stats.threads_per_worker} thread(s) per worker")
        for w in stats.workers:
            print(f"  worker {w.index}: pid {w.pid}, {w.state}, served {w.served}")
