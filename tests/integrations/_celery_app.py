"""The Celery app of the tests: ``make_app`` for the test process (the client), and the module
attribute ``app`` that ``celery -A _celery_app worker`` finds, configured from the environment
by the fixtures (``MODELPOOL_TEST_*``)."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from modelpool.integrations import celery as mp_celery


def make_app(broker: str, config: Any, queue: str, **install_options: Any) -> Celery:
    app = Celery("modelpool_tests", broker=broker, backend=broker, set_as_current=False)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        # a dead prefork child's task fails (or is requeued) at once, not 10 s later
        worker_lost_wait=0.05,
        worker_proc_alive_timeout=float(os.environ.get("MODELPOOL_TEST_ALIVE_TIMEOUT", "4")),
        result_expires=600,
        task_default_queue=queue,
    )
    mp_celery.install(app, config, **install_options)
    return app


def _from_environment() -> Celery | None:
    broker = os.environ.get("MODELPOOL_TEST_BROKER")
    if not broker:
        return None
    if os.environ.get("MODELPOOL_TEST_IMPORT_AT_TOP"):
        # The trap: the app module imports a library that starts its runtime's threads at
        # import, in the worker's main process, before prefork forks the children.
        import _tfstyle  # noqa: F401
    if os.environ.get("MODELPOOL_TEST_IMPORT_KERAS"):
        # The real one: a Keras model loaded at import (MODELPOOL_TEST_KERAS names the file).
        import _tf_module_level  # noqa: F401

    options: dict[str, Any] = {}
    if os.environ.get("MODELPOOL_TEST_WORKER_LOST"):
        options["worker_lost"] = os.environ["MODELPOOL_TEST_WORKER_LOST"]
    if os.environ.get("MODELPOOL_TEST_MAX_DELIVERIES"):
        options["max_deliveries"] = int(os.environ["MODELPOOL_TEST_MAX_DELIVERIES"])
    return make_app(
        broker, os.environ["MODELPOOL_TEST_CONFIG"], os.environ["MODELPOOL_TEST_QUEUE"], **options
    )


app = _from_environment()
