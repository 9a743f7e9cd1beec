"""Inference as Celery tasks with modelpool: the app, the worker and a client in one file.

Needs a Redis server (``redis-server``) and ``pip install 'modelpool[celery]'``. From this
directory, start a worker (``--pool=threads`` is the recommended pool; see docs/celery.md):

    celery -A celery_app worker --pool=threads --concurrency=8 --loglevel=INFO

then, in another shell, send work through the broker:

    python celery_app.py

Every machine that runs a worker or sends tasks imports this module: ``install`` loads no model
in a client, and loads the models in a worker only after Celery has started (and, under
``--pool=prefork``, forked) its processes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from celery import Celery

from modelpool.integrations import celery as modelpool_celery

BROKER = os.environ.get("MODELPOOL_BROKER", "redis://localhost:6379/0")

app = Celery("modelpool_example", broker=BROKER, backend=BROKER)
app.conf.update(
    broker_connection_retry_on_startup=True,  # retry the broker at start-up (Celery 6 default)
    worker_prefetch_multiplier=1,  # with acks_late, a worker holds only what it runs
    result_expires=3600,
)
# After the app is configured: registers modelpool.predict and its serializer.
modelpool_celery.install(app, Path(__file__).with_name("celery_models.yaml"))


def main() -> None:
    flowers = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
    results = [modelpool_celery.predict(app, "iris", {"INPUT0": row[None]}) for row in flowers]
    for row, result in zip(flowers, results, strict=True):
        out = result.get(timeout=30)  # a dict of writable NumPy arrays
        print(row, "->", out["LABEL"][0], out["PROBABILITIES"][0].round(3))


if __name__ == "__main__":
    main()
