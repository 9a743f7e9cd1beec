"""The fleet's policies (backoff, the setup breaker, recycling, autoscaling, setup deadlines)
as exact functions of the time: a fake clock and a fake ``launch``, no processes, no sleeps.

The real-process behaviour of the same policies is tested in test_supervisor.py and
test_clock.py; these tests pin the arithmetic."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from _fakes import pool_settings
from modelpool import ModelSetupError
from modelpool._fleet import MAX_SETUP_FAILURES, STOP_GRACE, Fleet, backoff
from modelpool._handle import BUSY, IDLE, STARTING, STOPPING, WorkerHandle
from modelpool._requests import Outbox
from modelpool._worker import STOP, WorkerSpec


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.killed = False
        self.sentinel = -1

    def kill(self) -> None:
        self.killed = True


class FakeChannel:
    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.wire = SimpleNamespace(shutdown=lambda: None)

    def send(self, message: Any) -> None:
        self.sent.append(message)


class Harness:
    """A fleet whose launches are recorded, under a held lock (as the supervisor holds it)."""

    def __init__(self, **overrides: Any) -> None:
        self.settings = pool_settings(**overrides)
        self.specs: list[WorkerSpec] = []
        self.lock = threading.Lock()
        self.outbox = Outbox(logging.getLogger("test.fleet"), lambda rid: None)
        self.fleet = Fleet(
            self.settings, self.launch, self.lock, self.outbox, watch=lambda w: None, fork=False
        )
        self.fail_launch: BaseException | None = None

    def launch(self, spec: WorkerSpec) -> WorkerHandle:
        if self.fail_launch is not None:
            raise self.fail_launch
        self.specs.append(spec)
        pid = 1000 + len(self.specs)
        handle = WorkerHandle(spec.index, spec.generation, FakeProcess(pid), FakeChannel(), None)  # type: ignore[arg-type]
        handle.lane = spec.lane
        return handle

    def load_all(self, now: float) -> None:
        for w in self.fleet.workers:
            if w.state == STARTING:
                self.fleet.loaded(w, w.pid or 0, now)


@pytest.fixture
def make() -> Iterator[Any]:
    made: list[Harness] = []

    def build(**overrides: Any) -> Harness:
        harness = Harness(**overrides)
        harness.lock.acquire()  # every Fleet method requires the supervisor's lock
        made.append(harness)
        return harness

    yield build
    for harness in made:
        harness.lock.release()


def test_backoff_doubles_from_half_a_second_up_to_five() -> None:
    assert [backoff(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_fleet_starts_its_floor_at_once_and_gives_each_slot_its_own_seed(make: Any) -> None:
    h = make(workers=3, seed=7)
    h.fleet.respawn(now=0.0)
    assert [(s.index, s.generation) for s in h.specs] == [(0, 0), (1, 0), (2, 0)]
    assert len({s.seed for s in h.specs}) == 3
    assert all(s.pool is h.settings for s in h.specs)


def test_methods_refuse_to_run_without_the_lock() -> None:
    h = Harness()
    with pytest.raises(AssertionError):
        h.fleet.respawn(now=0.0)


def test_setup_failures_back_off_then_trip_the_breaker(make: Any) -> None:
    h = make()
    fleet = h.fleet
    now = 0.0
    fleet.respawn(now)
    error = ModelSetupError("boom")
    for failure in range(1, MAX_SETUP_FAILURES):
        (worker,) = fleet.workers
        fleet.exited(worker, "exit", "setup_failed", now, closing=False)
        fleet.setup_failed(0, error, now, closing=False)
        assert fleet.respawn_at == {0: now + backoff(failure)}
        fleet.respawn(now + backoff(failure) - 0.001)  # not yet
        assert not fleet.workers
        now += backoff(failure)
        fleet.respawn(now)  # exactly on time
        assert len(fleet.workers) == 1
    (worker,) = fleet.workers
    fleet.exited(worker, "exit", "setup_failed", now, closing=False)
    fleet.setup_failed(0, error, now, closing=False)
    assert isinstance(fleet.broken, ModelSetupError)
    assert f"failed to load {MAX_SETUP_FAILURES} times in a row" in str(fleet.broken)
    fleet.respawn(now + 3600)
    assert not fleet.workers
    assert not fleet.respawn_at
    assert [e["event"] for e in fleet.events()][-1] == "stopped_starting"
    assert fleet.failure_seq == MAX_SETUP_FAILURES


def test_a_worker_that_loads_ends_the_failure_streak(make: Any) -> None:
    h = make()
    fleet = h.fleet
    fleet.respawn(0.0)
    for _ in range(MAX_SETUP_FAILURES - 1):
        (worker,) = fleet.workers
        fleet.exited(worker, "exit", "setup_failed", 0.0, closing=False)
        fleet.setup_failed(0, ModelSetupError("boom"), 0.0, closing=False)
        fleet.respawn(100.0)
    h.load_all(100.0)
    (worker,) = fleet.workers
    worker.state = BUSY
    fleet.exited(worker, "killed by SIGKILL", "SIGKILL", 100.0, closing=False)
    assert fleet.respawn_at == {0: 100.0}  # a crash while serving: respawned at once
    fleet.respawn(100.0)
    (worker,) = fleet.workers
    fleet.exited(worker, "exit", "setup_failed", 100.0, closing=False)
    fleet.setup_failed(0, ModelSetupError("boom"), 100.0, closing=False)
    assert fleet.broken is None  # the streak began again
    assert fleet.respawn_at == {0: 100.0 + backoff(1)}


def test_a_process_that_cannot_be_started_counts_as_a_setup_failure(make: Any) -> None:
    h = make()
    h.fail_launch = BlockingIOError(11, "Resource temporarily unavailable")
    h.fleet.respawn(0.0)
    assert not h.fleet.workers
    assert h.fleet.respawn_at == {0: backoff(1)}
    assert "could not start a worker process" in str(h.fleet.last_setup_error)
    h.fail_launch = None
    h.fleet.respawn(backoff(1))
    assert h.specs[-1].generation == 0  # the failed start did not use up a generation


def test_load_concurrency_loads_one_worker_at_a_time(make: Any) -> None:
    h = make(workers=3, load_concurrency=1)
    h.fleet.respawn(0.0)
    assert len(h.fleet.workers) == 1
    assert h.fleet.next_wake(0.0) == []  # nothing timed: the READY wakes the loop
    h.load_all(1.0)
    h.fleet.respawn(1.0)
    assert len(h.fleet.workers) == 2


def test_autoscaling_grows_one_worker_at_a_time_while_requests_wait(make: Any) -> None:
    h = make(workers=3, min_workers=1, scale_down_after=30.0)
    fleet = h.fleet
    fleet.respawn(0.0)
    h.load_all(0.0)
    fleet.workers[0].state = BUSY
    fleet.autoscale(1.0, waiting=5)
    assert fleet.active == {0, 1}
    assert fleet.respawn_at == {1: 1.0}
    fleet.respawn(1.0)
    fleet.autoscale(1.5, waiting=5)  # one is loading: no second step yet
    assert fleet.active == {0, 1}
    h.load_all(2.0)
    fleet.workers[1].state = BUSY
    fleet.autoscale(2.0, waiting=5)
    assert fleet.active == {0, 1, 2}
    fleet.respawn(2.0)
    h.load_all(2.0)
    for w in fleet.workers:
        w.state = BUSY
    fleet.autoscale(3.0, waiting=5)
    assert fleet.active == {0, 1, 2}  # the ceiling
    assert [e["event"] for e in fleet.events()] == ["scale_up", "scale_up"]


def test_autoscaling_stops_a_worker_idle_for_scale_down_after_not_sooner(make: Any) -> None:
    h = make(workers=2, min_workers=1, scale_down_after=30.0)
    fleet = h.fleet
    fleet.active.add(1)
    fleet.respawn_at[1] = 0.0
    fleet.respawn(0.0)
    h.load_all(10.0)  # both idle since t=10
    fleet.workers[0].idle_since = 12.0
    assert min(fleet.next_wake(10.0)) == 40.0  # the loop wakes exactly when one is due
    fleet.autoscale(39.999, waiting=0)
    assert all(w.state == IDLE for w in fleet.workers)
    fleet.autoscale(40.0, waiting=0)
    stopped = [w for w in fleet.workers if w.state == STOPPING]
    assert [w.index for w in stopped] == [1]
    assert stopped[0].channel.sent == [(STOP, 0, None)]  # type: ignore[attr-defined]
    assert stopped[0].deadline == 40.0 + STOP_GRACE
    assert fleet.active == {0}
    fleet.autoscale(1000.0, waiting=0)  # never below the floor
    assert fleet.active == {0}


def test_requests_waiting_keep_idle_workers_from_scaling_down(make: Any) -> None:
    h = make(workers=2, min_workers=1, scale_down_after=1.0)
    fleet = h.fleet
    fleet.active.add(1)
    fleet.respawn_at[1] = 0.0
    fleet.respawn(0.0)
    h.load_all(0.0)
    fleet.autoscale(100.0, waiting=1)
    assert fleet.active == {0, 1}


def test_recycling_starts_the_replacement_first_then_stops_the_old_worker(make: Any) -> None:
    h = make(max_requests_per_worker=10)
    fleet = h.fleet
    fleet.respawn(0.0)
    h.load_all(0.0)
    (old,) = fleet.workers
    assert old.limit is not None
    assert 10 <= old.limit <= 11
    old.retiring = True
    fleet.retire(5.0)
    assert fleet.respawn_at == {0: 5.0}
    fleet.respawn(5.0)
    new = fleet.workers[-1]
    assert (new.index, new.generation, new.lane) == (0, 1, 1)  # a lane of its own
    fleet.retire(6.0)
    assert old.state == IDLE  # the replacement is still loading: the old one serves on
    assert fleet.idle_worker() is old
    fleet.loaded(new, 2, 7.0)
    assert fleet.idle_worker() is new  # the old one takes no more work
    fleet.retire(7.0)
    assert old.state == STOPPING


def test_a_replacement_that_keeps_failing_stops_the_old_worker_without_one(make: Any) -> None:
    h = make(max_requests_per_worker=10)
    fleet = h.fleet
    fleet.respawn(0.0)
    h.load_all(0.0)
    (old,) = fleet.workers
    old.retiring = True
    now = 0.0
    for _ in range(MAX_SETUP_FAILURES):
        fleet.retire(now)
        fleet.respawn(now)
        new = fleet.workers[-1]
        fleet.exited(new, "exit", "setup_failed", now, closing=False)
        fleet.setup_failed(0, ModelSetupError("port in use"), now, closing=False)
        now += 10.0
    assert fleet.broken is None
    assert old.stop_unreplaced
    assert old.state == STOPPING
    assert "worker_info().lane" in fleet.events()[-1]["reason"]
    fleet.exited(old, "exited with code 0", "recycled", now, closing=False)
    assert fleet.respawn_at == {0: now}  # the slot loads again, alone


def test_setup_timeout_kills_a_worker_still_loading_at_its_deadline(make: Any) -> None:
    h = make(setup_timeout=20.0)
    h.fleet.respawn(100.0)
    (worker,) = h.fleet.workers
    assert worker.deadline == 120.0
    assert 120.0 in h.fleet.next_wake(100.0)
    h.fleet.expire(119.999)
    assert not worker.process.killed  # type: ignore[attr-defined]
    h.fleet.expire(120.0)
    assert worker.process.killed  # type: ignore[attr-defined]
    assert worker.kill_kind == "timeout"
    assert "setup_timeout=20.0" in str(worker.setup_error)


def test_a_crash_while_serving_respawns_at_once_unless_closing(make: Any) -> None:
    h = make(workers=2)
    # before the first start, a slot is starting, not restarting (what `modelpool serve` says)
    assert {s.index: s.state for s in h.fleet.snapshot()[0]} == {0: "starting", 1: "starting"}
    h.fleet.respawn(0.0)
    h.load_all(0.0)
    a, b = h.fleet.workers
    a.state = BUSY
    h.fleet.exited(a, "killed by SIGSEGV", "SIGSEGV", 3.0, closing=False)
    assert h.fleet.respawn_at == {0: 3.0}
    assert h.fleet.exit_reasons == {"SIGSEGV": 1}
    b.state = BUSY
    h.fleet.exited(b, "killed by SIGSEGV", "SIGSEGV", 4.0, closing=True)
    assert h.fleet.respawn_at == {0: 3.0}
    slots = {s.index: s.state for s in h.fleet.snapshot()[0]}
    assert slots == {0: "restarting", 1: "stopped"}
