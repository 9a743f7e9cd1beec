"""Where a Celery worker's models live: the seam between the Celery glue and modelpool.

``PoolHost`` (``--pool=threads`` or ``solo``): one ``modelpool.Pool`` per configured model,
started in the Celery worker's main process; the models run in modelpool's own worker processes
(forkserver), so nothing is ever forked after CUDA or TensorFlow initialised.

``InProcessHost`` (``--pool=prefork``): a prefork child is daemonic and may not start processes
of its own, so the child itself hosts every configured model. It applies modelpool's hygiene
first (SIGINT ignored, thread limits, per-child seeds, one device), then loads the models in a
background thread, so ``worker_process_init`` returns at once and Celery's
``worker_proc_alive_timeout`` never kills a child that loads a big model.

Both answer ``predict(model_name, inputs)`` and ``close()``; the task code knows nothing else.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import os
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, Protocol

from modelpool import _hygiene, _worker
from modelpool._exceptions import ModelSetupError, ModelSpecError, UnsafeForkError
from modelpool._model import normalize_inputs
from modelpool._pool import Pool
from modelpool.config import Config, ModelSettings

__all__ = ["ChildPlan", "Host", "InProcessHost", "PoolHost", "child_plan", "inherited_hazards"]

#: how often a loading ``PoolHost`` asks whether the worker was told to stop (seconds)
_INTERRUPT_POLL = 0.1


class Host(Protocol):
    def predict(self, model_name: str, inputs: Any) -> Any: ...

    def close(self) -> None: ...


def _unknown(model_name: str, names: Any) -> ModelSpecError:
    return ModelSpecError(
        f"no model named {model_name!r} in this worker's modelpool configuration; it serves: "
        f"{', '.join(sorted(names))}. Check the name, or the config file the worker was "
        "started with"
    )


class PoolHost:
    """One started ``modelpool.Pool`` per model, in the Celery worker's main process."""

    def __init__(self, config: Config) -> None:
        self._pools = {
            name: Pool(settings.model, **settings.pool_kwargs())
            for name, settings in config.models.items()
        }

    def start(self, interrupted: Callable[[], bool] = lambda: False) -> PoolHost | None:
        """Start every pool (models load in parallel) and wait until all are ready; on a
        failure, stop them all and raise it (``ModelSetupError``, ``UnsafeForkError``...).

        ``interrupted`` is asked while the models load (the worker was told to stop: SIGTERM,
        Ctrl+C): the loading workers are then stopped and reaped, and None is returned, so a
        model that takes minutes to load does not keep the worker from stopping."""
        pools = self._pools
        with cf.ThreadPoolExecutor(len(pools), thread_name_prefix="modelpool-start") as ex:
            futures = {name: ex.submit(pool.start) for name, pool in pools.items()}
            pending = set(futures.values())
            while pending:
                pending = cf.wait(pending, timeout=_INTERRUPT_POLL)[1]
                if pending and interrupted():
                    self.close()  # (the loading workers are killed; each start() raises)
                    return None
            errors = {name: f.exception() for name, f in futures.items()}
        for name, error in errors.items():
            if error is None:
                continue
            self.close()
            if isinstance(error, ModelSetupError):
                raise ModelSetupError(
                    f"model {name!r} could not load in this Celery worker: {error}"
                ) from error
            raise error
        return self

    def predict(self, model_name: str, inputs: Any) -> Any:
        pool = self._pools.get(model_name)
        if pool is None:
            raise _unknown(model_name, self._pools)
        return pool.predict(inputs)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=False)
        for pool in self._pools.values():
            pool.shutdown(wait=True)


# --------------------------------------------------------------------------- prefork


@dataclasses.dataclass(frozen=True)
class ChildPlan:
    """What each prefork child applies to itself, decided once in the worker's main process."""

    threads: int
    env: dict[str, str]
    seed: int
    devices: tuple[dict[str, str], ...]


def child_plan(config: Config, concurrency: int) -> ChildPlan:
    """Thread budget (cores // children, or the models' ``threads_per_worker``), base seed and
    devices for the children of a prefork worker with ``concurrency`` children.

    Every child hosts every model, so per-model settings that act on the whole process must
    agree between models: ``threads_per_worker`` (the largest wins), ``seed`` (the first given)
    and ``devices`` (one list, or none).
    """
    models = list(config.models.values())
    explicit = [m.threads_per_worker for m in models if m.threads_per_worker is not None]
    threads = _hygiene.resolve_threads(max(explicit) if explicit else None, concurrency)
    env = _hygiene.thread_env(threads, explicit=bool(explicit))
    seeds = [m.seed for m in models if m.seed is not None]
    seed = seeds[0] if seeds else int.from_bytes(os.urandom(4), "little")
    lists = {tuple(m.devices) for m in models if m.devices}
    if len(lists) > 1:
        from modelpool.config import ConfigError

        raise ConfigError(
            "under --pool=prefork every child hosts every model, so the models' 'devices' "
            f"lists must be the same (got {sorted(lists)}); use --pool=threads to give each "
            "model its own devices"
        )
    devices = tuple(_hygiene.device_env(d) for d in (lists.pop() if lists else ()))
    return ChildPlan(threads=threads, env=env, seed=seed, devices=devices)


def inherited_hazards() -> list[str]:
    """State a forked child can see it inherited and cannot use (checked before loading)."""
    reasons = []
    if "tensorflow" in sys.modules:
        reasons.append("TensorFlow was imported in the worker's main process before the fork")
    torch: Any = sys.modules.get("torch")
    if torch is not None:
        bad_fork = getattr(getattr(torch, "cuda", None), "_is_in_bad_fork", None)
        if callable(bad_fork) and bad_fork():
            reasons.append("CUDA was initialised in the worker's main process before the fork")
    return reasons


@dataclasses.dataclass
class _Slot:
    settings: ModelSettings
    loaded: threading.Event = dataclasses.field(default_factory=threading.Event)
    model: Any = None
    predict: Any = None
    specs: tuple[Any, ...] = ()
    error: BaseException | None = None


class InProcessHost:
    """Every configured model, loaded inside this (prefork child) process."""

    def __init__(self, config: Config, plan: ChildPlan, index: int, generation: int) -> None:
        self._slots = {name: _Slot(s) for name, s in config.models.items()}
        self._plan = plan
        self._index = index
        self._seed = _hygiene.derive_seed(plan.seed, index, generation)
        self._generation = generation
        self._seeded: frozenset[str] = frozenset()
        self._closed = False

    def start(self) -> InProcessHost:
        """Hygiene now (this thread is the child's main thread), loading in the background."""
        plan = self._plan
        _hygiene.ignore_sigint()
        env = dict(plan.env)
        if plan.devices:
            env.update(plan.devices[self._index % len(plan.devices)])
        os.environ.update(env)
        _hygiene.limit_thread_pools(plan.threads, env)  # e.g. NumPy's BLAS, loaded before fork
        self._seeded = _hygiene.seed_rngs(self._seed)
        _hygiene.limit_when_imported(self._seed, plan.threads, env)
        _worker.set_worker_info(
            _worker.WorkerInfo(self._index, self._generation, os.getpid(), self._seed, plan.threads)
        )
        threading.Thread(
            target=self._load_all, args=(env,), name="modelpool-celery-load", daemon=True
        ).start()
        return self

    def _load_all(self, env: dict[str, str]) -> None:
        hazards = inherited_hazards()
        for name, slot in self._slots.items():
            try:
                if hazards:
                    raise UnsafeForkError(
                        "this Celery prefork child cannot load models: "
                        + "; ".join(hazards)
                        + ". Start the worker with --pool=threads, or keep that import out of "
                        "the module that defines the Celery app"
                    )
                self._load(slot)
            except BaseException as exc:
                error = ModelSetupError(
                    f"model {name!r} ({slot.settings.model}) failed to load in Celery worker "
                    f"process {os.getpid()}: {type(exc).__name__}: {exc}"
                )
                error.__cause__ = exc
                slot.error = error
                sys.stderr.write(f"modelpool: {error}\n{traceback.format_exc()}")
            finally:
                slot.loaded.set()
        self._seeded = _hygiene.seed_rngs(self._seed, only_new=self._seeded)
        _hygiene.limit_thread_pools(self._plan.threads, env)

    def _load(self, slot: _Slot) -> None:
        from modelpool._importer import import_from_string

        cls = import_from_string(slot.settings.model)
        self._seeded = _hygiene.seed_rngs(self._seed, only_new=self._seeded)
        model = cls(**slot.settings.options)
        setup = getattr(model, "setup", None)
        if setup is not None:
            setup()
        predict = getattr(model, "predict", None)
        if not callable(predict):
            raise ModelSpecError(f"{cls.__qualname__} has no predict(inputs) method; define one")
        slot.specs = tuple(getattr(cls, "inputs", ()) or ())
        slot.model, slot.predict = model, predict

    def predict(self, model_name: str, inputs: Any) -> Any:
        slot = self._slots.get(model_name)
        if slot is None:
            raise _unknown(model_name, self._slots)
        timeout = slot.settings.setup_timeout
        if not slot.loaded.wait(timeout):
            raise ModelSetupError(
                f"model {model_name!r} did not finish loading within setup_timeout={timeout} s "
                f"in Celery worker process {os.getpid()}"
            )
        if slot.error is not None:
            raise slot.error
        return slot.predict(normalize_inputs(inputs, slot.specs, model_name))

    def close(self) -> None:
        """Run every loaded model's ``teardown()`` (the child is exiting)."""
        if self._closed:
            return
        self._closed = True
        for name, slot in self._slots.items():
            teardown = getattr(slot.model, "teardown", None)
            if slot.loaded.is_set() and teardown is not None:
                try:
                    teardown()
                except Exception:
                    sys.stderr.write(f"modelpool: teardown() of model {name!r} raised:\n")
                    traceback.print_exc()
