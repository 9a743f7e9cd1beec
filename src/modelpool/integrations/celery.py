"""Inference as Celery tasks, without the prefork traps: ``install(app, config)``, ``predict``.

``install(app, "models.yaml")`` (in the module that defines the Celery app, after configuring it)
registers the task ``modelpool.predict(model_name, inputs)``, the ``modelpool`` serializer (msgpack;
arrays as dtype, shape and raw bytes; never pickle) and a worker bootstep. What the bootstep does
depends on the worker's pool (see docs/celery.md):

* ``--pool=threads`` (recommended) or ``solo``: the worker's main process starts one
  ``modelpool.Pool`` per configured model before it consumes any task; tasks call
  ``pool.predict`` from Celery's threads. Models run in modelpool's workers, started with
  forkserver, with all of its hygiene, crash handling, timeouts and recycling.
* ``--pool=prefork``: the bootstep refuses to start the worker if forking it now is unsafe
  (CUDA initialised, TensorFlow imported, threads running: ``UnsafeForkError``). Each child,
  after the fork, applies modelpool's hygiene and loads every model in a background thread
  (``worker_proc_alive_timeout`` is never hit); tasks wait for the model they need.

A task whose worker process dies is handled per ``worker_lost``: ``"redeliver"`` (default) runs it
again, at most ``max_deliveries`` times in all, then fails it with ``PoisonTaskError``;
``"fail"`` fails it at once. Deliveries are counted in the result backend.
"""

from __future__ import annotations

import gc
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, Literal

from modelpool import _hygiene
from modelpool._exceptions import (
    ModelpoolError,
    PoisonTaskError,
    UnsafeForkError,
    WorkerCrashedError,
)
from modelpool.config import Config, ConfigError, load_config

from . import _celery_codec, _celery_hosts

try:
    from celery import Task, bootsteps, signals
    from celery.exceptions import Reject
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"modelpool.integrations.celery needs Celery ({_exc}); run: pip install 'modelpool[celery]'"
    ) from _exc

__all__ = ["CONTENT_TYPE", "SERIALIZER", "TASK_NAME", "PoisonTaskError", "install", "predict"]

#: The task ``install`` registers, and the serializer (and content type) it accepts.
TASK_NAME = "modelpool.predict"
SERIALIZER = _celery_codec.NAME
CONTENT_TYPE = _celery_codec.CONTENT_TYPE

WorkerLost = Literal["redeliver", "fail"]
_KEY_PREFIX = "modelpool-deliveries-"
_KEY_TTL = 7 * 24 * 3600  # a forgotten delivery counter expires after a week

logger = logging.getLogger(__name__)


class _Settings:
    """What ``install`` was given, after validation (kept on the task as ``modelpool_settings``)."""

    def __init__(self, config: Config, worker_lost: str, max_deliveries: int) -> None:
        if worker_lost not in ("redeliver", "fail"):
            raise ConfigError(
                f"worker_lost={worker_lost!r} is not understood; use 'redeliver' (run the task "
                "again, at most max_deliveries times) or 'fail' (fail it at once)"
            )
        if isinstance(max_deliveries, bool) or not isinstance(max_deliveries, int):
            raise ConfigError(f"max_deliveries must be an int >= 1, got {max_deliveries!r}")
        if max_deliveries < 1:
            raise ConfigError(f"max_deliveries must be >= 1, got {max_deliveries!r}")
        self.config = config
        self.worker_lost = worker_lost
        #: deliveries a task may have in all (1 under "fail": a redelivered task fails)
        self.allowed = max_deliveries if worker_lost == "redeliver" else 1
        self.max_deliveries = max_deliveries


def _as_config(config: Any) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, str | os.PathLike):
        return load_config(config)
    if isinstance(config, Mapping):
        return Config.from_mapping(config, "<install(config=...)>")
    raise TypeError(
        f"config must be a path to a modelpool YAML file, a modelpool.config.Config or a "
        f"mapping, got {type(config).__name__}"
    )


def _add(values: Any, name: str) -> list[str]:
    items = [values] if isinstance(values, str) else list(values or ())
    return items if name in items else [*items, name]


def _source(config: Any) -> str:
    return os.fspath(config) if isinstance(config, str | os.PathLike) else "install(config=...)"


def _module_findable(module: str) -> bool:
    """Can ``module``'s top-level package be found from here, as a worker started in this
    directory resolves it? Nothing is imported (under prefork this runs in the parent)."""
    top = module.split(".", 1)[0]
    try:
        if importlib.util.find_spec(top) is not None:
            return True
    except (ImportError, ValueError):
        pass
    return importlib.machinery.PathFinder.find_spec(top, [os.getcwd()]) is not None


def _check_models(config: Config, source: str) -> None:
    """Raise ``ConfigError`` for a model whose module cannot be found from this process."""
    for name, settings in config.models.items():
        module = settings.model.partition(":")[0]
        if module and _module_findable(module):
            continue
        raise ConfigError(
            f"{source}: models.{name}.model: cannot find module {module!r} (from "
            f"{settings.model!r}) from this process: it is neither installed nor on sys.path, "
            f"nor in the working directory {os.getcwd()}. Celery workers look for it there "
            "too (as `modelpool serve` does), so they could not load it and tasks for "
            f"{name!r} would wait for a worker that never starts. Check the spelling, start "
            "the worker and this process in the directory that holds it, or set PYTHONPATH; "
            "a client that does not have the models' code passes check_models=False"
        )


def _models_from_working_directory() -> None:
    """Let model modules next to the app module import, in the worker and in every process it
    starts: ``celery -A tasks`` finds ``tasks.py`` in the working directory only while it
    imports it, so ``models:Net`` beside it would not import afterwards."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def install(
    app: Any,
    config: Any,
    *,
    worker_lost: WorkerLost = "redeliver",
    max_deliveries: int = 3,
    check_models: bool = True,
) -> Any:
    """Register ``modelpool.predict`` on ``app`` and arrange that the models of ``config`` load
    in the worker processes that run it, never in a parent before it forks.

    Call it in the module that defines the Celery app, after ``config_from_object`` (clients
    and workers both import that module; clients load no model). ``config`` is a path to a
    modelpool YAML file, a ``modelpool.config.Config`` or an equivalent mapping. Returns the
    registered task.

    ``worker_lost``: what happens to a task whose worker process dies (SIGKILL, SIGSEGV, out
    of memory): ``"redeliver"`` runs it again, ``max_deliveries`` times in all, then fails it
    with ``PoisonTaskError``; ``"fail"`` fails it at once (``WorkerCrashedError`` under
    ``--pool=threads``, Celery's ``WorkerLostError`` under prefork).

    ``check_models``: raise ``ConfigError`` now, in clients and workers alike, for a model
    whose module cannot be found from this process (searched as workers do: sys.path, then
    the working directory; nothing is imported). Pass False in a client that sends tasks
    without having the models' code.
    """
    settings = _Settings(_as_config(config), worker_lost, max_deliveries)
    if check_models:
        _check_models(settings.config, _source(config))
    _celery_codec.register()
    # now if configured, and again each time the configuration is (re)loaded, e.g. by a
    # config_from_object() after this call
    app.on_after_configure.connect(_on_configure, weak=False, dispatch_uid=_UID)
    if app.configured:
        _configure(app.conf)
    task = app.task(
        _predict,
        name=TASK_NAME,
        base=_PredictTask,
        shared=False,  # this app only; a shared task would reach every app created later
        bind=True,
        serializer=SERIALIZER,
        acks_late=True,
        reject_on_worker_lost=worker_lost == "redeliver",
        retry_on_worker_lost=False,
        modelpool_settings=settings,
    )
    app.steps["worker"].add(_WorkerStep)
    signals.worker_process_init.connect(_on_process_init, weak=False, dispatch_uid=_UID)
    signals.worker_process_shutdown.connect(_on_process_exit, weak=False, dispatch_uid=_UID)
    signals.worker_shutdown.connect(_on_worker_exit, weak=False, dispatch_uid=_UID)
    return task


def _configure(conf: Any) -> None:
    """Accept the modelpool serializer; store results with it (they carry arrays)."""
    conf.accept_content = _add(conf.accept_content, SERIALIZER)
    if conf.result_accept_content is not None:
        conf.result_accept_content = _add(conf.result_accept_content, SERIALIZER)
    conf.result_serializer = SERIALIZER


def _on_configure(sender: Any = None, source: Any = None, **_: Any) -> None:
    _configure(source if source is not None else sender.conf)


def predict(app: Any, model_name: str, inputs: Any, **apply_async_options: Any) -> Any:
    """Send ``inputs`` to model ``model_name`` through the broker; returns an ``AsyncResult``
    whose ``.get()`` gives the outputs (a dict of writable NumPy arrays)."""
    task = app.tasks.get(TASK_NAME)
    if task is None or not isinstance(getattr(task, "modelpool_settings", None), _Settings):
        raise ModelpoolError(
            f"{TASK_NAME} is not registered on this Celery app; call "
            "modelpool.integrations.celery.install(app, config) in the module that defines the "
            "app (clients need it too: it registers the serializer the results use)"
        )
    return task.apply_async((model_name, inputs), **apply_async_options)


# --------------------------------------------------------------------------- the task


class _PredictTask(Task):  # type: ignore[misc]
    """Sends with the modelpool serializer only, and consumes only that (``Strategy``)."""

    Strategy = f"{__name__}:_strategy"
    modelpool_settings: _Settings

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        serializer = options.setdefault("serializer", SERIALIZER)
        if serializer != SERIALIZER:
            raise ValueError(
                f"{TASK_NAME} travels only with serializer={SERIALIZER!r} (msgpack with raw "
                f"array bytes; never pickle), not {serializer!r}"
            )
        return super().apply_async(args, kwargs, **options)


def _strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """Celery's default strategy, behind a gate that refuses any other content type."""
    from celery.worker.strategy import default

    handle = default(task, app, consumer, **kwargs)

    def on_message(message: Any, *args: Any, **kw: Any) -> Any:
        if message.content_type != CONTENT_TYPE:
            return _refuse(task, consumer, message)
        return handle(message, *args, **kw)

    return on_message


def _refuse(task: Any, consumer: Any, message: Any) -> None:
    from kombu.exceptions import ContentDisallowed

    error = ContentDisallowed(
        f"{TASK_NAME} accepts only {CONTENT_TYPE} messages (the {SERIALIZER!r} serializer), "
        f"not {message.content_type}; nothing was run. Send it with "
        "modelpool.integrations.celery.predict(app, model_name, inputs)"
    )
    headers = message.headers or {}
    task_id = headers.get("id")
    logger.error("modelpool: refused task %s: %s", task_id, error)
    if task_id:
        task.backend.mark_as_failure(task_id, error)
    message.reject_log_error(logger, consumer.connection_errors, requeue=False)


def _plain(outputs: Any) -> Any:
    """torch tensors become NumPy arrays (the serializer carries arrays, not tensors)."""
    if isinstance(outputs, dict):
        return {k: _plain(v) for k, v in outputs.items()}
    if type(outputs).__module__ == "torch" and hasattr(outputs, "detach"):
        return outputs.detach().cpu().numpy()
    return outputs


def _predict(task: Any, model_name: str, inputs: Any) -> Any:
    settings: _Settings = task.modelpool_settings
    host = _HOST
    if host is None:
        raise ModelpoolError(
            f"{TASK_NAME} ran in a process that holds no models (pid {os.getpid()}): it runs "
            "only in a `celery worker` of an app on which install() was called (eager "
            "execution, task.apply() and task_always_eager are not supported)"
        )
    counter = _Deliveries.of(task.app)
    task_id = task.request.id
    deliveries = counter.count(task_id) if counter is not None and task_id else 1
    if deliveries > settings.allowed:
        if counter is not None:
            counter.forget(task_id)
        raise _poison(settings, task_id, model_name, deliveries, None)
    requeued = False
    try:
        return _plain(host.predict(model_name, inputs))
    except WorkerCrashedError as exc:  # --pool=threads: modelpool's worker died (after retries)
        if settings.worker_lost == "fail":
            raise
        if deliveries < settings.allowed:
            requeued = True  # and counted again when delivered again
            raise Reject(exc, requeue=True) from exc
        raise _poison(settings, task_id, model_name, deliveries, exc) from exc
    finally:
        if counter is not None and not requeued:
            counter.forget(task_id)


def _poison(
    settings: _Settings, task_id: str, model: str, deliveries: int, last: BaseException | None
) -> PoisonTaskError:
    if settings.worker_lost == "fail":
        message = (
            f"task {task_id} (model {model!r}) was delivered again after the worker running it "
            "was lost (the Celery worker or its host died mid-task); with worker_lost='fail' "
            "a task is not run twice"
        )
    else:
        ran = deliveries if last is not None else deliveries - 1
        message = (
            f"task {task_id} (model {model!r}) was delivered {ran} time(s) and its worker "
            f"process died each time{f' (last: {last})' if last is not None else ''}; it is "
            f"not delivered again (max_deliveries={settings.max_deliveries}). Its inputs "
            "probably crash the model (a poison task): run them against the model directly "
            "to see why"
        )
    facts = {}
    if isinstance(last, WorkerCrashedError):
        facts = {"pid": last.pid, "exitcode": last.exitcode, "signal_name": last.signal_name}
    return PoisonTaskError(message, deliveries=deliveries, **facts)


class _Deliveries:
    """Deliveries of each task, counted in the result backend (which must support ``incr``)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    @staticmethod
    def supported(backend_cls: Any) -> bool:
        from celery.backends.base import BaseKeyValueStoreBackend

        return bool(
            isinstance(backend_cls, type)
            and issubclass(backend_cls, BaseKeyValueStoreBackend)
            and getattr(backend_cls, "incr", None) is not BaseKeyValueStoreBackend.incr
        )

    @classmethod
    def of(cls, app: Any) -> _Deliveries | None:
        backend = app.backend
        return cls(backend) if cls.supported(type(backend)) else None

    def count(self, task_id: str) -> int:
        key = _KEY_PREFIX + task_id
        n = int(self.backend.incr(key))
        self.backend.expire(key, _KEY_TTL)
        return n

    def forget(self, task_id: str) -> None:
        self.backend.delete(_KEY_PREFIX + task_id)


# --------------------------------------------------------------------------- the worker side

_UID = "modelpool.integrations.celery"
_HOST: Any = None  # the Host of this process: PoolHost (threads) or InProcessHost (prefork)
_PREFORK: tuple[Config, _celery_hosts.ChildPlan] | None = None  # set in the parent, before fork
_FORKS = 0  # children forked so far by this (parent) process: the child's generation


def _count_fork() -> None:
    global _FORKS
    _FORKS += 1


def _pool_kind(pool_cls: Any) -> str:
    module = getattr(pool_cls, "__module__", "")
    names = {
        "celery.concurrency.prefork": "prefork",
        "celery.concurrency.thread": "threads",
        "celery.concurrency.solo": "threads",
    }
    for cls in getattr(pool_cls, "__mro__", ()):
        if cls.__module__ in names and cls.__name__ == "TaskPool":
            return names[cls.__module__]
    return module or repr(pool_cls)


class _WorkerStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: checks and prepares at worker creation (before any child is forked);
    under ``--pool=threads`` starts the pools before the consumer takes any task."""

    label = "modelpool"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        global _PREFORK
        super().__init__(worker, **kwargs)
        task = worker.app.tasks.get(TASK_NAME)
        self.settings: _Settings | None = getattr(task, "modelpool_settings", None)
        self.kind = _pool_kind(worker.pool_cls)
        if self.settings is None:
            return
        _models_from_working_directory()  # before any pool starts or any child is forked
        backend_cls = _backend_class(worker.app)
        if self.settings.worker_lost == "redeliver" and not _Deliveries.supported(backend_cls):
            raise ConfigError(
                "worker_lost='redeliver' counts each task's deliveries in the result backend, "
                f"and {getattr(backend_cls, '__name__', backend_cls)} cannot count; configure "
                "a Redis result backend (result_backend='redis://...'), or install() with "
                "worker_lost='fail'"
            )
        if self.kind == "prefork":
            method = worker.app.conf.get("worker_pool_start_method", "fork")
            if method != "fork":
                raise ConfigError(
                    f"modelpool supports --pool=prefork with worker_pool_start_method='fork' "
                    f"only, not {method!r} (a {method} child rebuilds the app without running "
                    "install(), so it knows neither the task nor its serializer); use "
                    "--pool=threads, which never forks after your imports"
                )
            hazards = _hygiene.fork_hazards()
            if hazards:
                # the worker exits with this error: spare it the collection of everything at
                # exit (seconds of CPU with TensorFlow loaded, more on a busy machine)
                gc.freeze()
                raise UnsafeForkError(
                    "modelpool refuses to start this Celery worker with --pool=prefork: it "
                    "would fork its pool children after "
                    + "; ".join(hazards)
                    + ". Models in those children would hang or crash. Start the worker with "
                    "--pool=threads (modelpool then runs the models in processes it starts "
                    "safely), or move these imports/threads out of the module that defines the "
                    "Celery app (import heavy libraries in the model's module or setup())"
                )
            _PREFORK = (
                self.settings.config,
                _celery_hosts.child_plan(self.settings.config, int(worker.concurrency or 1)),
            )
            os.register_at_fork(before=_count_fork)
        elif self.kind != "threads":
            raise ConfigError(
                f"modelpool supports Celery's --pool=threads, solo and prefork, not {self.kind}"
            )

    def start(self, worker: Any) -> None:
        global _HOST
        if self.settings is None or self.kind != "threads":
            return
        host = _celery_hosts.PoolHost(self.settings.config).start(_stop_requested)
        if host is None:  # told to stop while the models loaded: stop now, not after
            logger.warning("modelpool: told to stop while the models were loading; stopped them")
            importlib.import_module("celery.worker.state").maybe_shutdown()
            return
        _HOST = host
        _freeze_long_lived()


def _freeze_long_lived() -> None:
    """Move what lives as long as the worker (the app's imports, the pools) out of the garbage
    collector's reach, after one collection: its full passes no longer walk them, and the
    interpreter's exit no longer collects them one by one (with TensorFlow imported by the
    app module, a warm shutdown took 2.4 s idle and 5-6 s on a loaded 2-core machine, almost
    all of it collection at exit; frozen, 1.2 and 1.7-1.9 s: docs/celery.md)."""
    gc.collect()
    gc.freeze()


def _stop_requested() -> bool:
    """Whether Celery was told to stop (its signal handlers only set these flags)."""
    state = importlib.import_module("celery.worker.state")
    return any(
        flag is not None and flag is not False
        for flag in (state.should_stop, state.should_terminate)
    )


def _backend_class(app: Any) -> Any:
    from celery.app import backends

    try:
        cls, _ = backends.by_url(app.backend_cls or app.conf.result_backend, app.loader)
    except Exception:
        return type(app.backend)
    return cls


def _on_worker_exit(**_: Any) -> None:
    """``worker_shutdown`` (main process, after Celery's own pool drained): stop the pools."""
    global _HOST
    host, _HOST = _HOST, None
    if isinstance(host, _celery_hosts.PoolHost):
        host.close()


def _on_process_init(**_: Any) -> None:
    """``worker_process_init`` (a prefork child, just forked): hygiene, then load in the
    background. Returns at once, so ``worker_proc_alive_timeout`` is never hit."""
    global _HOST
    prefork = _PREFORK
    if prefork is None:
        return
    process = importlib.import_module("billiard.process").current_process()
    config, plan = prefork
    index = int(getattr(process, "index", 0) or 0)  # the child's slot, 0..concurrency-1
    _HOST = _celery_hosts.InProcessHost(config, plan, index, _FORKS).start()


def _on_process_exit(**_: Any) -> None:
    global _HOST
    host, _HOST = _HOST, None
    if isinstance(host, _celery_hosts.InProcessHost):
        host.close()
