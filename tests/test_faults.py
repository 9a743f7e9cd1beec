"""Faults: crashes, timeouts, retries, setup failures, recycling, shutdown. Nothing hangs,
nothing is silently lost, nothing leaks (the autouse fixture in conftest checks children)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import modelpool
from _models import (
    Crashy,
    Echo,
    FailSlot,
    Leaky,
    LoadsOnce,
    PortPerWorker,
    SlowSetup,
    Teardown,
    wait_for_path,
)

HOW = ["sigkill", "sigsegv", "exit", "raise"]
EXPECTED_EXIT = {"sigkill": "SIGKILL", "sigsegv": "SIGSEGV", "exit": "code 7"}


def _pids(pool: modelpool.Pool) -> set[int]:
    return {w.pid for w in pool.stats().workers if w.pid is not None}


def _wait_for(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


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
    gate = tmp_path / "gate"
    with modelpool.Pool(Crashy, workers=3) as pool:
        # two requests that run until the gate opens: they are surely running during the crash
        innocent = [pool.submit(wait_for_path, str(gate)) for _ in range(2)]
        _wait_for(lambda: pool.stats().in_flight == 2)
        doomed = pool.submit(os._exit, 9)  # in the third worker, beside them
        with pytest.raises(modelpool.WorkerCrashedError, match="code 9"):
            doomed.result(timeout=60)
        assert not any(f.done() for f in innocent)
        gate.touch()
        assert [f.result(timeout=60) for f in innocent] == [True, True]
        assert pool.predict({})["pid"] > 0


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
        _wait_for(lambda: _pids(pool) - {pid} and pool.stats().workers[0].state == "idle")
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
        _wait_for(lambda: pool.stats().workers[0].state == "busy")
        time.sleep(0.2)
        busy_for = pool.stats().workers[0].busy_for
        read = time.monotonic()
        assert busy_for is not None
        # bracketed by this thread's clock, not by how fast the machine is: the request
        # started after submit() was called and no later than it was seen busy
        assert 0.2 - 1e-3 <= busy_for <= read - submitted + 1e-3, (busy_for, read - submitted)
        with pytest.raises(modelpool.RequestTimeoutError):
            fut.result(timeout=60)
        _wait_for(lambda: pool.stats().exit_reasons.get("timeout") == 1)
        assert pool.stats().workers[0].busy_for is None or pool.stats().workers[0].state == "busy"


# ---------------------------------------------------------------- retries


def test_retry_reruns_on_another_worker(tmp_path: Path) -> None:
    with modelpool.Pool(Crashy, workers=2, retries=1) as pool:
        out = pool.predict({"die_once": str(tmp_path / "marker")})
        assert out["pid"] > 0
        assert pool.stats().exit_reasons == {"SIGKILL": 1}  # one try crashed, one succeeded
        # the retry ran on the other worker, maybe before the crashed one's replacement started
        _wait_for(lambda: sum(w.restarts for w in pool.stats().workers) == 1)


def test_poison_request_is_not_retried_forever() -> None:
    with modelpool.Pool(Crashy, workers=2, retries=2) as pool:
        with pytest.raises(modelpool.WorkerCrashedError, match="tried 3 times"):
            pool.predict({"die": "sigkill"})
        assert pool.predict({})["pid"] > 0
        assert pool.stats().exit_reasons == {"SIGKILL": 3}  # three tries, then no more
        # the last crashed worker's replacement may not have started yet: wait for it
        _wait_for(lambda: sum(w.restarts for w in pool.stats().workers) == 3)


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

        _wait_for(replaced, timeout=30)


def _free_ports(count: int) -> int:
    """A base port such that ``base .. base + count - 1`` can be listened on now."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
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
        _wait_for(lambda: first not in _pids(pool))
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
    _wait_for(lambda: pool.stats().in_flight == 1)
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


# ---------------------------------------------------------------- misuse, before any process


def test_class_defined_in_a_function_is_refused() -> None:
    class Local(modelpool.Model):
        def predict(self, inputs: object) -> object:
            return inputs

    with pytest.raises(modelpool.ModelSpecError, match="defined inside a function"):
        modelpool.Pool(Local)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("_models", "must have the form"),
        ("no_such_module_xyz:Model", "no module named 'no_such_module_xyz'"),
        ("_models:NoSuchModel", "has no attribute 'NoSuchModel'"),
        ("_models:_die", "not a class"),
        ("modelpool:Model", "no predict"),
    ],
)
def test_bad_import_strings(spec: str, match: str) -> None:
    with pytest.raises(modelpool.ModelSpecError, match=match):
        modelpool.Pool(spec)


def test_fork_refused_with_live_threads() -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="someone-elses-thread")
    thread.start()
    try:
        pool = modelpool.Pool(Echo, start_method="fork")
        with pytest.raises(modelpool.UnsafeForkError, match="someone-elses-thread"):
            pool.start()
    finally:
        stop.set()
        thread.join()


def _pool_with_a_failed_slot() -> modelpool.Pool:
    """Two slots; slot 1 cannot load, so the breaker trips for it while slot 0 serves."""
    pool = modelpool.Pool(FailSlot, workers=2, options={"bad_index": 1}).start(wait=False)
    _wait_for(lambda: pool.stats().workers[1].state == "failed", timeout=60)
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


def test_predict_on_a_pool_without_model_fails_in_the_caller() -> None:
    with modelpool.Pool(workers=1) as pool:
        with pytest.raises(modelpool.ModelSpecError, match="without a model"):
            pool.predict({})
        assert pool.submit(os.getpid).result() > 0


def test_dropped_pool_does_not_hang_interpreter_exit(tmp_path: Path) -> None:
    script = tmp_path / "drop.py"
    script.write_text(
        "import modelpool, os\n"
        "if __name__ == '__main__':\n"
        "    pool = modelpool.Pool(workers=2).start()\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    del pool\n"
    )
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    worker = int(done.stdout.split()[0])
    _wait_for(lambda: not _alive(worker), timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    ("text", "size"), [("1.5GB", int(1.5 * 1024**3)), ("512MiB", 512 * 1024**2), (1000, 1000)]
)
def test_memory_limits_parse(text: object, size: int) -> None:
    pool = modelpool.Pool(Echo, max_memory_per_worker=text)  # type: ignore[arg-type]
    assert pool._settings.max_memory_per_worker == size


def test_shutdown_with_a_model_that_cannot_load_fails_queued_work_promptly() -> None:
    pool = modelpool.Pool(Crashy, options={"stage": "setup", "how": "raise"}, drain_timeout=None)
    future = pool.submit(os.getpid)
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


def test_environment_at_spawn_reaches_forkserver_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    with modelpool.Pool(workers=1) as pool:  # makes sure the fork server is running already
        pool.submit(os.getpid).result()
    monkeypatch.setenv("MODELPOOL_TEST_LATE_VAR", "late")
    with modelpool.Pool(workers=1) as pool:
        assert pool.submit(os.environ.get, "MODELPOOL_TEST_LATE_VAR").result() == "late"


def test_sys_path_at_spawn_reaches_forkserver_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model module the pool's process can import (its directory added to ``sys.path``
    after the fork server started, as ``modelpool serve`` and the Celery worker add the
    working directory) imports in the workers too."""
    with modelpool.Pool(workers=1) as pool:  # makes sure the fork server is running already
        pool.submit(os.getpid).result()
    (tmp_path / "late_path_model.py").write_text(
        "import modelpool\n\n"
        "class Model(modelpool.Model):\n"
        "    def predict(self, inputs):\n"
        "        return __file__\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with modelpool.Pool("late_path_model:Model", workers=1) as pool:
        assert pool.predict({}) == str(tmp_path / "late_path_model.py")


def test_shutdown_while_loading_does_not_wait_for_a_cancelled_request() -> None:
    pool = modelpool.Pool(SlowSetup, options={"seconds": 30}).start(wait=False)
    fut = pool.submit(os.getpid)
    _wait_for(lambda: pool.stats().workers[0].state == "starting")
    assert fut.cancel()  # still queued: the only worker is loading
    started = time.monotonic()
    pool.shutdown()
    # the loading worker is killed, not waited for (its setup() takes 30 s)
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("path", ["predict", "batched", "submit"])
def test_a_local_transport_failure_is_a_modelpool_error_never_the_models(
    monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """A write that fails in this process (here EINVAL, as writev gives past IOV_MAX) fails the
    request with TransportError, replaces the worker, and the pool keeps serving."""
    from modelpool import _transport

    real = _transport._Wire.send
    failed: list[int] = []

    def send_once_then_fail(self: _transport._Wire, parts: list, total: int | None = None) -> None:
        if not failed:
            failed.append(1)
            raise OSError(22, "Invalid argument")
        real(self, parts, total)

    batch = 8 if path == "batched" else 1
    with modelpool.Pool(Echo, workers=1, max_batch_size=batch) as pool:
        pid = pool.stats().workers[0].pid
        monkeypatch.setattr(_transport._Wire, "send", send_once_then_fail)
        call = (
            (lambda: pool.submit(abs, -1).result(timeout=60))
            if path == "submit"
            else (lambda: pool.predict({"x": np.ones((1, 2), np.float32)}))
        )
        with pytest.raises(modelpool.TransportError, match="could not exchange") as info:
            call()
        assert isinstance(info.value.__cause__, OSError)
        assert pool.predict({"x": np.ones((1, 2), np.float32)})["x"].shape == (1, 2)
        assert pool.stats().workers[0].pid != pid  # out of step: replaced
