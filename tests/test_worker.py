"""The worker's side (``_worker``): the pool's initializer, run in every worker before any
work, and ``current_model()`` in a submitted function and while the model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

import modelpool
from _models import Echo, started_then_wait
from _waiting import wait_for


def _model_name() -> str:
    return type(modelpool.current_model()).__name__


_INIT_VALUE: list[str] = []


def _init(value: str) -> None:
    _INIT_VALUE.append(value)


def test_initializer_runs_in_every_worker_before_work(tmp_path: Path) -> None:
    """One request held in each of the two workers (the second cannot go where the first
    waits): both see what the initializer left, once."""
    gate = tmp_path / "gate"
    started = [tmp_path / f"started-{i}" for i in range(2)]
    with modelpool.Pool(workers=2, initializer=_init, initargs=("hello",)) as pool:
        futures = [pool.submit(_init_seen_by, str(s), str(gate)) for s in started]
        wait_for(lambda: all(s.exists() for s in started), 60, "a request in each worker")
        gate.touch()
        seen = dict(f.result(timeout=60) for f in futures)
    assert seen == {0: ["hello"], 1: ["hello"]}


def _init_seen_by(started: str, gate: str) -> tuple[int, list[str]]:
    """In a worker: hold it until the gate opens, then say which slot it is and what the
    initializer left."""
    started_then_wait(started, gate)
    info = modelpool.worker_info()
    assert info is not None
    return info.index, list(_INIT_VALUE)


def test_failing_initializer_is_a_setup_error() -> None:
    pool = modelpool.Pool(workers=1, initializer=_init, initargs=())  # wrong arity: TypeError
    with pytest.raises(modelpool.ModelSetupError, match="TypeError"):
        pool.start()


def test_current_model_in_submitted_function() -> None:
    with modelpool.Pool(Echo) as pool:
        assert pool.submit(_model_name).result() == "Echo"
    with pytest.raises(modelpool.ModelSpecError, match="outside a modelpool worker"):
        modelpool.current_model()


def _current_model_in_setup() -> None:
    modelpool.current_model()


def test_current_model_while_loading_says_so() -> None:
    pool = modelpool.Pool(Echo, initializer=_current_model_in_setup)
    with pytest.raises(modelpool.ModelSetupError, match="still loading"):
        pool.start()


def _policy() -> tuple[int, int]:
    import os
    import threading

    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0)))
    thread.start()
    thread.join()
    return os.sched_getscheduler(0), seen[0]


@pytest.mark.skipif(not hasattr(__import__("os"), "SCHED_BATCH"), reason="Linux only")
def test_workers_run_under_sched_batch_and_their_threads_too() -> None:
    """A worker woken by a request does not preempt the process that sent it."""
    import os

    with modelpool.Pool(Echo, workers=1) as pool:
        assert pool.submit(_policy).result(timeout=60) == (os.SCHED_BATCH, os.SCHED_BATCH)
    assert os.sched_getscheduler(0) != os.SCHED_BATCH  # the caller is left alone
