"""torch on what the Celery task delivers: a model doing ``torch.from_numpy`` and an in-place
op, with warnings as errors, called through ``modelpool.integrations.celery.predict`` with an
input that is read-only in the caller (``np.frombuffer``), on a ``--pool=threads`` worker
(the model runs in a modelpool worker) and a ``--pool=prefork`` one (in Celery's child). The
server's side: server/test_torch_inputs.py."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _celery_worker import HERE, SRC, CeleryWorker, new_queue

from _deps import deferred_module, need_module

celery_app = deferred_module("_celery_app", "celery", "msgpack")
mp_celery = deferred_module("modelpool.integrations.celery", "celery", "msgpack")

TESTS = Path(HERE).parent
CONFIG = {"models": {"inplace": {"model": "_torch_cv_models:TorchInPlace"}}}


@pytest.fixture(scope="module")
def workers(worker_factory: Callable[..., CeleryWorker]) -> dict[str, tuple[CeleryWorker, str]]:
    """One worker per pool kind, started together; tests/ on their path for the model."""
    need_module("torch")
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), str(SRC), str(TESTS)])}
    out = {}
    for pool in ("threads", "prefork"):
        queue = new_queue()
        worker = worker_factory(
            CONFIG, queue, name=f"torch-{pool}", pool=pool, concurrency=1, env=env
        )
        out[pool] = (worker, queue)
    return out


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_read_only_input_is_safe_for_torch_from_numpy(
    workers: dict[str, tuple[CeleryWorker, str]], pool: str
) -> None:
    worker, queue = workers[pool]
    worker.wait_ready()
    app = celery_app.make_app(worker.broker, CONFIG, queue)
    raw = np.arange(8, dtype=np.float32).tobytes()
    x = np.frombuffer(raw, dtype=np.float32).reshape(2, 4)
    assert not x.flags.writeable
    try:
        out: dict[str, Any] = mp_celery.predict(app, "inplace", {"x": x}).get(timeout=60)
    finally:
        app.close()
    np.testing.assert_array_equal(out["y"], x + 1)
    assert out["writable"].tolist() == [True], "the input arrived read-only in the model"
    assert raw == np.arange(8, dtype=np.float32).tobytes()
    assert "non-writable" not in worker.log, worker.log  # torch's warning
