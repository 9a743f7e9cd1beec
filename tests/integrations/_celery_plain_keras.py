"""A Celery app written the way the bug reports write it, without modelpool: the Keras model
loads when the app module is imported (``_tf_module_level``), and a task predicts with it.
Configured from the environment like ``_celery_app`` (``MODELPOOL_TEST_BROKER``, ``_QUEUE``,
``MODELPOOL_TEST_KERAS``)."""

from __future__ import annotations

import os

import numpy as np
from celery import Celery

import _tf_module_level

app = Celery("plain_keras", broker=os.environ["MODELPOOL_TEST_BROKER"])
app.conf.update(
    result_backend=os.environ["MODELPOOL_TEST_BROKER"],
    task_default_queue=os.environ["MODELPOOL_TEST_QUEUE"],
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)


@app.task(name="plain_keras.predict")
def predict(rows: list[list[float]]) -> list[list[float]]:
    x = np.asarray(rows, dtype=np.float32)
    return _tf_module_level.MODEL.predict(x, verbose=0).tolist()  # type: ignore[no-any-return]
