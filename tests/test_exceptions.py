"""The error tree, and what a caller receives on every failure path of every public call.

Each failure is provoked for real, in real pools, and run through each public call it applies to:
``predict`` (the caller's thread talks to an idle worker itself), ``apredict`` and
``submit(...).result()`` (the request goes through the supervisor thread), ``map``. Every case
asserts that the caller gets a ``ModelpoolError`` and precisely the subclass that the tree
(``modelpool/_exceptions.py``, docs/errors.md) promises for it.

Every path here once let something else through (pickle's own errors, a crashed supervisor
thread, a protocol error counted as a crash); each is now a case that fails if it comes back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import inspect
import pickle
import re
import resource
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import modelpool
from _failing_models import Meddler, OnlyInCaller, predict_here
from _models import Crashy, Doubler, Echo, Limited, Raiser, WrongRows, wait_for_path
from modelpool import ModelpoolError, _exceptions, _transport

CALLS = ("predict", "apredict", "submit", "map")
#: the calls whose request goes through the supervisor thread (predict's goes through its own)
QUEUED = ("apredict", "submit", "map")


def _call(pool: modelpool.Pool, how: str, inputs: Any) -> Any:
    """Run ``inputs`` through the pool's model by the public call ``how``."""
    if how == "predict":
        return pool.predict(inputs)
    if how == "apredict":
        return asyncio.run(pool.apredict(inputs))
    if how == "submit":
        return pool.submit(predict_here, inputs).result()
    assert how == "map"
    return list(pool.map(predict_here, [inputs]))


def _raised(fn: Callable[..., object], *args: Any) -> Exception:
    """What ``fn(*args)`` raised."""
    try:
        fn(*args)
    except Exception as exc:
        return exc
    pytest.fail("the call did not fail")


def _check(err: BaseException, expected: type[ModelpoolError]) -> None:
    """A ``ModelpoolError``, and precisely ``expected``."""
    kind = f"{type(err).__module__}.{type(err).__qualname__}"
    assert isinstance(err, ModelpoolError), f"not a ModelpoolError: {kind}: {err}"
    assert type(err) is expected, f"{kind} instead of {expected.__qualname__}: {err}"


def _pid(pool: modelpool.Pool) -> int | None:
    (worker,) = pool.stats().workers
    return worker.pid


# --------------------------------------------------------------------------- the tree itself


def _tree(text: str) -> dict[str, str | None]:
    """The tree drawn in ``text`` (box-drawing characters, 4 columns a level): each name and
    its parent."""
    parents: dict[str, str | None] = {}
    path: list[str] = []
    root = -1
    for line in text.splitlines():
        if line.strip() == "ModelpoolError":
            parents["ModelpoolError"] = None
            path, root = ["ModelpoolError"], line.index("ModelpoolError")
        elif root >= 0 and not line.strip():
            break  # the end of the drawing
        elif root >= 0 and (match := re.search(r"[├└]── (\w+)", line)):
            depth = (match.start() - root) // 4 + 1
            parents[match.group(1)] = path[depth - 1]
            path[depth:] = [match.group(1)]
    return parents


def _actual_tree() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _exceptions.__all__:
        cls = getattr(_exceptions, name)
        if cls is _exceptions.RemoteTraceback:
            continue
        base = next((b for b in cls.__bases__ if issubclass(b, ModelpoolError)), None)
        out[name] = None if base is None else base.__name__
    return out


def test_the_drawn_tree_is_the_class_tree() -> None:
    """Every error in ``_exceptions`` is drawn in its docstring's tree, under its real parent."""
    assert _tree(_exceptions.__doc__ or "") == _actual_tree()


@pytest.mark.parametrize("doc", ["docs/errors.md", "README.md"])
def test_the_docs_draw_the_same_tree(doc: str) -> None:
    text = (Path(__file__).parents[1] / doc).read_text(encoding="utf-8")
    assert _tree(text) == _actual_tree()


def test_every_error_is_public_and_a_modelpool_error() -> None:
    assert set(_exceptions.__all__) <= set(modelpool.__all__)
    for name in modelpool.__all__:
        value = getattr(modelpool, name)
        if not (inspect.isclass(value) and issubclass(value, BaseException)):
            continue
        if value is modelpool.RemoteTraceback:
            # not an error anyone raises: it carries a worker's traceback text as the
            # __cause__ of what a worker raised (checked below)
            assert not issubclass(value, ModelpoolError)
            continue
        assert issubclass(value, ModelpoolError), name
    assert issubclass(modelpool.RequestTimeoutError, TimeoutError)
    assert issubclass(modelpool.ServerTimeoutError, TimeoutError)
    assert issubclass(modelpool.PlacementError, MemoryError)
    for name in ("InputValidationError", "BatchError", "ConfigError", "CodecError"):
        assert issubclass(getattr(modelpool, name), ValueError), name


def test_errors_stay_importable_where_they_were() -> None:
    from modelpool import config

    assert config.ConfigError is modelpool.ConfigError
    assert _transport.PlacementError is modelpool.PlacementError
    assert _transport.ProtocolError is modelpool.ProtocolError
    from modelpool import client

    assert client.ServerError is modelpool.ServerError
    assert client.ServerTimeoutError is modelpool.ServerTimeoutError
    celery = pytest.importorskip("modelpool.integrations.celery")
    assert celery.PoisonTaskError is modelpool.PoisonTaskError
    # the transport's own decoding error is internal: it never reaches a caller
    assert not hasattr(modelpool, "DecodeError")


def test_crash_facts_survive_pickling() -> None:
    facts = {"pid": 12, "exitcode": -9, "signal_name": "SIGKILL", "likely_cause": "OOM"}
    crash = pickle.loads(pickle.dumps(modelpool.WorkerCrashedError("died", **facts)))
    assert type(crash) is modelpool.WorkerCrashedError
    assert (crash.args, crash.pid, crash.exitcode) == (("died",), 12, -9)
    assert (crash.signal_name, crash.likely_cause) == ("SIGKILL", "OOM")
    poison = modelpool.PoisonTaskError("poison", deliveries=3, **facts)
    again = pickle.loads(pickle.dumps(poison))
    assert type(again) is modelpool.PoisonTaskError
    assert (again.args, again.deliveries) == (("poison",), 3)
    assert (again.pid, again.exitcode, again.signal_name, again.likely_cause) == tuple(
        facts.values()
    )


# --------------------------------------------------------------------------- misuse


def test_calls_on_a_closed_pool() -> None:
    pool = modelpool.Pool(Echo, workers=1).start()
    pool.shutdown()
    for how in CALLS:
        _check(_raised(_call, pool, how, {"a": 1}), modelpool.PoolClosedError)
    _check(_raised(pool.start), modelpool.PoolClosedError)


def test_inputs_that_do_not_match_the_signature() -> None:
    pool = modelpool.Pool(Doubler)
    limited = modelpool.Pool(Limited)
    try:
        for how in ("predict", "apredict"):  # checked in the caller, before anything starts
            wrong = {"x": np.ones((1, 4), dtype=np.float64)}
            _check(_raised(_call, pool, how, wrong), modelpool.InputValidationError)
            rows = {"x": np.ones((5, 1), dtype=np.float32)}  # Limited takes 4 rows at most
            _check(_raised(_call, limited, how, rows), modelpool.InputValidationError)
    finally:
        pool.shutdown()
        limited.shutdown()


def test_what_the_pool_cannot_use() -> None:
    _check(_raised(modelpool.Pool, "no_such_module:Model"), modelpool.ModelSpecError)
    pool = modelpool.Pool(workers=1)  # no model: no predict
    lock = threading.Lock()

    def holds_a_lock() -> bool:  # can be sent neither by name nor by value
        return lock.locked()

    try:
        for how in ("predict", "apredict"):
            _check(_raised(_call, pool, how, {"a": 1}), modelpool.ModelSpecError)
        _check(_raised(pool.submit, holds_a_lock), modelpool.ModelSpecError)
        _check(_raised(pool.map, holds_a_lock, [1]), modelpool.ModelSpecError)
    finally:
        pool.shutdown()


@pytest.mark.parametrize("how", CALLS)
def test_an_input_that_cannot_be_sent(how: str) -> None:
    with modelpool.Pool(Echo, workers=1) as pool:
        err = _raised(_call, pool, how, {"lock": threading.Lock()})
        _check(err, modelpool.SerializationError)


@pytest.mark.parametrize("how", CALLS)
def test_an_input_the_workers_cannot_read(how: str) -> None:
    with modelpool.Pool(Meddler, workers=1) as pool:
        _check(_raised(_call, pool, how, OnlyInCaller()), modelpool.SerializationError)


def test_a_full_queue(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with modelpool.Pool(Echo, workers=1, max_queue=1) as pool:
        running = pool.submit(wait_for_path, str(gate))  # the only worker, until the gate opens
        queued = pool.submit(abs, -1)  # the queue's one place
        try:
            for how in CALLS:
                err = _raised(_call, pool, how, {"a": 1})
                _check(err, modelpool.PoolOverloadedError)
        finally:
            gate.touch()
        assert running.result() is True
        assert queued.result() == 1


# --------------------------------------------------------------------------- worker breakage


def test_a_model_that_cannot_load() -> None:
    options = {"stage": "setup", "how": "raise"}
    err = _raised(lambda: modelpool.Pool(Crashy, options=options, workers=1).start())
    _check(err, modelpool.ModelSetupError)
    assert isinstance(err.__cause__, RuntimeError)  # setup()'s own exception
    pool = modelpool.Pool(Crashy, options=options, workers=1).start(wait=False)
    try:  # requests fail once the pool stops starting workers (3 failures in a row)
        for how in CALLS:
            _check(_raised(_call, pool, how, {}), modelpool.ModelSetupError)
    finally:
        pool.shutdown()


@pytest.mark.parametrize("how", CALLS)
@pytest.mark.parametrize("death", ["sigkill", "exit"])
def test_a_worker_that_dies_mid_request(death: str, how: str) -> None:
    with modelpool.Pool(Crashy, workers=1) as pool:
        err = _raised(_call, pool, how, {"die": death})
        _check(err, modelpool.WorkerCrashedError)
        assert isinstance(err, modelpool.WorkerCrashedError)
        assert err.signal_name == ("SIGKILL" if death == "sigkill" else None)
        assert err.exitcode == (-9 if death == "sigkill" else 7)


@pytest.mark.parametrize("how", CALLS)
def test_a_request_past_its_deadline(how: str) -> None:
    with modelpool.Pool(Crashy, workers=1, timeout=0.5) as pool:
        err = _raised(_call, pool, how, {"die": "hang"})
        _check(err, modelpool.RequestTimeoutError)
        assert isinstance(err, TimeoutError)


@pytest.mark.parametrize("how", CALLS)
def test_an_exception_that_cannot_come_back(how: str) -> None:
    with modelpool.Pool(Raiser, workers=1) as pool:
        err = _raised(_call, pool, how, "unpicklable")
        _check(err, modelpool.RemoteError)
        assert isinstance(err.__cause__, modelpool.RemoteTraceback)


@pytest.mark.parametrize("how", CALLS)
def test_the_models_own_exception_is_not_wrapped(how: str) -> None:
    """The rule beside the tree: what the model raises arrives as itself, with the worker's
    traceback as ``__cause__`` (a RemoteTraceback, which is never raised)."""
    with modelpool.Pool(Raiser, workers=1) as pool:
        err = _raised(_call, pool, how, "value")
        assert type(err) is ValueError
        assert isinstance(err.__cause__, modelpool.RemoteTraceback)
        assert "bad value 42" in err.__cause__.tb


def test_outputs_that_cannot_be_split_per_request() -> None:
    """A batch of two requests (full at once; 60 s before it would run unfilled) whose model
    returns one row too few."""
    with modelpool.Pool(WrongRows, workers=1, max_batch_size=2, max_batch_delay=60) as pool:
        x = {"x": np.ones((1, 2), np.float32)}
        with cf.ThreadPoolExecutor(2) as threads:
            futures = [threads.submit(_raised, pool.predict, x) for _ in range(2)]
            for future in futures:
                _check(future.result(), modelpool.BatchError)

        async def both() -> list[BaseException]:
            calls = [pool.apredict(x), pool.apredict(x)]
            return await asyncio.gather(*calls, return_exceptions=True)

        for err in asyncio.run(both()):
            _check(err, modelpool.BatchError)


# --------------------------------------------------------------------------- the transport


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """RLIMIT_FSIZE (``ulimit -f``) in this process: the shared-memory arena (a memfd) cannot
    grow past it (EFBIG), as when the machine has no memory to give it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


_BIG = 32 << 20  # bytes: well past the 16 MiB limit below
_LIMIT = 16 << 20


@pytest.mark.parametrize("how", CALLS)
def test_no_room_in_shared_memory_for_the_request(how: str) -> None:
    big = {"x": np.ones(_BIG // 4, np.float32)}
    with modelpool.Pool(Echo, workers=1) as pool:
        pid = _pid(pool)
        with _file_size_limit(_LIMIT):
            err = _raised(_call, pool, how, big)
        _check(err, modelpool.PlacementError)
        assert isinstance(err, MemoryError)
        assert "File too large" in str(err.__cause__)
        # nothing was sent: the same worker serves the same request once there is room
        assert pool.predict(big)["x"].shape == big["x"].shape
        assert _pid(pool) == pid


@pytest.mark.parametrize("how", CALLS)
def test_no_room_in_shared_memory_for_the_answer(how: str) -> None:
    big = {"x": np.ones(_BIG // 4, np.float32)}
    limit = (resource.RLIMIT_FSIZE, (_LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    with modelpool.Pool(Echo, workers=1, initializer=resource.setrlimit, initargs=limit) as pool:
        pid = _pid(pool)
        err = _raised(_call, pool, how, big)  # Echo answers with its inputs
        _check(err, modelpool.PlacementError)
        assert isinstance(err.__cause__, modelpool.RemoteTraceback)
        assert pool.predict({"x": np.ones(4)})["x"].shape == (4,)  # the worker keeps serving
        assert _pid(pool) == pid


@pytest.mark.parametrize(
    "how",
    CALLS,
)
def test_an_answer_to_another_request(how: str) -> None:
    """The model writes an answer with a wrong request id to its own connection: the pool and
    the worker are out of step, so the worker is replaced."""
    with modelpool.Pool(Meddler, workers=1) as pool:
        pid = _pid(pool)
        err = _raised(_call, pool, how, "wrong id")
        _check(err, modelpool.ProtocolError)
        assert pool.predict("fine") == "fine"
        assert _pid(pool) != pid


@pytest.mark.parametrize(
    "how",
    CALLS,
)
def test_a_message_that_is_not_an_answer(how: str) -> None:
    with modelpool.Pool(Meddler, workers=1) as pool:
        pid = _pid(pool)
        _check(_raised(_call, pool, how, "garbage"), modelpool.TransportError)
        assert pool.predict("fine") == "fine"
        assert _pid(pool) != pid


@pytest.mark.parametrize("how", CALLS)
def test_an_answer_the_caller_cannot_read(how: str) -> None:
    with modelpool.Pool(Meddler, workers=1) as pool:
        _check(_raised(_call, pool, how, "unreadable answer"), modelpool.SerializationError)


@pytest.mark.parametrize("how", CALLS)
def test_an_answer_that_cannot_be_sent(how: str) -> None:
    with modelpool.Pool(Raiser, workers=1) as pool:
        _check(_raised(_call, pool, how, "lock"), modelpool.SerializationError)


# --------------------------------------------------------------------------- the HTTP client


def test_client_input_with_no_protocol_datatype() -> None:
    with modelpool.Client("http://127.0.0.1:9") as client:  # refused before anything is sent
        err = _raised(lambda: client.infer("m", {"x": np.ones(2, np.complex64)}))
    _check(err, modelpool.UnsupportedDatatypeError)
    assert isinstance(err, TypeError)
