"""The supervisor's own failure paths, on real pools: a bug in its thread fails every caller
loudly (never a hang), and a pool dropped without shutdown() still stops its workers."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import psutil
import pytest

import modelpool
from _models import Echo, wait_for_path


def test_a_crashed_supervisor_thread_fails_every_caller_with_a_modelpool_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = modelpool.Pool(Echo, workers=1).start()
    (worker,) = pool.stats().workers
    running = pool.submit(wait_for_path, str(tmp_path / "never"))  # the only worker, busy

    def bug(now: float) -> Any:
        raise KeyError("a bug")

    monkeypatch.setattr(pool._supervisor.dispatch, "dispatch", bug)
    queued = pool.submit(os.getpid)  # queued behind the busy worker
    pool._supervisor._wake()  # the loop's next round dispatches, and hits the bug
    for future in (queued, running):
        error = future.exception(timeout=60)
        assert type(error) is modelpool.ModelpoolError
        assert "supervisor thread crashed (KeyError: 'a bug')" in str(error)
        assert isinstance(error.__cause__, KeyError)
    with pytest.raises(modelpool.ModelpoolError, match="supervisor thread crashed"):
        pool.submit(os.getpid)
    assert pool._supervisor.join(timeout=60)
    assert not psutil.pid_exists(worker.pid) or psutil.Process(worker.pid).status() == "zombie"
    pool.shutdown()


def test_a_pool_dropped_without_shutdown_stops_its_workers() -> None:
    pool = modelpool.Pool(Echo, workers=2).start()
    pids = [w.pid for w in pool.stats().workers]
    supervisor = pool._supervisor
    del pool
    gc.collect()  # the finalizer asks the supervisor thread to close; it does so on its own
    assert supervisor.join(timeout=60)
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
