"""The child side: hygiene, ``setup()``, the request loop, ``teardown()``.

``run_worker`` is the target of every worker process. Order matters and is the point of this
module: ignore SIGINT, tie our life to the pool's, set thread limits, *then* import the model's
module, seed, ``setup()``, limit the thread pools the model loaded, report ready, serve.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

from . import _hygiene, _infer, _logs, _output, _shm, _transport
from ._exceptions import ModelSpecError, SerializationError
from ._settings import PoolSettings
from ._streaming import CANCEL, CREDIT, STREAM, STREAM_INFER, run_stream

__all__ = [
    "CALL",
    "ERR",
    "INFER",
    "INFER_BATCH",
    "OK",
    "PREDICT",
    "PREDICT_TAGGED",
    "READY",
    "SETUP_FAILED",
    "STOP",
    "WorkerInfo",
    "WorkerSpec",
    "current_model",
    "model_loaded",
    "run_worker",
    "set_worker_info",
    "worker_info",
]

# Message kinds, parent -> worker. PREDICT_TAGGED: a predict whose payload is
# (request id, inputs); the id is what ``modelpool.request_id()`` returns while it runs.
# INFER: an HTTP inference request's bytes, decoded and answered here (``_infer``).
# INFER_BATCH: several of those, as (max_batch_size, [payload, ...]), batched here.
PREDICT, CALL, STOP, PREDICT_TAGGED, INFER, INFER_BATCH = 1, 2, 3, 4, 5, 6
# Message kinds, worker -> parent
READY, SETUP_FAILED, OK, ERR = 11, 12, 13, 14

#: Exit code of a worker whose setup failed (after it reported why).
EXIT_SETUP_FAILED = 3
#: Exit code of a worker that could not write an answer to the pool (see ``describe_exit``).
EXIT_TRANSPORT = 4


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """Facts about the worker process this code runs in (see ``modelpool.worker_info()``).

    ``index`` is the worker's slot (0..workers-1), ``generation`` how many times that slot has
    been restarted, ``seed`` the seed given to ``random``, NumPy and torch, ``threads`` the
    thread budget of this worker. ``lane`` tells apart the processes of one slot that run at
    the same time (a recycled worker still serving while its replacement loads): 0 or 1, never
    the same for two live processes of a slot, so ``(index, lane)`` names a resource such as a
    port that no other live worker of the pool uses (``index`` alone does not).
    """

    index: int
    generation: int
    pid: int
    seed: int
    threads: int
    lane: int = 0


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, sent to it at start (must pickle): the pool's settings and
    what is this worker's own."""

    pool: PoolSettings
    index: int
    generation: int
    seed: int  # derived from the pool's seed, the slot and the generation
    env: dict[str, str]  # the whole environment the worker runs with
    lane: int = 0
    #: the pool's ``sys.path`` when it started this worker (as spawn would give it: a fork
    #: server keeps the one it started with), so the model imports as it does in the pool
    sys_path: tuple[str, ...] = ()


_INFO: WorkerInfo | None = None
_MODEL: Any = None
_LOADING = False


def worker_info() -> WorkerInfo | None:
    """This worker's ``WorkerInfo``; ``None`` when not called inside a modelpool worker."""
    return _INFO


def set_worker_info(info: WorkerInfo) -> None:
    """Package-internal seam: make ``worker_info()`` answer ``info`` in a process that hosts
    models without being a pool's worker (a Celery prefork child). ``run_worker`` sets its own."""
    global _INFO
    _INFO = info


def current_model() -> Any:
    """The model loaded in this worker, for functions run with ``Pool.submit``."""
    if _INFO is None:
        raise ModelSpecError(
            "current_model() was called outside a modelpool worker; call it from code that "
            "runs in a worker (a model method or a function passed to Pool.submit)"
        )
    if _LOADING:
        raise ModelSpecError(
            "current_model() was called while the model is still loading (from setup(), "
            "__init__ or the pool's initializer); inside the model, use self"
        )
    if _MODEL is None:
        raise ModelSpecError(
            "this pool has no model (it was created without one); pass a model to Pool(...) "
            "to use current_model()"
        )
    return _MODEL


def model_loaded() -> bool:
    """The server's readiness probe, run in a worker: its model is loaded. Lives here, not in
    the server package, so that probing imports nothing new into a worker."""
    return current_model() is not None


_SEEDED: frozenset[str] = frozenset()


def _load(spec: WorkerSpec) -> Any:
    global _SEEDED
    _SEEDED = _hygiene.seed_rngs(spec.seed)
    if spec.pool.initializer is not None:
        initializer, initargs = spec.pool.initializer
        initializer(*initargs)
        _SEEDED = _hygiene.seed_rngs(spec.seed, only_new=_SEEDED)
    # libraries the model imports from here on (at import, in setup or later) get the budget
    # as they load: ONNX Runtime's sessions made in setup() need it then, not after
    _hygiene.limit_when_imported(spec.seed, spec.pool.threads, spec.env)
    if spec.pool.model_ref is None:
        return None
    from ._importer import import_from_string

    cls = import_from_string(spec.pool.model_ref)
    _SEEDED = _hygiene.seed_rngs(spec.seed, only_new=_SEEDED)  # e.g. torch, imported just now
    _hygiene.limit_thread_pools(spec.pool.threads, spec.env)
    model = cls(**spec.pool.options)
    setup = getattr(model, "setup", None)
    if setup is not None:
        setup()
    _SEEDED = _hygiene.seed_rngs(spec.seed, only_new=_SEEDED)
    _hygiene.limit_thread_pools(spec.pool.threads, spec.env)
    return model


def run_worker(
    spec: WorkerSpec,
    conn: Connection,
    lifeline: Connection,
    to_worker: _shm.FdHandle | None,
    to_parent: _shm.FdHandle | None,
) -> None:
    """Entry point of a worker process."""
    global _INFO, _MODEL, _LOADING
    _hygiene.ignore_sigint()
    _output.guard_std_streams()  # a model's print() never fails once the reader is gone
    _hygiene.yield_on_wakeup()  # (first: the threads started from here on inherit it)
    _hygiene.die_with_parent(lifeline)
    channel = _transport.Channel(
        conn,
        out_arena=_shm.Arena(to_parent.fd) if to_parent is not None else None,
        in_arena=_shm.Arena(to_worker.fd) if to_worker is not None else None,
        wait_in_poll=True,  # (waiting for requests: see _Wire._read_into)
    )
    _hygiene.apply_env(spec.env)
    _hygiene.apply_sys_path(spec.sys_path)
    # loaded before us: they came with the fork (from the fork server, or the parent)
    _hygiene.limit_thread_pools(spec.pool.threads, spec.env, at_start=True)
    _INFO = WorkerInfo(
        spec.index, spec.generation, os.getpid(), spec.seed, spec.pool.threads, spec.lane
    )
    _LOADING = True
    try:
        _MODEL = _load(spec)
        _LOADING = False
    except BaseException as exc:
        channel.send((SETUP_FAILED, 0, _transport.RemoteException.capture(exc)))
        channel.close()
        os._exit(EXIT_SETUP_FAILED)
    channel.send((READY, 0, os.getpid()))
    _serve(channel, _MODEL)
    channel.close()


def _serve(channel: _transport.Channel, model: Any) -> None:
    predict = getattr(model, "predict", None)
    while True:
        try:
            kind, rid, payload = channel.recv()
        except (EOFError, OSError):
            return  # the pool is gone
        except _transport.DecodeError as exc:
            channel.send((ERR, 0, exc.remote))
            continue
        if kind == STOP:
            _teardown(model)
            return
        if kind in (CREDIT, CANCEL):
            continue  # for a stream that has ended meanwhile
        if kind in (STREAM, STREAM_INFER):
            reply = _stream(channel, kind, rid, payload, model)
        else:
            reply = _handle(kind, rid, payload, predict, model)
        del payload  # inputs no longer referenced are released with this reply
        try:
            channel.send(reply)
        except (BrokenPipeError, ConnectionResetError):
            return
        except _transport.PlacementError as exc:  # no room in shared memory; nothing was sent
            try:
                channel.send((ERR, rid, _transport.RemoteException.capture(exc)))
            except OSError:
                return  # the pool is gone (or the stream broke): it sees this worker exit
        except OSError as exc:  # the write itself failed midway: the stream is out of step
            sys.stderr.write(
                f"modelpool worker {os.getpid()}: could not send an answer to the pool "
                f"({type(exc).__name__}: {exc}); exiting so that the pool replaces this worker\n"
            )
            os._exit(EXIT_TRANSPORT)
        except Exception as exc:  # the result could not be encoded
            what = "predict" if kind in (PREDICT, PREDICT_TAGGED) else "the function"
            err = SerializationError(
                f"{what} returned a result that cannot be sent back to the caller: "
                f"{type(exc).__name__}: {exc}. Return NumPy arrays, torch tensors or other "
                "picklable values."
            )
            channel.send((ERR, rid, _transport.RemoteException.capture(err)))
        del reply


def _handle(kind: int, rid: int, payload: Any, predict: Any, model: Any) -> tuple[int, int, Any]:
    tag = None
    if kind == PREDICT_TAGGED:
        kind = PREDICT
        tag, payload = payload
    elif kind == INFER:
        tag = payload[4]
    token = _logs.REQUEST_ID.set(tag)
    try:
        if kind == INFER:
            if predict is None:
                raise ModelSpecError("this pool has no model; use submit() to run functions")
            return (OK, rid, _infer.handle(model, payload))
        if kind == INFER_BATCH:
            if predict is None:
                raise ModelSpecError("this pool has no model; use submit() to run functions")
            max_batch_size, payloads = payload
            return (OK, rid, _infer.handle_batch(model, payloads, max_batch_size))
        if kind == PREDICT:
            if predict is None:
                raise ModelSpecError("this pool has no model; use submit() to run functions")
            outputs = predict(payload)
            if inspect.isgenerator(outputs) or inspect.isasyncgen(outputs):
                raise ModelSpecError(
                    "predict() is a generator (it streams its answer in pieces): call it with "
                    "pool.stream(inputs), which returns the pieces as they come"
                )
            return (OK, rid, outputs)
        fn, args, kwargs = payload
        return (OK, rid, fn(*args, **kwargs))
    except Exception as exc:
        return (ERR, rid, _transport.RemoteException.capture(exc))
    finally:
        _logs.REQUEST_ID.reset(token)


def _stream(channel: Any, kind: int, rid: int, payload: Any, model: Any) -> tuple[int, int, Any]:
    """A streamed predict: its pieces sent as they come (``_streaming``), then its end."""
    tag = payload[4] if kind == STREAM_INFER else payload[0]
    token = _logs.REQUEST_ID.set(tag)
    try:
        if getattr(model, "predict", None) is None:
            raise ModelSpecError("this pool has no model; use submit() to run functions")
        if kind == STREAM_INFER:
            return _infer.stream(channel, rid, model, payload, OK)
        return run_stream(channel, rid, model.predict(payload[1]), OK)
    except Exception as exc:
        return (ERR, rid, _transport.RemoteException.capture(exc))
    finally:
        _logs.REQUEST_ID.reset(token)


def _teardown(model: Any) -> None:
    teardown = getattr(model, "teardown", None)
    if teardown is None:
        return
    try:
        teardown()
    except Exception:
        sys.stderr.write(f"modelpool worker {os.getpid()}: teardown() raised:\n")
        traceback.print_exc()
