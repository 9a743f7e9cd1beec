"""The classic way to write a Keras model module: the model loads at import, at module level.

Whatever imports this module (a Celery app, a server's front process) starts TensorFlow's
runtime in that process, before any worker is forked. The saved model's path comes from
``MODELPOOL_TEST_KERAS`` (set by the test).
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # (before TensorFlow loads)

import keras

import modelpool

MODEL = keras.saving.load_model(os.environ["MODELPOOL_TEST_KERAS"])


class ModuleLevelKeras(modelpool.Model):
    inputs = (modelpool.TensorSpec("x", "FP32", [-1, 4]),)
    outputs = (modelpool.TensorSpec("y", "FP32", [-1, 3]),)

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {"y": MODEL.predict(inputs["x"], verbose=0)}
