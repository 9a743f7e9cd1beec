"""Real TensorFlow through Celery, against a real Redis and real ``celery worker`` processes.

The classic report: a Celery app module loads a Keras model at import, and under the default
``--pool=prefork`` every task hangs (reproduced here without modelpool: ``plain``). With
modelpool's integration the same app module runs under ``--pool=threads`` (the models run in
processes modelpool starts fresh), a model that loads Keras in ``setup()`` runs under
``--pool=prefork``, and a prefork worker whose app module started TensorFlow refuses to start,
naming TensorFlow and saying what to do. Workers start together (each loads TensorFlow for
seconds); one xdist worker runs the module.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _celery_worker import HERE, SRC, CeleryWorker, new_queue

import _tf_models as m
from _deps import deferred_module, need_module

celery = deferred_module("celery")
celery_app = deferred_module("_celery_app", "celery", "msgpack")
mp_celery = deferred_module("modelpool.integrations.celery", "celery", "msgpack")

#: seconds for a worker to be ready: four start at once, each (and its model processes)
#: importing TensorFlow, on CPUs the rest of the suite shares (one took over 120 s under a
#: CPU burner on 2 cores)
STARTUP = 300.0

pytestmark = [pytest.mark.xdist_group("tensorflow-celery"), pytest.mark.timeout(STARTUP + 180)]

TESTS = Path(HERE).parent
#: a tiny predict() takes about 0.2 s once TensorFlow is loaded; 10 s without an answer is a hang
HUNG_AFTER = 10.0
X = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)


def _config(keras_file: Path) -> dict[str, Any]:
    return {
        "models": {
            "module_level": {"model": "_tf_module_level:ModuleLevelKeras"},
            "keras": {"model": "_tf_models:KerasModel", "options": {"path": str(keras_file)}},
        }
    }


@pytest.fixture(scope="module")
def workers(
    worker_factory: Callable[..., CeleryWorker], shared_tmp: Path
) -> dict[str, tuple[CeleryWorker, str, dict[str, Any]]]:
    """kind -> (worker, queue, config): ``threads`` and ``refused`` import the Keras model at
    the top of the app module; ``prefork`` does not; ``plain`` is the app without modelpool."""
    need_module("tensorflow")
    keras_file = m.saved_keras(shared_tmp)
    config = _config(keras_file)
    env = {
        "PYTHONPATH": os.pathsep.join([str(HERE), str(SRC), str(TESTS)]),
        "MODELPOOL_TEST_KERAS": str(keras_file),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    at_top = {**env, "MODELPOOL_TEST_IMPORT_KERAS": "1"}
    kinds: dict[str, dict[str, Any]] = {
        "threads": {"pool": "threads", "env": at_top},
        "prefork": {"pool": "prefork", "env": env},
        "refused": {"pool": "prefork", "env": at_top},
        "plain": {"pool": "prefork", "env": env, "app": "_celery_plain_keras"},
    }
    out = {}
    for kind, options in kinds.items():
        queue = new_queue()
        worker = worker_factory(config, queue, name=f"tf-{kind}", concurrency=1, **options)
        out[kind] = (worker, queue, config)
    return out


def _predict(workers: dict[str, Any], kind: str, model: str) -> np.ndarray:
    worker, queue, config = workers[kind]
    worker.wait_ready(timeout=STARTUP)
    app = celery_app.make_app(worker.broker, config, queue)
    try:
        out = mp_celery.predict(app, model, {"x": X}).get(timeout=120)
    finally:
        app.close()
    return np.asarray(out["y"])


def test_keras_loaded_by_the_app_module_hangs_prefork_without_modelpool(
    workers: dict[str, Any],
) -> None:
    """The control: the app module loaded the model in the worker's main process; prefork's
    child inherits it, and its first predict() never returns."""
    worker, queue, _ = workers["plain"]
    worker.wait_ready(timeout=STARTUP)
    app = celery.Celery("client", broker=worker.broker, backend=worker.broker)
    try:
        result = app.send_task("plain_keras.predict", args=[X.tolist()], queue=queue)
        with pytest.raises(celery.exceptions.TimeoutError):
            result.get(timeout=HUNG_AFTER)
    finally:
        app.close()
        # end the hung task (a warm shutdown would wait for it forever): kill the child; the
        # child prefork starts in its place is idle, and stops with the worker
        for child in worker.children():
            child.kill()


def test_threads_pool_serves_the_app_module_that_loaded_keras(workers: dict[str, Any]) -> None:
    """The same app module (Keras loaded at import, in the worker's main process) under
    ``--pool=threads``: modelpool's workers start fresh and answer."""
    y = _predict(workers, "threads", "module_level")
    np.testing.assert_allclose(y, m.reference(X), atol=1e-5)


def test_prefork_serves_a_model_that_loads_keras_in_setup(workers: dict[str, Any]) -> None:
    y = _predict(workers, "prefork", "keras")
    np.testing.assert_allclose(y, m.reference(X), atol=1e-5)


def test_prefork_refuses_an_app_module_that_started_tensorflow(workers: dict[str, Any]) -> None:
    worker = workers["refused"][0]
    assert worker.wait_exit(timeout=120) != 0
    log = worker.log
    assert "UnsafeForkError: modelpool refuses to start this Celery worker" in log
    assert "TensorFlow's runtime has started in this process" in log
    assert "--pool=threads" in log
    assert "import TensorFlow only where the model loads" in log
    assert "ForkPoolWorker" not in log, "no child was forked"
