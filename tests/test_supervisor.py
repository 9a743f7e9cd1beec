"""The supervisor: the workers' life cycle as the pool's callers see it.

Crashes and their replacement, timeouts, retries, setup failures and the breaker, recycling,
shutdown, scaling between ``min_workers`` and ``max_workers``, and the races found in review.
Nothing hangs, nothing is silently lost, nothing leaks (the autouse fixture in conftest checks
children)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import resource
import socket
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import modelpool
from _models import (
    Crashy,
    Echo,
    FailSlot,
    ForksHelperToFile,
    Gate,
    Leaky,
    LoadsOnce,
    PortPerWorker,
    SlowSetup,
    Stagger,
    Teardown,
    started_then_wait,
    wait_for_path,
)
from _waiting import until, wait_for

HOW = ["sigkill", "sigsegv", "exit", "raise"]


EXPECTED_EXIT = {"sigkill": "SIGKILL", "sigsegv": "SIGSEGV", "exit": "code 7"}


def _pids(pool: modelpool.Pool) -> set[int]:
    return {w.pid for w in pool.stats().workers if w.pid is not None}


def _restarts(pool: modelpool.Pool) -> int:
    return sum(w.restarts for w in pool.stats().workers)


# ---------------------------------------------------------------- the crash matrix


@pytest.mark.parametrize("how", HOW)
def test_crash_during_setup_fails_start_with_model_setup_error(how: str) -> None:
    pool = modelpool.Pool(Crashy, options={"stage": "setup", "how": how}, workers=2)
    started = time.monotonic()
    with pytest.raises(modelpool.ModelSetupError) as info:
        pool.start()
    assert time.monotonic() - started < 60  # it must not hang; two process starts under load
    message = str(info.value)
    assert "Crashy" in message
    if how == "raise":
        assert isinstance(info.value.__cause__, RuntimeError)
        assert "boom on purpose" in str(info.value.__cause__)
        assert isinstance(info.value.__cause__.__cause__, modelpool.RemoteTraceback)
    else:
        assert EXPECTED_EXIT[how] in message
    with pytest.raises(modelpool.PoolClosedError):  # start() failing shut the pool down
        pool.predict({})


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("stage", ["predict", "encode"])
def test_crash_while_serving_fails_only_that_request(stage: str, how: str) -> None:
    key = "die" if stage == "predict" else "die_encode"
    with modelpool.Pool(Crashy, workers=1) as pool:
        first_pid = pool.predict({})["pid"]
        if how == "raise":
            expected: type[BaseException] = RuntimeError if stage == "predict" else TypeError
            with pytest.raises(expected):
                pool.predict({key: how})
            assert pool.predict({})["pid"] == first_pid  # same worker, still serving
            return
        with pytest.raises(modelpool.WorkerCrashedError) as info:
            pool.predict({key: how})
        err = info.value
        assert err.pid == first_pid
        assert EXPECTED_EXIT[how] in str(err)
        if how == "exit":
            assert err.exitcode == 7
            assert err.signal_name is None
        else:
            assert err.signal_name == EXPECTED_EXIT[how]
            assert err.exitcode is not None
            assert err.exitcode < 0
        assert err.likely_cause
        if how == "sigkill":
            assert "out-of-memory" in str(err)
        # replaced and serving again
        assert pool.predict({})["pid"] != first_pid
        (w,) = pool.stats().workers
        assert w.restarts == 1
        assert w.last_exit is not None
        assert str(first_pid) in w.last_exit


def test_crash_does_not_disturb_concurrent_requests(tmp_path: Path) -> None:
    """A worker dies while two requests run in the other workers: they are neither failed nor
    run again, their workers are not replaced, and they answer once the test lets them."""
    gate = tmp_path / "gate"
    started = [tmp_path / f"started-{i}" for i in range(2)]
    with modelpool.Pool(Crashy, workers=3) as pool:
        innocent = [pool.submit(started_then_wait, str(s), str(gate)) for s in started]
        wait_for(lambda: all(s.exists() for s in started), 60, "both requests to run")
        running_in = {int(s.read_text()) for s in started}
        assert len(running_in) == 2
        with pytest.raises(modelpool.WorkerCrashedError, match="code 7") as info:
            pool.predict({"die": "exit"}, timeout=60)  # in the third worker, while they run
        assert info.value.pid not in running_in
        assert not any(f.done() for f in innocent)  # still running: the gate is shut
        gate.touch()
        assert sorted(f.result(timeout=60) for f in innocent) == sorted(running_in)
        assert pool.predict({}, timeout=60)["pid"] != info.value.pid
        wait_for(lambda: _restarts(pool) == 1, 30, "the crashed worker's replacement")
        workers = pool.stats().workers
        assert running_in <= {w.pid for w in workers}, workers  # theirs were not replaced
        assert _restarts(pool) == 1, workers


def test_recovery_after_crash_is_prompt() -> None:
    with modelpool.Pool(Crashy, workers=1) as pool:
        with pytest.raises(modelpool.WorkerCrashedError):
            pool.predict({"die": "sigkill"})
        started = time.monotonic()
        pool.predict({})
        assert time.monotonic() - started < 30  # generous bound; the benchmark measures it


def test_external_sigkill_of_idle_worker_is_replaced(caplog: pytest.LogCaptureFixture) -> None:
    with modelpool.Pool(Echo, workers=1) as pool:
        (pid,) = _pids(pool)
        os.kill(pid, 9)
        wait_for(
            lambda: _pids(pool) - {pid} and pool.stats().workers[0].state == "idle",
            30,
            "a replacement, ready",
        )
        assert pool.predict({"a": np.array(1)})["a"] == 1
        assert "SIGKILL" in (pool.stats().workers[0].last_exit or "")
        assert pool.stats().exit_reasons == {"SIGKILL": 1}
    # no request fails for it, so the log is the one place that says it happened, once
    lines = [r.getMessage() for r in caplog.records if r.name == "modelpool.pool"]
    assert len([m for m in lines if "while idle" in m]) == 1, lines
    assert f"pid {pid}" in next(m for m in lines if "while idle" in m)


def test_exit_reasons_count_timeouts_and_busy_for_shows_request_age() -> None:
    # the timeout must not fire before busy_for is read below (milliseconds of work, however
    # slow the machine), and is short enough to wait for
    with modelpool.Pool(Echo, workers=1, timeout=3.0) as pool:
        submitted = time.monotonic()
        fut = pool.submit(time.sleep, 30)
        wait_for(lambda: pool.stats().workers[0].state == "busy", 30, "the request to run")
        time.sleep(0.2)
        busy_for = pool.stats().workers[0].busy_for
        read = time.monotonic()
        assert busy_for is not None
        # bracketed by this thread's clock, not by how fast the machine is: the request
        # started after submit() was called and no later than it was seen busy
        assert 0.2 - 1e-3 <= busy_for <= read - submitted + 1e-3, (busy_for, read - submitted)
        with pytest.raises(modelpool.RequestTimeoutError):
            fut.result(timeout=60)
        wait_for(lambda: pool.stats().exit_reasons.get("timeout") == 1, 30, "the timeout's exit")
        assert pool.stats().workers[0].busy_for is None or pool.stats().workers[0].state == "busy"


# ---------------------------------------------------------------- retries


def test_retry_reruns_on_another_worker(tmp_path: Path) -> None:
    with modelpool.Pool(Crashy, workers=2, retries=1) as pool:
        out = pool.predict({"die_once": str(tmp_path / "marker")})
        assert out["pid"] > 0
        assert pool.stats().exit_reasons == {"SIGKILL": 1}  # one try crashed, one succeeded
        # the retry ran on the other worker, maybe before the crashed one's replacement started
        wait_for(lambda: _restarts(pool) == 1, 30, "the crashed worker's replacement")


def test_poison_request_is_not_retried_forever() -> None:
    with modelpool.Pool(Crashy, workers=2, retries=2) as pool:
        with pytest.raises(modelpool.WorkerCrashedError, match="tried 3 times"):
            pool.predict({"die": "sigkill"})
        assert pool.predict({})["pid"] > 0
        assert pool.stats().exit_reasons == {"SIGKILL": 3}  # three tries, then no more
        # the last crashed worker's replacement may not have started yet: wait for it
        wait_for(lambda: _restarts(pool) == 3, 30, "the last crashed worker's replacement")


# ---------------------------------------------------------------- timeouts


def test_timeout_kills_and_replaces_stuck_worker() -> None:
    with modelpool.Pool(Crashy, workers=1, timeout=0.5) as pool:
        (pid,) = _pids(pool)
        started = time.monotonic()
        with pytest.raises(modelpool.RequestTimeoutError, match="killed") as info:
            pool.predict({"die": "hang"})
        assert isinstance(info.value, TimeoutError)
        # it fired (not before the timeout), and did not wait out the hour-long hang
        assert 0.4 < time.monotonic() - started < 30
        # a per-call timeout: the pool's 0.5 s need not cover the replacement worker's start
        assert pool.predict({}, timeout=60)["pid"] != pid
        assert "timeout" in (pool.stats().workers[0].last_exit or "")


def test_per_call_timeout_overrides_pool_default() -> None:
    with modelpool.Pool(Crashy, workers=1, timeout=60) as pool:
        started = time.monotonic()
        with pytest.raises(modelpool.RequestTimeoutError):
            pool.predict({"die": "hang"}, timeout=0.3)
        assert time.monotonic() - started < 30  # far below the pool's 60 s: 0.3 s applied


def test_queued_request_expires_without_running(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with modelpool.Pool(Crashy, workers=1) as pool:
        blocker = pool.submit(wait_for_path, str(gate))  # holds the only worker until opened
        marker = tmp_path / "ran"
        with pytest.raises(modelpool.RequestTimeoutError, match="never run"):
            pool.predict({"die_once": str(marker)}, timeout=0.3)
        gate.touch()
        assert blocker.result(timeout=60) is True
        # one worker, a FIFO queue: had the expired request stayed queued, it would run first
        assert pool.predict({}, timeout=60)["pid"] > 0
        assert not marker.exists()


def test_setup_timeout_bounds_loading() -> None:
    pool = modelpool.Pool(SlowSetup, options={"seconds": 60}, setup_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(modelpool.ModelSetupError, match="setup_timeout"):
        pool.start()
    assert time.monotonic() - started < 30  # setup() would take 60 s


# ---------------------------------------------------------------- setup failures after start


def test_repeated_setup_failures_trip_the_breaker() -> None:
    pool = modelpool.Pool(Crashy, options={"stage": "setup", "how": "raise"}).start(wait=False)
    try:
        started = time.monotonic()
        with pytest.raises(modelpool.ModelSetupError) as info:
            pool.predict({}, timeout=60)
        assert "3 times in a row" in str(info.value)
        assert "boom on purpose" in str(info.value)
        assert time.monotonic() - started < 60
        fast = time.monotonic()
        with pytest.raises(modelpool.ModelSetupError):  # fails fast now, no respawn loop
            pool.predict({})
        # raised in the caller: milliseconds; another load attempt would first back off 2 s
        assert time.monotonic() - fast < 1.0
        (slot,) = pool.stats().workers  # the slot is still reported, with why it is empty
        assert slot.state == "failed"
        assert slot.pid is None
        assert "code 3" in (slot.last_exit or "")
    finally:
        pool.shutdown()


# ---------------------------------------------------------------- recycling


def test_recycle_after_max_requests_without_losing_requests() -> None:
    """The old worker keeps serving while its replacement loads, then stops; no request fails
    and there is always a worker to serve."""
    with modelpool.Pool(Echo, workers=1, max_requests_per_worker=5) as pool:
        served_by: set[int] = set()
        deadline = time.monotonic() + 60
        i = 0
        while len(served_by) < 3:
            assert time.monotonic() < deadline, f"only saw workers {served_by}"
            out = pool.submit(os.getpid).result(timeout=60)
            served_by.add(out)
            assert pool.predict({"i": np.array(i)})["i"] == i
            i += 1
            states = [w.state for w in pool.stats().workers]
            assert any(s in ("idle", "busy", "retiring") for s in states), states
        assert pool.stats().workers[-1].restarts >= 2


def test_recycle_when_memory_limit_exceeded() -> None:
    with modelpool.Pool(Leaky, workers=1, max_memory_per_worker="200MB") as pool:
        first = pool.predict(0)
        for _ in range(4):
            pool.predict(60)

        def replaced() -> bool:
            return pool.predict(0) != first

        wait_for(replaced, 30, "a new worker")
        # recycled for its memory: stopped in turn, not killed (an out-of-memory kill reads
        # SIGKILL), and the only reason it could have had
        wait_for(lambda: pool.stats().exit_reasons == {"recycled": 1}, 30, "the old one's exit")


def _free_ports(count: int) -> int:
    """A base port such that ``base .. base + count - 1`` can be listened on now. Taken below
    the ephemeral range: a port the kernel hands out itself (to ``bind(0)`` and to every
    outgoing connection of the tests running in parallel) could be taken at any moment."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral = int(f.read().split()[0])
    rng = random.Random()
    for _ in range(100):
        base = rng.randrange(10_000, ephemeral - count)
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise AssertionError("no free port range")


def _events(pool: modelpool.Pool) -> list[str]:
    return [e["event"] for e in pool.stats().events]


def test_recycling_overlap_is_told_apart_by_lane() -> None:
    """During recycling the old worker and its replacement run at once, with the same index;
    ``worker_info().lane`` differs between them, so a port per (index, lane) never collides."""
    base = _free_ports(4)
    options = {"base": base, "use_lane": True}
    with modelpool.Pool(
        PortPerWorker, workers=2, options=options, max_requests_per_worker=2
    ) as pool:
        seen: dict[int, set[int]] = {}
        deadline = time.monotonic() + 60
        while len({g for g in seen if g >= 2}) == 0:  # both slots went through two recyclings
            assert time.monotonic() < deadline, seen
            out = pool.predict({})
            seen.setdefault(int(out["generation"]), set()).add(int(out["lane"]))
            time.sleep(0.005)
        assert "setup_failed" not in _events(pool), pool.stats().events
    assert seen[0] == {0}
    assert seen[1] == {1}, "a replacement must not share its lane with the worker it replaces"


def test_a_replacement_that_keeps_failing_is_loud_and_the_limit_holds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What users saw: a model that listens on ``base + index`` cannot load in a replacement
    while the old worker (same index) still holds the port. Each failure is logged with the
    worker's traceback and recorded in the events; after 3 failures in a row the old worker is
    stopped (it does not serve forever past its limit) and the slot loads again, alone."""
    caplog.set_level(logging.WARNING, logger="modelpool")
    base = _free_ports(1)
    with modelpool.Pool(PortPerWorker, options={"base": base}, max_requests_per_worker=2) as pool:
        first = pool.predict({})["pid"]
        deadline = time.monotonic() + 60
        while (out := pool.predict({}))["pid"] == first:
            assert time.monotonic() < deadline, pool.stats()
            time.sleep(0.005)
        assert out["generation"] >= 4, "three replacements failed before the old one stopped"
        wait_for(lambda: first not in _pids(pool), 30, "the old worker to stop")
        events = _events(pool)
    assert events.count("setup_failed") == 3, events
    assert "retired_unreplaced" in events
    failures = [r for r in caplog.records if r.name.startswith("modelpool") and r.exc_info]
    assert len(failures) == 3, [r.getMessage() for r in failures]
    assert "Address already in use" in caplog.text, "the worker's own traceback is logged"
    assert "worker_info().lane" in caplog.text, "the log says how to avoid it"


def test_a_slot_whose_replacements_never_load_trips_the_breaker() -> None:
    """The other outcome: the old worker stops, the slot's lone new attempt fails too, and the
    pool then fails requests fast instead of serving past the limit."""
    with modelpool.Pool(LoadsOnce, max_requests_per_worker=2) as pool:
        first = pool.predict({})

        def serve_until_it_fails() -> None:
            deadline = time.monotonic() + 60
            while True:
                assert pool.predict({}, timeout=60) == first
                assert time.monotonic() < deadline, pool.stats()
                time.sleep(0.005)

        with pytest.raises(modelpool.ModelSetupError, match="times in a row") as info:
            serve_until_it_fails()
        assert "cannot load on purpose" in str(info.value)
        events = _events(pool)
        assert "retired_unreplaced" in events
        assert "stopped_starting" in events
        assert first not in _pids(pool)


# ---------------------------------------------------------------- shutdown


def test_shutdown_runs_teardown_in_every_worker(tmp_path: Path) -> None:
    path = tmp_path / "teardown.txt"
    with modelpool.Pool(Teardown, workers=2, options={"path": str(path)}) as pool:
        pids = _pids(pool)
    assert {int(line) for line in path.read_text().split()} == pids


def test_shutdown_finishes_in_flight_work(tmp_path: Path) -> None:
    pool = modelpool.Pool(Teardown, workers=1, options={"path": str(tmp_path / "t")}).start()
    futures = [pool.submit(time.sleep, 0.2) for _ in range(3)]
    pool.shutdown(wait=True)
    assert [f.result(timeout=0) for f in futures] == [None, None, None]


def test_shutdown_meets_its_deadline_and_fails_the_stuck() -> None:
    pool = modelpool.Pool(Crashy, workers=1, drain_timeout=0.5).start()
    stuck = pool.submit(time.sleep, 3600)
    wait_for(lambda: pool.stats().in_flight == 1, 30, "the request to run")
    started = time.monotonic()
    pool.shutdown(wait=True)
    assert time.monotonic() - started < 30  # drain_timeout=0.5 s; the work would take an hour
    with pytest.raises(modelpool.PoolClosedError):
        stuck.result(timeout=0)


def test_shutdown_cancel_futures_cancels_queued(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    pool = modelpool.Pool(Echo, workers=1).start()
    running = pool.submit(wait_for_path, str(gate))  # holds the only worker until opened
    queued = [pool.submit(time.sleep, 0.3) for _ in range(3)]

    def open_gate_once_queued_settle() -> None:  # so none of them can start first
        # (not cf.wait: it does not count a cancelled future that no executor notified)
        deadline = time.monotonic() + 60
        while not all(f.done() for f in queued) and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.touch()

    opener = threading.Thread(target=open_gate_once_queued_settle)
    opener.start()
    pool.shutdown(wait=True, cancel_futures=True)
    opener.join()
    assert running.result(timeout=0) is True
    assert all(f.cancelled() for f in queued)


def test_shutdown_wait_false_returns_at_once_and_completes(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    pool = modelpool.Pool(Echo, workers=2).start()
    busy = pool.submit(wait_for_path, str(gate))  # in flight until the gate opens
    started = time.monotonic()
    pool.shutdown(wait=False)
    # "at once" takes milliseconds; 2 s is far more, yet a shutdown that waited for the work
    # could not return before the gate opens below (or drain_timeout, 30 s, ends it)
    assert time.monotonic() - started < 2.0
    gate.touch()
    assert pool._supervisor.join(timeout=60)
    assert busy.result(timeout=0) is True


def test_no_leftover_threads_after_shutdown() -> None:
    before = {t.ident for t in threading.enumerate()}
    with modelpool.Pool(Echo, workers=2) as pool:
        pool.predict({})

    def new() -> list[str]:
        return [t.name for t in threading.enumerate() if t.ident not in before]

    # threads that are just finishing get a moment (they need milliseconds); a thread left
    # running for good is still caught
    deadline = time.monotonic() + 10
    while new() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert new() == []


# ----------------------------------------------- a slot that cannot load, loading and shutting down


def _pool_with_a_failed_slot() -> modelpool.Pool:
    """Two slots; slot 1 cannot load, so the breaker trips for it while slot 0 serves."""
    pool = modelpool.Pool(FailSlot, workers=2, options={"bad_index": 1}).start(wait=False)
    wait_for(lambda: pool.stats().workers[1].state == "failed", 60, "slot 1 to fail")
    return pool


def test_breaker_leaves_healthy_workers_serving() -> None:
    """One slot that cannot load must not shut out the workers that did."""
    pool = _pool_with_a_failed_slot()
    try:
        for _ in range(5):
            assert pool.predict({}) == 0  # served by slot 0
    finally:
        pool.shutdown()


def test_an_old_setup_failure_does_not_fail_a_later_start(tmp_path: Path) -> None:
    marker = tmp_path / "failed-once"
    pool = modelpool.Pool(FailSlot, options={"fail_once": str(marker)}).start(wait=False)
    try:
        assert pool.predict({}, timeout=60) == 0  # recovered after one failure
        pool.start()  # must not re-raise the failure that was already survived
        assert pool.predict({}) == 0
    finally:
        pool.shutdown()


def test_submit_then_shutdown_at_once_finishes_the_work() -> None:
    """Workers still loading are not killed while queued work waits for them."""
    pool = modelpool.Pool(SlowSetup, options={"seconds": 0.3})
    futures = [pool.submit(os.getpid) for _ in range(3)]
    pool.shutdown(wait=True)
    assert all(f.result(timeout=0) > 0 for f in futures)


def test_drain_timeout_none_waits_for_work() -> None:
    pool = modelpool.Pool(Echo, drain_timeout=None).start()
    future = pool.submit(time.sleep, 0.3)
    pool.shutdown()
    assert future.result(timeout=0) is None


def test_load_is_spread_over_idle_workers() -> None:
    with modelpool.Pool(Echo, workers=2) as pool:
        for _ in range(20):
            pool.predict({})
        assert sorted(w.served for w in pool.stats().workers) == [10, 10]


def test_shutdown_with_a_model_that_cannot_load_fails_queued_work_promptly() -> None:
    pool = modelpool.Pool(Crashy, options={"stage": "setup", "how": "raise"}, drain_timeout=None)
    future = pool.submit(os.getpid)
    # (a shutdown before the supervisor started any worker fails it as closed, not as the
    # model's setup error: on a loaded machine that can happen first)
    wait_for(lambda: pool.stats().workers or pool.stats().exit_reasons, 30, "a worker to start")
    started = time.monotonic()
    pool.shutdown()
    assert time.monotonic() - started < 30  # drain_timeout=None: a wrong wait never ends
    with pytest.raises(modelpool.ModelSetupError, match="boom on purpose"):
        future.result(timeout=0)


def test_start_again_does_not_tear_down_a_serving_pool() -> None:
    pool = _pool_with_a_failed_slot()
    try:
        with pytest.raises(modelpool.ModelSetupError):
            pool.start()  # it cannot get every worker ready...
        assert pool.predict({}) == 0  # ...but the pool keeps serving with the one it has
    finally:
        pool.shutdown()


def test_shutdown_while_loading_does_not_wait_for_a_cancelled_request() -> None:
    pool = modelpool.Pool(SlowSetup, options={"seconds": 30}).start(wait=False)
    fut = pool.submit(os.getpid)
    wait_for(lambda: pool.stats().workers[0].state == "starting", 30, "the worker to load")
    assert fut.cancel()  # still queued: the only worker is loading
    started = time.monotonic()
    pool.shutdown()
    # the loading worker is killed, not waited for (its setup() takes 30 s)
    assert time.monotonic() - started < 15


# ------------------------------- races and resource failures found in review (each once reproduced)


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
    # the call is under way before the shutdown
    wait_for(lambda: pool.stats().in_flight == 1, 60, "the call to be in flight", interval=0.005)
    started = time.monotonic()
    pool.shutdown()  # drain_timeout is 30 s: it must not be waited out
    assert time.monotonic() - started < 15  # the call needs 0.5 s; waiting it out, 30 s
    caller.join()


def test_a_failed_process_start_is_retried_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelpool import _handle

    real = _handle.launch
    failures = []

    def flaky(ctx, spec):  # type: ignore[no-untyped-def]
        if spec.generation == 1 and not failures:
            failures.append(spec.index)
            raise BlockingIOError(11, "Resource temporarily unavailable (fork)")
        return real(ctx, spec)

    monkeypatch.setattr(_handle, "launch", flaky)
    with modelpool.Pool(Crashy, workers=1) as pool:
        with pytest.raises(modelpool.WorkerCrashedError):
            pool.predict({"die": "sigkill"})
        assert pool.predict({}, timeout=60)["pid"] > 0  # the second try started it
    assert failures == [0]


def test_forced_shutdown_reports_shutdown_not_a_crash(tmp_path: Path) -> None:
    """A request running when ``terminate()`` kills its worker fails with PoolClosedError."""
    started = tmp_path / "started"
    pool = modelpool.Pool(Crashy, workers=1).start()
    future = pool.submit(started_then_wait, str(started), str(tmp_path / "never"))
    wait_for(started.exists, 60, "the request to run")
    pool.terminate()
    with pytest.raises(modelpool.PoolClosedError):
        future.result(timeout=5)


# --------------------------------------------- scaling: min_workers / max_workers, load_concurrency


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
        # nothing to wait for: time (two scale_down_after periods) in which the pool would
        # go below min_workers if it could
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
            await until(lambda: pool.stats().in_flight >= 1, 60, "the held request in flight")
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
