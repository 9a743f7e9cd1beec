"""A Keras model (TensorFlow backend) served by the tests, and the ``.keras`` file it loads.

The model is small and its weights are fixed (``weights``), so the expected answer is computed
with NumPy (``reference``) and no test process needs TensorFlow. This module imports
TensorFlow only inside functions: importing it (the test process does, to name the model)
starts nothing. ``save_keras`` runs in a subprocess (``saved_keras``): nothing is downloaded.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import numpy as np

import modelpool

#: x [N, 4] -> Dense(8, relu) -> Dense(3) -> y [N, 3]
_RNG = np.random.default_rng(14)
W1 = _RNG.normal(size=(4, 8)).astype(np.float32)
B1 = _RNG.normal(size=8).astype(np.float32)
W2 = _RNG.normal(size=(8, 3)).astype(np.float32)
B2 = _RNG.normal(size=3).astype(np.float32)


def reference(x: np.ndarray) -> np.ndarray:
    """What the Keras model computes, in NumPy."""
    return np.asarray(np.maximum(x @ W1 + B1, 0) @ W2 + B2, dtype=np.float32)


def build() -> Any:
    """The Keras model with the fixed weights (imports TensorFlow: call it where it may run)."""
    import keras

    model = keras.Sequential(
        [
            keras.Input(shape=(4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(3),
        ]
    )
    model.set_weights([W1, B1, W2, B2])
    return model


def save_keras(path: str) -> None:
    build().save(path)


def saved_keras(directory: Path) -> Path:
    """``directory/tiny.keras``, written once by a fresh interpreter (so that no test process
    imports TensorFlow); test processes sharing ``directory`` wait for the first to write it."""
    from _scripts import run_python

    path = directory / "tiny.keras"
    with open(directory / "tiny.keras.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # (released when the file closes)
        if not path.exists():
            partial = directory / f"tiny-{os.getpid()}.keras"
            code = "import sys, _tf_models; _tf_models.save_keras(sys.argv[1])"
            run_python(["-c", code, str(partial)], timeout=120)
            partial.rename(path)
    return path


class KerasModel(modelpool.Model):
    """A saved Keras model, loaded in ``setup()``: TensorFlow starts in the worker only."""

    inputs = (modelpool.TensorSpec("x", "FP32", [-1, 4]),)
    outputs = (modelpool.TensorSpec("y", "FP32", [-1, 3]),)

    def __init__(self, path: str) -> None:
        self.path = path
        self.model: Any = None

    def setup(self) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # (before TensorFlow loads)
        import keras

        self.model = keras.saving.load_model(self.path)

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {"y": self.model.predict(inputs["x"], verbose=0)}


def tf_threads() -> dict[str, Any]:
    """TensorFlow's pool sizes in this process, as its config gives them, and the threads it
    runs: ``tf_Compute`` is its inter-op pool (run in a worker with ``Pool.submit``)."""
    import tensorflow as tf

    return {
        "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        "tf_compute": thread_names().count("tf_Compute"),
    }


def thread_names() -> list[str]:
    """The names the kernel knows this process's threads by."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            names.append(f.read().strip())
    return names
