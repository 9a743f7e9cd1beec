"""In-host autoscaling (min_workers / max_workers) and load_concurrency, with real workers."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import numpy as np
import pytest

import modelpool
from _models import Echo, Gate, Stagger, wait_for_path


def _live(pool: modelpool.Pool) -> int:
    return sum(1 for w in pool.stats().workers if w.pid is not None and w.state != "stopping")


def test_grows_when_requests_wait_and_shrinks_after_quiet(tmp_path: Path) -> None:
    pool = modelpool.Pool(
        Stagger,
        options={"path": str(tmp_path / "loads")},
        min_workers=1,
        max_workers=3,
        scale_down_after=0.5,
    )
    gate = tmp_path / "gate"
    with pool:
        assert _live(pool) == 1
        # twelve requests that hold their worker until the gate opens: requests keep waiting
        # however long a new worker takes to load, so the pool must grow
        futures = [pool.submit(wait_for_path, str(gate)) for _ in range(12)]
        peak = 0
        deadline = time.monotonic() + 60
        # all the way to max_workers while every request holds its worker (the scaler used to
        # stop at 2: it looked before dispatch, saw the newly loaded worker idle, and slept)
        while peak < 3:
            assert time.monotonic() < deadline, pool.stats()
            peak = max(peak, _live(pool))
            assert peak <= 3, pool.stats()
            time.sleep(0.02)
        gate.touch()
        while not all(f.done() for f in futures):
            assert time.monotonic() < deadline, pool.stats()
            assert _live(pool) <= 3, pool.stats()
            time.sleep(0.02)
        assert all(f.result() is True for f in futures)
        deadline = time.monotonic() + 60
        while _live(pool) > 1:  # back down to min_workers, never below
            assert time.monotonic() < deadline, pool.stats()
            time.sleep(0.05)
        time.sleep(1.0)
        assert _live(pool) == 1
        kinds = [e["event"] for e in pool.stats().events]
        assert "scale_up" in kinds
        assert "scale_down" in kinds
        for event in pool.stats().events:
            assert 1 <= event["workers"] <= 3
            assert event["reason"]


def test_load_concurrency_one_loads_workers_one_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "loads"
    with modelpool.Pool(Stagger, workers=3, options={"path": str(path)}, load_concurrency=1):
        pass
    spans = sorted(tuple(map(float, line.split())) for line in path.read_text().splitlines())
    assert len(spans) == 3
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end - 0.01, spans  # no overlap


def test_without_min_max_the_pool_is_fixed() -> None:
    with modelpool.Pool(Echo, workers=2) as pool:
        assert _live(pool) == 2
        assert pool.stats().events == []


def test_bad_scaling_arguments() -> None:
    with pytest.raises(ValueError, match="min_workers"):
        modelpool.Pool(Echo, min_workers=3, max_workers=2)
    with pytest.raises(ValueError, match="load_concurrency"):
        modelpool.Pool(Echo, load_concurrency=0)


def test_a_batching_pool_grows_for_a_request_that_waits_behind_a_busy_worker(
    tmp_path: Path,
) -> None:
    """With batching on, a request queued while every worker is busy must still wake the
    scaler (it used to wait until a worker answered: here, never while the gate is shut)."""
    gate = tmp_path / "open"
    pool = modelpool.Pool(
        Gate,
        options={"path": str(gate)},
        min_workers=1,
        max_workers=2,
        max_batch_size=8,
        max_batch_delay=0.005,
    )
    with pool:

        async def scenario() -> dict:
            held = asyncio.ensure_future(pool.apredict({"x": np.full((1, 3), -1, np.float32)}))
            deadline = time.monotonic() + 60
            while pool.stats().in_flight < 1:
                assert time.monotonic() < deadline, pool.stats()
                await asyncio.sleep(0.01)
            try:  # answered by a second worker while the first still waits on the gate
                return await asyncio.wait_for(
                    pool.apredict({"x": np.ones((1, 3), np.float32)}), timeout=60
                )
            finally:
                gate.touch()
                await held

        out = asyncio.run(scenario())
    np.testing.assert_array_equal(out["y"], np.full((1, 3), 2, np.float32))
    assert "scale_up" in [e["event"] for e in pool.stats().events]
