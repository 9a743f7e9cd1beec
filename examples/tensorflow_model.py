"""A Keras model (TensorFlow) served by a modelpool.Pool, from a process that uses Keras too.

Run it with ``python examples/tensorflow_model.py`` (needs ``pip install tensorflow-cpu``).
The example saves its own tiny model (two dense layers) so that nothing is downloaded; a real
deployment points ``path`` at its ``.keras`` file.

The trap this avoids: a process that built or ran a Keras model, then forked (Celery's
prefork pool, ``multiprocessing`` with ``fork``), leaves its children waiting forever in
their first ``predict()``: TensorFlow's runtime threads do not survive fork. modelpool starts
its workers fresh (forkserver), refuses ``start_method="fork"`` once TensorFlow is imported,
and gives each worker's TensorFlow the worker's thread budget instead of every core.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet TensorFlow's start-up logging

import modelpool


class KerasModel(modelpool.Model):
    """A saved Keras model; ``path`` is a model option."""

    inputs = [modelpool.TensorSpec("x", "FP32", [-1, 4])]
    outputs = [modelpool.TensorSpec("y", "FP32", [-1, 3])]

    def setup(self) -> None:
        import keras  # loads in the worker, where the thread budget applies

        self.model = keras.saving.load_model(self.options["path"])

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"y": self.model.predict(inputs["x"], verbose=0)}


def tensorflow_threads() -> str:
    """Runs in a worker through Pool.submit: the pool sizes its TensorFlow got."""
    import tensorflow as tf

    intra = tf.config.threading.get_intra_op_parallelism_threads()
    inter = tf.config.threading.get_inter_op_parallelism_threads()
    return f"worker {modelpool.worker_info().index}: TensorFlow intra-op {intra}, inter-op {inter}"


def build_and_save(path: str) -> Any:
    """Build a small Keras model with fixed weights, save it to ``path``, return it."""
    import keras

    rng = np.random.default_rng(0)
    model = keras.Sequential(
        [keras.Input(shape=(4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)]
    )
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.weights])
    model.save(path)
    return model


if __name__ == "__main__":  # required: workers re-import this file when they start
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        here = build_and_save(path)  # Keras runs in this process too: it may not fork now
        x = np.array([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.0, 1.0, 0.5]], dtype=np.float32)
        expected = here.predict(x, verbose=0)
        try:
            modelpool.Pool(KerasModel, options={"path": path}, start_method="fork").start()
        except modelpool.UnsafeForkError as exc:
            reason = str(exc).split(": ")[1]  # the first reason, without the advice
            print("start_method='fork' refused:", reason)
        with modelpool.Pool(KerasModel, workers=2, options={"path": path}) as pool:
            y = pool.predict({"x": x})["y"]
            print("y =", np.round(y, 3).tolist())
            print("matches the model run in this process:", bool(np.allclose(y, expected)))
            print(pool.submit(tensorflow_threads).result())
