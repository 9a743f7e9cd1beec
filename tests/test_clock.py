"""The supervisor reads time only from its injected clock: with a fake one, deadlines and the
drain timeout fall exactly when the test moves the clock, on real worker processes, with no
sleeping for them to pass."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import modelpool
from _fakes import FakeClock, pool_settings
from _models import Echo, wait_for_path
from modelpool import _transport
from modelpool._settings import PoolSettings, default_start_method
from modelpool._supervisor import Supervisor
from modelpool._worker import CALL, PREDICT


class Clock(FakeClock):
    def tick(self, seconds: float, supervisor: Supervisor) -> None:
        """Move the time, and wake the loop as its selector's timeout would have."""
        self.advance(seconds)
        supervisor.poller.wake()


def _settings(**overrides: Any) -> PoolSettings:
    return pool_settings(model_ref=f"{Echo.__module__}:Echo", model_name="echo", **overrides)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def started(clock: Clock) -> Iterator[Any]:
    made: list[Supervisor] = []

    def start(**overrides: Any) -> Supervisor:
        sup = Supervisor(
            _settings(**overrides), multiprocessing.get_context(default_start_method()), clock=clock
        )
        made.append(sup)
        sup.start()
        sup.wait_ready(sup.failure_seq)
        return sup

    yield start
    for sup in made:
        sup.close(cancel_futures=True, force=True)
        assert sup.join(timeout=60)


def _busy(sup: Supervisor, gate: Path, timeout: float | None) -> Any:
    """A request that keeps the worker busy until ``gate`` exists."""
    req = sup.new_request(timeout)
    req.frame = _transport.encode((CALL, req.id, (wait_for_path, (str(gate),), {})))
    sup.submit(req)
    return req


def test_a_running_request_times_out_when_the_clock_passes_its_deadline(
    started: Any, clock: Clock, tmp_path: Path
) -> None:
    sup = started()
    (worker,) = sup.fleet.workers
    req = _busy(sup, tmp_path / "gate", timeout=30.0)
    clock.tick(29.999, sup)
    assert not req.future.done()  # (the worker holds it until the gate opens)
    clock.tick(0.001, sup)
    with pytest.raises(modelpool.RequestTimeoutError, match="while running in worker pid"):
        req.future.result(timeout=60)
    assert worker.kill_kind == "timeout"
    replacement = sup.new_request(None)  # the slot is refilled: the pool serves on
    replacement.frame = _transport.encode((PREDICT, replacement.id, {"x": np.ones(2)}))
    sup.submit(replacement)
    assert replacement.future.result(timeout=60)["x"].tolist() == [1.0, 1.0]


def test_a_queued_request_times_out_without_running(
    started: Any, clock: Clock, tmp_path: Path
) -> None:
    sup = started()
    gate = tmp_path / "gate"
    holder = _busy(sup, gate, timeout=None)
    queued = _busy(sup, tmp_path / "never", timeout=5.0)
    clock.tick(5.0, sup)
    with pytest.raises(modelpool.RequestTimeoutError, match="it was never run"):
        queued.future.result(timeout=60)
    gate.touch()
    assert holder.future.result(timeout=60) is True  # the worker was left alone


def test_shutdown_waits_for_the_drain_timeout_on_the_clock(
    started: Any, clock: Clock, tmp_path: Path
) -> None:
    sup = started(drain_timeout=10.0)
    running = _busy(sup, tmp_path / "gate", timeout=None)
    sup.close(cancel_futures=False, force=False)
    clock.tick(9.0, sup)
    assert not sup.join(timeout=0.5)  # still draining: 1 s of (fake) drain time left
    assert not running.future.done()
    clock.tick(1.0, sup)
    with pytest.raises(modelpool.PoolClosedError, match=r"drain_timeout=10\.0"):
        running.future.result(timeout=60)
    assert sup.join(timeout=60)
    assert not os.path.exists(tmp_path / "gate")
