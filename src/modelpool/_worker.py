"""The child side: hygiene, ``setup()``, the request loop, ``teardown()``.

``run_worker`` is the target of every worker process. Order matters and is the point of this
module: ignore SIGINT, tie our life to the pool's, set thread limits, *then* import the model's
module, seed, ``setup()``, limit the thread pools the model loaded, report ready, serve.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

from . import _hygiene, _transport
from ._exceptions import ModelpoolError

__all__ = [
    "CALL",
    "ERR",
    "OK",
    "PREDICT",
    "READY",
    "SETUP_FAILED",
    "STOP",
    "WorkerInfo",
    "WorkerSpec",
    "current_model",
    "run_worker",
    "worker_info",
]

# Message kinds, parent -> worker
PREDICT, CALL, STOP = 1, 2, 3
# Message kinds, worker -> parent
READY, SETUP_FAILED, OK, ERR = 11, 12, 13, 14

#: Exit code of a worker whose setup failed (after it reported why).
EXIT_SETUP_FAILED = 3


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """Facts about the worker process this code runs in (see ``modelpool.worker_info()``).

    ``index`` is the worker's slot (0..workers-1), ``generation`` how many times that slot has
    been restarted, ``seed`` the seed given to ``random``, NumPy and torch, ``threads`` the
    thread budget of this worker.
    """

    index: int
    generation: int
    pid: int
    seed: int
    threads: int


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, sent to it at start (must pickle)."""

    model_ref: str | None
    model_name: str
    options: dict[str, Any]
    index: int
    generation: int
    seed: int
    threads: int
    env: dict[str, str]


_INFO: WorkerInfo | None = None
_MODEL: Any = None


def worker_info() -> WorkerInfo | None:
    """This worker's ``WorkerInfo``; ``None`` when not called inside a modelpool worker."""
    return _INFO


def current_model() -> Any:
    """The model loaded in this worker, for functions run with ``Pool.submit``."""
    if _INFO is None:
        raise ModelpoolError(
            "current_model() was called outside a modelpool worker; call it from code that "
            "runs in a worker (a model method or a function passed to Pool.submit)"
        )
    if _MODEL is None:
        raise ModelpoolError(
            "this pool has no model (it was created without one); pass a model to Pool(...) "
            "to use current_model()"
        )
    return _MODEL


def _load(spec: WorkerSpec) -> Any:
    seeded = _hygiene.seed_rngs(spec.seed)
    if spec.model_ref is None:
        return None
    from ._importer import import_from_string

    cls = import_from_string(spec.model_ref)
    seeded = _hygiene.seed_rngs(spec.seed, only_new=seeded)  # e.g. torch, imported just now
    _hygiene.limit_thread_pools(spec.threads)
    model = cls(**spec.options)
    setup = getattr(model, "setup", None)
    if setup is not None:
        setup()
    _hygiene.seed_rngs(spec.seed, only_new=seeded)
    _hygiene.limit_thread_pools(spec.threads)
    return model


def run_worker(spec: WorkerSpec, conn: Connection, lifeline: Connection) -> None:
    """Entry point of a worker process."""
    global _INFO, _MODEL
    _hygiene.ignore_sigint()
    _hygiene.die_with_parent(lifeline)
    _hygiene.apply_env(spec.env)
    _hygiene.limit_thread_pools(spec.threads)  # pools loaded before us (forkserver, __main__)
    _INFO = WorkerInfo(spec.index, spec.generation, os.getpid(), spec.seed, spec.threads)
    try:
        _MODEL = _load(spec)
    except BaseException as exc:
        _transport.send(conn, (SETUP_FAILED, 0, _transport.RemoteException.capture(exc)))
        conn.close()
        os._exit(EXIT_SETUP_FAILED)
    _transport.send(conn, (READY, 0, os.getpid()))
    _serve(conn, _MODEL)
    conn.close()


def _serve(conn: Connection, model: Any) -> None:
    predict = getattr(model, "predict", None)
    while True:
        try:
            kind, rid, payload = _transport.recv(conn)
        except (EOFError, OSError):
            return  # the pool is gone
        if kind == STOP:
            _teardown(model)
            return
        try:
            if kind == PREDICT:
                if predict is None:
                    raise ModelpoolError("this pool has no model; use submit() to run functions")
                result = predict(payload)
            else:
                fn, args, kwargs = payload
                result = fn(*args, **kwargs)
            reply: tuple[int, int, Any] = (OK, rid, result)
        except Exception as exc:
            reply = (ERR, rid, _transport.RemoteException.capture(exc))
        try:
            _transport.send(conn, reply)
        except (BrokenPipeError, ConnectionResetError):
            return
        except Exception as exc:  # the result could not be encoded
            what = "predict" if kind == PREDICT else "the function"
            err = TypeError(
                f"{what} returned a result that cannot be sent back to the caller: "
                f"{type(exc).__name__}: {exc}. Return NumPy arrays, torch tensors or other "
                "picklable values."
            )
            _transport.send(conn, (ERR, rid, _transport.RemoteException.capture(err)))
        del reply, payload


def _teardown(model: Any) -> None:
    teardown = getattr(model, "teardown", None)
    if teardown is None:
        return
    try:
        teardown()
    except Exception:
        sys.stderr.write(f"modelpool worker {os.getpid()}: teardown() raised:\n")
        traceback.print_exc()
