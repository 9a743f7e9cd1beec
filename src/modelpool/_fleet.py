"""The fleet: which worker processes exist, and the policies that start and stop them.

``Fleet`` owns the worker handles and every decision about their number: spawning a slot's
worker (and respawning it, with backoff, after a failure), recycling (a replacement first,
then the old worker), the setup breaker (after ``MAX_SETUP_FAILURES`` in a row the pool stops
starting workers), the memory limit, and autoscaling between ``floor`` and ``workers``.

Locking: a ``Fleet`` is guarded by its supervisor's lock. Every method requires it (they
assert that the lock is held) and takes the time as ``now`` from the supervisor's clock, so
the policies are exact functions of their inputs; tests drive them with a fake clock and a
fake ``launch``. The fleet never settles requests: a method whose decision fails requests
returns what to fail, or leaves it for the supervisor to read (``broken``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from ._exceptions import ModelSetupError, UnsafeForkError
from ._handle import BUSY, IDLE, STARTING, STOPPING, WorkerHandle, WorkerStats, private_memory, rss
from ._hygiene import derive_seed, fork_hazards, import_path
from ._requests import Outbox
from ._settings import PoolSettings
from ._worker import STOP, WorkerSpec

__all__ = [
    "MAX_SETUP_FAILURES",
    "MEMORY_CHECK_INTERVAL",
    "STOP_GRACE",
    "Fleet",
    "Launch",
    "Slot",
    "backoff",
    "exit_kind",
    "worker_stats",
]

#: Setup failures in a row (no worker became ready in between) after which the pool stops
#: respawning and fails requests fast.
MAX_SETUP_FAILURES = 3
#: Seconds a worker gets to run teardown() and exit before it is killed.
STOP_GRACE = 10.0
#: Seconds between RSS checks when max_memory_per_worker is set.
MEMORY_CHECK_INTERVAL = 1.0

#: Starts a worker process for a spec (``_handle.launch`` bound to a multiprocessing context).
Launch = Callable[[WorkerSpec], WorkerHandle]


def backoff(failures: int) -> float:
    """Seconds to wait before loading again after ``failures`` setup failures in a row."""
    return min(5.0, 0.5 * 2.0 ** (failures - 1))


@dataclasses.dataclass(frozen=True)
class Slot:
    """A slot with no live process (for ``stats()``): why, and what became of the last one."""

    index: int
    restarts: int
    state: str  # "starting" (never started yet), "restarting", "failed" or "stopped"
    last_exit: str | None


class Fleet:
    """Worker handles and the policies on their number; see the module docstring."""

    def __init__(
        self,
        settings: PoolSettings,
        launch: Launch,
        lock: threading.Lock,
        outbox: Outbox,
        *,
        watch: Callable[[WorkerHandle], None],
        fork: bool,
    ) -> None:
        self.settings = settings
        self._launch = launch
        self._lock = lock
        self._outbox = outbox
        self._watch = watch  # registers a new worker's connection and sentinel with the loop
        self._fork = fork  # workers are forked: refuse a fork that would break
        self.workers: list[WorkerHandle] = []
        self._generation = [-1] * settings.workers
        self.active: set[int] = set(range(settings.floor))  # slots that should have a worker
        self.respawn_at: dict[int, float] = dict.fromkeys(self.active, 0.0)
        self._last_exit: list[str | None] = [None] * settings.workers
        self.exit_reasons: collections.Counter[str] = collections.Counter()
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)
        self._setup_failures = 0  # in a row
        self.failure_seq = 0  # setup failures ever; Pool.start() raises on one newer than its call
        self.last_setup_error: ModelSetupError | None = None
        #: set when the pool stops starting workers (the breaker, or a fork it must refuse)
        self.broken: Exception | None = None
        self.next_memory_check = 0.0

    def _held(self) -> bool:
        return self._lock.locked()

    # ------------------------------------------------------------------ questions

    def idle_worker(self) -> WorkerHandle | None:
        """The idle worker that has served least (spreads load and recycling evenly)."""
        assert self._held()
        best = None
        for w in self.workers:
            usable = w.state == IDLE and not (w.retiring and self.has_successor(w))
            if usable and (best is None or w.served < best.served):
                best = w
        return best

    def capacity(self) -> bool:
        """Some worker is loaded (or loading) and able to serve."""
        return any(w.state in (IDLE, BUSY, STARTING) and not w.kill_reason for w in self.workers)

    def ready(self) -> int:
        return sum(1 for w in self.workers if w.state in (IDLE, BUSY))

    def count(self, state: str) -> int:
        return sum(1 for w in self.workers if w.state == state)

    def loading_full(self) -> bool:
        """As many workers are loading as ``load_concurrency`` allows."""
        limit = self.settings.load_concurrency
        return limit is not None and self.count(STARTING) >= limit

    def has_successor(self, worker: WorkerHandle) -> bool:
        """Whether ``worker`` (retiring) is to take no more work: its replacement is ready, or
        it stops without one (``stop_unreplaced``)."""
        return worker.stop_unreplaced or any(
            w.index == worker.index and w.generation > worker.generation and w.state in (IDLE, BUSY)
            for w in self.workers
        )

    def replaced(self, worker: WorkerHandle) -> bool:
        """A newer process of ``worker``'s slot exists."""
        return any(
            w.index == worker.index and w.generation > worker.generation for w in self.workers
        )

    def next_wake(self, now: float) -> list[float]:
        """The times at which the fleet has something to do."""
        times = [w.deadline for w in self.workers if w.deadline is not None]
        if not self.loading_full():  # else a READY (or an exit) wakes us
            times.extend(self.respawn_at.values())
        if self.settings.autoscaling and len(self.active) > self.settings.floor:
            idle = [w.idle_since for w in self.workers if w.state == IDLE]
            if idle:
                times.append(min(idle) + self.settings.scale_down_after)
        if self.settings.max_memory_per_worker:
            times.append(self.next_memory_check)
        return times

    # ------------------------------------------------------------------ starting

    def respawn(self, now: float) -> None:
        """Start the workers whose time has come, one loading at a time if so limited."""
        assert self._held()
        if self.broken is not None:
            self.respawn_at.clear()
            return
        for index, when in sorted(self.respawn_at.items()):
            if index not in self.active:
                del self.respawn_at[index]  # scaled away meanwhile
                continue
            if when > now:
                continue
            if self.loading_full():
                break  # load one at a time (load_concurrency): the next READY resumes us
            del self.respawn_at[index]
            if self._fork:
                hazards = fork_hazards()
                if hazards:  # the parent changed since start(): forking now would break
                    self.broken = UnsafeForkError(
                        f"cannot start a replacement worker for {self.settings.model_name!r}"
                        " with start_method='fork': " + "; ".join(hazards) + ". Use the "
                        "default start method (forkserver) for a pool that must heal."
                    )
                    return
            try:
                self.spawn(index, now)
            except Exception as exc:  # e.g. EAGAIN from fork, EMFILE: retry with backoff
                self._generation[index] -= 1
                error = ModelSetupError(
                    f"could not start a worker process for {self.settings.model_name!r}: "
                    f"{type(exc).__name__}: {exc}"
                )
                error.__cause__ = exc
                self.setup_failed(index, error, now, closing=False)

    def spawn(self, index: int, now: float) -> WorkerHandle:
        s = self.settings
        self._generation[index] += 1
        generation = self._generation[index]
        lanes = {w.lane for w in self.workers if w.index == index}  # alive: e.g. retiring
        lane = min(set(range(len(lanes) + 1)) - lanes)
        spec = WorkerSpec(
            pool=s,
            index=index,
            generation=generation,
            seed=derive_seed(s.seed, index, generation),
            # the parent's whole environment now, as spawn would give it (a fork server keeps
            # the one it started with), with the thread limits on top
            env={
                **os.environ,
                **s.env,
                **(s.devices[index % len(s.devices)] if s.devices else {}),
            },
            lane=lane,
            sys_path=import_path(),
        )
        worker = self._launch(spec)
        if s.setup_timeout is not None:
            worker.deadline = now + s.setup_timeout
        if s.max_requests_per_worker:
            jitter = random.randint(0, max(0, s.max_requests_per_worker // 10))
            worker.limit = s.max_requests_per_worker + jitter
        self.workers.append(worker)
        self._watch(worker)  # for its READY (or why it could not start), and its exit
        return worker

    def loaded(self, worker: WorkerHandle, pid: int, now: float) -> None:
        """``worker`` finished setup(): it serves from now on; the failure streak ends."""
        worker.state = IDLE
        worker.idle_since = now
        worker.deadline = None
        worker.pid = pid
        self._setup_failures = 0

    def setup_failed(
        self, index: int, error: ModelSetupError, now: float, *, closing: bool
    ) -> None:
        """A worker of slot ``index`` could not be started or loaded: back off, or trip the
        breaker (then ``broken`` is set; the supervisor fails what waits if nothing can serve).

        Each failure is logged with the worker's traceback and recorded in ``events()``. A
        replacement that fails while the worker it replaces still runs (recycling) may fail
        *because* the two overlap (a port or a lock per slot, GPU memory for two copies): at
        the breaker's count, the old worker is stopped without a replacement instead, and the
        slot loads again alone once it is gone; if that fails too, the breaker trips.
        """
        assert self._held()
        self.last_setup_error = error
        self.failure_seq += 1
        if closing:
            return
        self._setup_failures += 1
        failures = self._setup_failures
        self.event("setup_failed", str(error))
        retiring = [
            w
            for w in self.workers
            if w.index == index and w.retiring and w.state != STOPPING and not w.stop_unreplaced
        ]
        name = self.settings.model_name
        if failures >= MAX_SETUP_FAILURES and retiring:
            self.respawn_at.pop(index, None)
            for w in retiring:
                w.stop_unreplaced = True  # no new work (has_successor); retire() stops it
                if w.state == IDLE:
                    self.stop(w, now)
            pids = ", ".join(str(w.pid) for w in retiring)
            reason = (
                f"the replacement of worker {index} (pid {pids}) of {name!r} failed to load "
                f"{failures} times in a row while that worker still ran; it is stopped without "
                "a replacement (it is past its recycling limit), and the slot loads again once "
                "it has exited. A model that holds a port, a file or a device per worker must "
                "tell the two processes of a slot apart during recycling: use "
                "worker_info().lane. Last error"
            )
            self.event("retired_unreplaced", f"{reason}: {error}")
            self._outbox.log_later(logging.ERROR, "%s: %s", reason, error, exc_info=error)
            return
        if failures >= MAX_SETUP_FAILURES:
            broken = ModelSetupError(
                f"{name!r} failed to load {failures} times in a row; the pool stopped starting "
                f"workers (those already loaded keep serving). Last error: {error}"
            )
            broken.__cause__ = error.__cause__ or error
            self.broken = broken
            self.event("stopped_starting", str(broken))
            self._outbox.log_later(logging.ERROR, "%s", broken, exc_info=error)
            return
        delay = backoff(failures)
        self.respawn_at[index] = now + delay
        self._outbox.log_later(
            logging.WARNING,
            "%s (setup failure %d in a row; the pool stops starting workers after %d); "
            "starting another in %.1f s",
            error,
            failures,
            MAX_SETUP_FAILURES,
            delay,
            exc_info=error,
        )

    # ------------------------------------------------------------------ stopping

    def exited(
        self, worker: WorkerHandle, reason: str, kind: str, now: float, closing: bool
    ) -> None:
        """``worker``'s process is gone: forget it, record why, and schedule its slot's next
        worker when the slot still wants one. What becomes of its request is the
        supervisor's business."""
        assert self._held()
        if worker in self.workers:
            self.workers.remove(worker)
        self._last_exit[worker.index] = f"pid {worker.pid}: {reason}"
        self.exit_reasons[kind] += 1
        if closing or worker.index not in self.active:
            return
        if worker.state == STOPPING:  # stopped on purpose: a retired worker's slot reloads
            if worker.stop_unreplaced:  # alone, now that the old process is gone
                self.respawn_at.setdefault(worker.index, now)
        elif worker.state != STARTING and not self.replaced(worker):  # died while serving
            self.respawn_at.setdefault(worker.index, now)

    def retire(self, now: float) -> None:
        """Recycling: start a retiring worker's replacement, then stop it once that is ready."""
        assert self._held()
        for w in list(self.workers):
            if not w.retiring or w.state == STOPPING:
                continue
            if w.stop_unreplaced:  # its replacements kept failing: stop it once it is idle
                if w.state == IDLE:
                    self.stop(w, now)
                continue
            newer = [x for x in self.workers if x.index == w.index and x.generation > w.generation]
            if not newer and w.index not in self.respawn_at and self.broken is None:
                self.respawn_at[w.index] = now  # start the replacement first
            elif self.has_successor(w) and w.state == IDLE:
                self.stop(w, now)

    def check_memory(self, now: float) -> None:
        """Mark workers whose own memory passed ``max_memory_per_worker`` for recycling."""
        limit = self.settings.max_memory_per_worker
        if not limit or now < self.next_memory_check:
            return
        self.next_memory_check = now + MEMORY_CHECK_INTERVAL
        for w in self.workers:
            if w.state in (IDLE, BUSY) and not w.retiring:
                private = private_memory(w.pid)
                if private is not None and private > limit:
                    w.retiring = True

    def autoscale(self, now: float, waiting: int) -> None:
        """Grow while ``waiting`` requests wait and no worker is free; shrink after a quiet
        period. One step per call, one worker loading at a time, within [floor, workers]."""
        assert self._held()
        s = self.settings
        loading = any(w.state == STARTING for w in self.workers)
        if waiting and not loading and self.idle_worker() is None:
            if len(self.active) < s.workers and self.broken is None:
                index = min(set(range(s.workers)) - self.active)
                self.active.add(index)
                self.respawn_at[index] = now
                self.event("scale_up", f"{waiting} requests waiting, no worker free")
            return
        if waiting or len(self.active) <= s.floor:
            return
        for w in self.workers:
            if w.state == IDLE and now - w.idle_since >= s.scale_down_after:
                self.active.discard(w.index)
                self.stop(w, now)
                self.event("scale_down", f"worker {w.index} idle for {now - w.idle_since:.0f} s")
                return

    def stop(self, worker: WorkerHandle, now: float) -> None:
        """Ask ``worker`` to run teardown() and exit; it is killed after ``STOP_GRACE``."""
        worker.state = STOPPING
        worker.deadline = now + STOP_GRACE
        with contextlib.suppress(OSError):
            worker.channel.send((STOP, 0, None))

    def kill(self, worker: WorkerHandle, reason: str, kind: str = "killed") -> None:
        """SIGKILL ``worker``; its exit is handled by the state it died in. ``kind`` labels
        the exit in the metrics: ``"timeout"``, ``"shutdown"`` or ``"killed"``."""
        worker.kill_reason = reason
        worker.kill_kind = kind
        worker.deadline = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            worker.process.kill()
        if worker.users > 0:  # a caller blocked reading it must wake now, not at end of file
            worker.channel.wire.shutdown()

    def expire(self, now: float) -> None:
        """Kill workers past their setup or stop deadline."""
        for w in list(self.workers):
            if w.deadline is None or w.deadline > now:
                continue
            if w.state == STARTING:
                w.setup_error = ModelSetupError(
                    f"worker {w.index} (pid {w.pid}) of {self.settings.model_name!r} did not "
                    f"finish setup() within setup_timeout={self.settings.setup_timeout} s; it "
                    "was killed. Raise setup_timeout if loading is just slow."
                )
                self.kill(w, "killed by modelpool: setup() ran past setup_timeout", "timeout")
            elif w.state == STOPPING:
                self.kill(w, "killed by modelpool: teardown() did not finish in time", "timeout")

    # ------------------------------------------------------------------ reporting

    def event(self, kind: str, reason: str) -> None:
        self._events.append(
            {"time": time.time(), "event": kind, "workers": len(self.active), "reason": reason}
        )

    def events(self) -> list[dict[str, Any]]:
        return list(self._events)

    def restarts(self, index: int) -> int:
        return max(0, self._generation[index])

    def snapshot(self) -> tuple[list[Slot], list[tuple[WorkerHandle, dict[str, Any]]]]:
        """The facts ``worker_stats`` reports, read under the lock: the slots that should have
        a worker and have none right now (and why), and each live worker's."""
        live = {w.index for w in self.workers}
        slots = []
        for index in sorted(self.active - live):
            if index in self.respawn_at:  # due to start: for the first time, or again
                state = "restarting" if self._generation[index] >= 0 else "starting"
            else:
                state = "failed" if self.broken else "stopped"
            slots.append(Slot(index, self.restarts(index), state, self._last_exit[index]))
        workers = [
            (
                w,
                {
                    "state": "retiring" if w.retiring and w.state != STOPPING else w.state,
                    "busy_since": w.busy_since if w.state == BUSY else None,
                    "served": w.served,
                    "restarts": self.restarts(w.index),
                    "last_exit": self._last_exit[w.index],
                },
            )
            for w in self.workers
        ]
        return slots, workers

    def kill_all(self, lock: threading.Lock) -> list[Any]:
        """Kill and reap every worker (the loop has ended; call without the lock, which is
        taken per step); the requests they were running, for the caller to fail."""
        with lock:
            workers = list(self.workers)
        running = []
        for w in workers:
            if w.request is not None:
                running.append(w.request)
            with contextlib.suppress(Exception):
                w.process.kill()
        for w in workers:
            with contextlib.suppress(Exception):
                w.process.join(5.0)
            with contextlib.suppress(Exception):
                w.lifeline.close()
            with lock:
                w.exited = True
                if w.users <= 0:
                    with contextlib.suppress(Exception):
                        w.channel.close()
                else:
                    w.channel.wire.shutdown()
        return running


def worker_stats(
    snapshot: tuple[list[Slot], list[tuple[WorkerHandle, dict[str, Any]]]], now: float
) -> list[WorkerStats]:
    """``Pool.stats()``'s workers from a ``Fleet.snapshot()`` (memory is read here, unlocked)."""
    slots, workers = snapshot
    out = [
        WorkerStats(s.index, s.restarts, None, s.state, 0, s.restarts, s.last_exit, None)
        for s in slots
    ]
    for w, facts in workers:
        busy_since = facts["busy_since"]
        out.append(
            WorkerStats(
                index=w.index,
                generation=w.generation,
                pid=w.pid,
                state=facts["state"],
                served=facts["served"],
                restarts=facts["restarts"],
                last_exit=facts["last_exit"],
                rss=rss(w.pid),
                busy_for=None if busy_since is None else now - busy_since,
            )
        )
    return sorted(out, key=lambda s: (s.index, s.generation))


def exit_kind(worker: WorkerHandle, signame: str | None, exitcode: int | None) -> str:
    """A short label for why a worker exited (metrics count these)."""
    if worker.kill_reason is not None:
        return worker.kill_kind
    if worker.state == STOPPING:
        return "recycled" if worker.retiring else "stopped"
    if worker.state == STARTING:
        return "setup_failed"
    return signame or f"exit_{exitcode}"
