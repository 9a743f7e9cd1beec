"""Regressions for races and resource failures found in review (each once reproduced)."""

from __future__ import annotations

import contextlib
import os
import resource
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import modelpool
from _models import Crashy, Echo, ForksHelperToFile


def test_done_callback_may_call_back_into_the_pool() -> None:
    """Futures are settled outside the pool's lock: a callback calling stats() must not
    deadlock the supervisor."""
    seen: list[int] = []
    with modelpool.Pool(Crashy, workers=1) as pool:
        future = pool.submit(os._exit, 3)
        future.add_done_callback(lambda f: seen.append(len(pool.stats().workers)))
        with pytest.raises(modelpool.WorkerCrashedError):
            future.result(timeout=10)
        assert pool.predict({}, timeout=60)["pid"] > 0  # the supervisor is alive
    assert seen == [1]


def test_timeout_is_honoured_when_the_model_forked_a_helper(tmp_path: Path) -> None:
    """The helper inherits the worker's socket, so end of file never comes; the deadline must
    still end the call (the pool shuts the socket when it kills the worker)."""
    pidfile = tmp_path / "helper.pid"
    try:
        with modelpool.Pool(ForksHelperToFile, workers=1) as pool:
            started = time.monotonic()
            with pytest.raises(modelpool.RequestTimeoutError):
                pool.predict({"seconds": 120.0, "path": str(pidfile)}, timeout=0.5)
            # the helper holds the socket for up to 120 s: ending long before that is the
            # deadline's doing, however slow the machine
            assert time.monotonic() - started < 30
    finally:  # end the helper (a grandchild) and wait for it, before the leak check
        (tmp_path / "helper.pid.stop").touch()
        deadline = time.monotonic() + 60
        while not pidfile.exists() and time.monotonic() < deadline:  # (if it ran at all)
            time.sleep(0.01)
        if pidfile.exists():
            with contextlib.suppress(psutil.NoSuchProcess):
                helper = psutil.Process(int(pidfile.read_text()))
                while helper.is_running() and helper.status() != psutil.STATUS_ZOMBIE:
                    assert time.monotonic() < deadline, "the helper did not stop"
                    time.sleep(0.01)


def test_high_descriptor_numbers_do_not_break_the_supervisor() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1500:
        pytest.fail(f"this test needs RLIMIT_NOFILE >= 1500 (hard limit is {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1500), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with modelpool.Pool(Crashy, workers=1) as pool:
            with pytest.raises(modelpool.WorkerCrashedError):
                pool.predict({"die": "sigkill"})
            assert pool.predict({})["pid"] > 0
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_shutdown_does_not_wait_for_a_finished_direct_call(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import threading

    from _models import Teardown

    pool = modelpool.Pool(Teardown, workers=1, options={"path": str(tmp_path / "t")}).start()
    caller = threading.Thread(target=pool.predict, args=("slow",))  # blocking: the fast path
    caller.start()
    deadline = time.monotonic() + 60
    while pool.stats().in_flight != 1:  # the call is under way before the shutdown
        assert time.monotonic() < deadline
        time.sleep(0.005)
    started = time.monotonic()
    pool.shutdown()  # drain_timeout is 30 s: it must not be waited out
    assert time.monotonic() - started < 15  # the call needs 0.5 s; waiting it out, 30 s
    caller.join()


def test_finished_requests_do_not_pin_shared_memory_until_their_deadline() -> None:
    x = np.ones(1_000_000)  # 8 MB: through the arenas
    with modelpool.Pool(Echo, workers=1, timeout=600) as pool:
        for _ in range(20):
            pool.predict({"x": x})
            pool.submit(np.copy, x).result()
        worker = pool._supervisor._workers[0]
        assert worker.channel.in_arena.size <= 40 * 2**20
        assert worker.channel.out_arena.size <= 40 * 2**20
        assert len(pool._supervisor._timed) == 0


def test_a_failed_process_start_is_retried_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelpool import _supervisor

    real = _supervisor.launch
    failures = []

    def flaky(ctx, spec):  # type: ignore[no-untyped-def]
        if spec.generation == 1 and not failures:
            failures.append(spec.index)
            raise BlockingIOError(11, "Resource temporarily unavailable (fork)")
        return real(ctx, spec)

    monkeypatch.setattr(_supervisor, "launch", flaky)
    with modelpool.Pool(Crashy, workers=1) as pool:
        with pytest.raises(modelpool.WorkerCrashedError):
            pool.predict({"die": "sigkill"})
        assert pool.predict({}, timeout=60)["pid"] > 0  # the second try started it
    assert failures == [0]


def test_forced_shutdown_reports_shutdown_not_a_crash() -> None:
    pool = modelpool.Pool(Crashy, workers=1).start()
    future = pool.submit(time.sleep, 30)
    time.sleep(0.1)
    pool._terminate()
    with pytest.raises(modelpool.PoolClosedError):
        future.result(timeout=5)
