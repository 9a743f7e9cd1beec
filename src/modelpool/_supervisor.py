"""The parent side: start workers, hand them requests, watch them, replace them, reap them.

One thread (``modelpool-supervisor``) owns the workers' life cycle. It sleeps in ``epoll`` on
every worker's connection and process sentinel plus a wake-up pipe, with a timeout set to the
next deadline; it never polls. Callers hand a request straight to an idle worker from their own
thread (the fast path); otherwise the request queues and the supervisor dispatches it when a
worker frees up. Each worker runs one request at a time, so every request has exactly one owner:
when a worker dies, only its own request fails (or is retried).

All processes are started from the supervisor thread: PR_SET_PDEATHSIG fires when the thread that
forked a child exits, so children must come from a thread that lives as long as the pool.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import errno
import heapq
import itertools
import logging
import os
import random
import selectors
import threading
import time
from collections.abc import Callable
from multiprocessing.context import BaseContext
from typing import Any

from . import _batching, _transport
from ._exceptions import (
    ModelpoolError,
    ModelSetupError,
    PoolClosedError,
    PoolOverloadedError,
    RequestTimeoutError,
    TransportError,
    UnsafeForkError,
    WorkerCrashedError,
)
from ._handle import (
    BUSY,
    IDLE,
    STARTING,
    STOPPING,
    WorkerHandle,
    WorkerStats,
    describe_exit,
    launch,
    private_memory,
    rss,
)
from ._hygiene import THREAD_PREFIX, derive_seed, fork_hazards, import_path
from ._worker import ERR, OK, PREDICT, PREDICT_TAGGED, READY, SETUP_FAILED, STOP, WorkerSpec

__all__ = ["PoolSettings", "Request", "Supervisor", "WorkerStats", "describe_exit"]

#: Setup failures (with the worker's traceback), and what the pool does about them.
log = logging.getLogger("modelpool.pool")


#: Setup failures in a row (no worker became ready in between) after which the pool stops
#: respawning and fails requests fast.
MAX_SETUP_FAILURES = 3
#: Seconds a worker gets to run teardown() and exit before it is killed.
STOP_GRACE = 10.0
#: Seconds between RSS checks when max_memory_per_worker is set.
MEMORY_CHECK_INTERVAL = 1.0


@dataclasses.dataclass(frozen=True)
class PoolSettings:
    """Resolved, validated settings the supervisor runs with."""

    model_ref: str | None
    model_name: str
    options: dict[str, Any]
    workers: int
    threads: int
    env: dict[str, str]
    seed: int
    timeout: float | None
    setup_timeout: float | None
    max_requests_per_worker: int | None
    max_memory_per_worker: int | None
    retries: int
    drain_timeout: float | None
    initializer: tuple[Any, tuple[Any, ...]] | None = None
    max_batch_size: int = 1
    max_batch_delay: float = 0.0
    max_queue: int | None = None
    min_workers: int = 0  # 0: the same as ``workers`` (no autoscaling)
    load_concurrency: int | None = None
    scale_down_after: float = 30.0
    devices: tuple[dict[str, str], ...] = ()  # worker i gets the variables devices[i % n]

    @property
    def floor(self) -> int:
        """Workers kept running at all times (``workers`` is the most there can be)."""
        return self.min_workers or self.workers


class Request:
    """One unit of work: a predict or a function call, with its future and deadline.

    The future is made on first use: a blocking call answered on the fast path never needs
    one (it costs a Condition and an RLock). Made under a lock, so the caller thread and the
    supervisor thread always share the same one.
    """

    __slots__ = (
        "_future",
        "arrival",
        "attempts",
        "batch",
        "counted",
        "deadline",
        "frame",
        "id",
        "inputs",
        "rows",
        "signature",
        "tag",
        "worker",
    )
    _make_lock = threading.Lock()

    def __init__(self, rid: int, deadline: float | None, arrival: float = 0.0) -> None:
        self.id = rid
        self.frame = _transport.Encoded(b"", [])
        self.deadline = deadline
        self._future: cf.Future[Any] | None = None
        self.attempts = 0
        self.worker: WorkerHandle | None = None
        # batching: the inputs to merge (None = send ``frame`` as it is), what the batcher reads
        self.inputs: Any = None
        self.arrival = arrival
        self.rows = 1
        self.signature: _batching.Signature | None = None
        self.batch: Batch | None = None  # the batch this request runs in
        self.tag: str | None = None  # the caller's request id, carried to the worker
        self.counted = True  # False: not a served request (a readiness probe)

    @property
    def members(self) -> tuple[Request, ...]:
        """The requests whose answers this one carries (itself, or a batch's members)."""
        return (self,)

    @property
    def future(self) -> cf.Future[Any]:
        future = self._future
        if future is None:
            with Request._make_lock:
                future = self._future
                if future is None:
                    future = self._future = cf.Future()
        return future


class Batch(Request):
    """Requests run together as one predict; the answer is split back per member."""

    __slots__ = ("parts",)

    def __init__(self, rid: int, parts: list[Request]) -> None:
        super().__init__(rid, None)
        self.parts = parts

    @property
    def members(self) -> tuple[Request, ...]:
        return tuple(self.parts)


class Supervisor:
    """Owns the workers and the queue. Thread-safe; see the module docstring."""

    def __init__(self, settings: PoolSettings, ctx: BaseContext) -> None:
        self.settings = settings
        self._ctx = ctx
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._selector = selectors.DefaultSelector()  # its epoll fd is made lazily, at start
        self._wake_r = self._wake_w = -1
        self._workers: list[WorkerHandle] = []
        self._generation = [-1] * settings.workers
        self._active: set[int] = set(range(settings.floor))  # slots that should have a worker
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)
        self._last_exit: list[str | None] = [None] * settings.workers
        self._exit_reasons: collections.Counter[str] = collections.Counter()
        self._batch_sizes: collections.Counter[int] = collections.Counter()
        self._respawn_at: dict[int, float] = {}
        self._queue: collections.deque[Request] = collections.deque()
        self._deadlines: list[tuple[float, int]] = []  # (deadline, request id), lazily pruned
        self._timed: dict[int, Request] = {}  # unsettled requests that have a deadline
        self._settle: list[tuple[Request, BaseException]] = []  # failures to report unlocked
        self._logs: list[tuple[int, str, tuple[object, ...], BaseException | None]] = []
        self._close_requested = False
        self._ids = itertools.count(1)
        self._setup_failures = 0  # in a row
        self.failure_seq = 0  # setup failures ever; start() raises on one newer than its call
        self._last_setup_error: ModelSetupError | None = None
        self._broken: ModelpoolError | None = None
        self._closing = False
        self._force = False
        self._drain_until: float | None = None
        self._next_memory_check = 0.0
        self._thread = threading.Thread(
            target=self._run, name=f"{THREAD_PREFIX}supervisor", daemon=True
        )
        self._crash: BaseException | None = None
        self._done = threading.Event()
        self._batching = settings.max_batch_size > 1
        self._batch_due: float | None = None  # when the batcher wants to look again
        # (batching pools) rows of every request in the queue, settled ones included until
        # dropped: a hint for waking up on a full batch (too high costs a spurious wake-up)
        self._rows_queued = 0
        self.on_done: Callable[[Supervisor], object] | None = None

    # ------------------------------------------------------------------ caller-facing

    def start(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        for index in sorted(self._active):
            self._respawn_at[index] = 0.0
        self._thread.start()

    def wait_ready(self, since: int) -> None:
        """Block until every worker finished setup(); raise ModelSetupError if a setup fails
        after failure number ``since`` (see ``failure_seq``)."""
        with self._changed:
            while True:
                error = self._broken or self._crash
                if error is None and self.failure_seq > since:
                    error = self._last_setup_error
                if error is not None:
                    raise _fresh(error)
                if self._closing:
                    raise PoolClosedError("the pool was shut down while it was starting")
                ready = sum(1 for w in self._workers if w.state in (IDLE, BUSY))
                if ready >= self.settings.floor:
                    return
                self._changed.wait()

    def new_request(self, timeout: float | None) -> Request:
        """A request whose deadline counts from now; set its ``frame`` before ``submit``."""
        now = time.monotonic()
        return Request(next(self._ids), None if timeout is None else now + timeout, now)

    def submit(self, req: Request) -> None:
        """Queue ``req`` or hand it to an idle worker now; its future gets the answer."""
        worker = self._admit(req, direct=False)
        if worker is not None:
            self._send(worker, req)

    def call(self, req: Request) -> Any:
        """Run ``req`` and return its answer, blocking. The fast path: when a worker is idle,
        this thread sends the request and reads the answer itself (no thread handoff)."""
        worker = self._admit(req, direct=True)
        if worker is None:
            return req.future.result()
        kind, payload, answered = ERR, None, False
        try:
            if req.frame.buffers:
                worker.channel.send_encoded(req.frame)
            else:
                worker.channel.send_small(req.frame.body)
            kind, rid, payload = worker.channel.recv()
            answered = True
            if rid not in (req.id, 0):
                raise _transport.ProtocolError(
                    f"worker pid {worker.pid} sent the answer to request {rid} for request "
                    f"{req.id}: the pool and its worker are out of step, which is a bug in "
                    "modelpool (please report it). The worker was replaced; retry the call."
                )
        except _transport.PlacementError:
            # nothing was sent: the worker is fine, the request fails with the reason
            with self._lock:
                if worker.request is req:
                    worker.request = None
                    worker.state = IDLE
                self._release_channel(worker)
            self._timed.pop(req.id, None)
            self._wake()
            raise
        except _transport.DecodeError as exc:
            kind, payload, answered = ERR, exc.remote, True
        except Exception as exc:
            if not _peer_gone(exc):  # a local failure (no memory, no descriptors...) or a bug
                error = _transport_error(exc, worker)
                self._abandon(worker, req, error, "a local error while talking to it")
                raise error from error.__cause__
            # the worker died (or was killed): the supervisor settles the request
        except BaseException as exc:  # interrupted mid-exchange (Ctrl+C): out of step
            self._abandon(worker, req, exc, "its caller was interrupted")
            raise
        follow = None
        with self._lock:
            mine = answered and worker.request is req and worker.kill_reason is None
            if mine:
                self._complete(worker)
                self._timed.pop(req.id, None)
                follow = self._dispatch_to(worker)
            self._release_channel(worker)
            wake = worker.retiring or self._closing
        if not mine:  # timed out or crashed meanwhile: the supervisor decided
            return req.future.result()
        if follow is not None:
            self._send(worker, follow)
        if wake:
            self._wake()
        if kind == OK:
            return payload
        assert isinstance(payload, _transport.RemoteException)
        raise payload.rebuild()

    def _abandon(self, worker: WorkerHandle, req: Request, exc: BaseException, why: str) -> None:
        """A caller gives up on ``worker`` mid-exchange: the stream may be out of step, so the
        worker is killed and replaced, and the request fails with ``exc``."""
        with self._lock:
            if worker.request is req:
                worker.request = None
                self._kill(worker, f"killed by modelpool: {why}")
            self._release_channel(worker)
        self._fail(req, exc)
        self._wake()

    def _release_channel(self, worker: WorkerHandle) -> None:
        """A thread is done with ``worker``'s connection (lock held)."""
        worker.users -= 1
        if worker.users <= 0:
            worker.reader_active = False
            if worker.exited:  # _on_exit left the channel open for us
                worker.channel.close()

    def _hold_channel(self, worker: WorkerHandle) -> None:
        """This thread will write (or read) ``worker``'s connection outside the lock."""
        worker.users += 1

    def _admit(self, req: Request, *, direct: bool) -> WorkerHandle | None:
        """Take ``req`` in: assign it to an idle worker (returned) or queue it."""
        wake = False
        with self._lock:
            if self._crash is not None:
                raise _fresh(self._crash)
            if self._closing:
                raise PoolClosedError(
                    f"pool of {self.settings.model_name!r} is shut down; create a new Pool"
                )
            if self._broken is not None and not self._capacity():
                raise _fresh(self._broken)
            limit = self.settings.max_queue
            if limit is not None and len(self._queue) >= limit:
                self._drop_settled()
                if len(self._queue) >= limit:
                    raise PoolOverloadedError(
                        f"pool of {self.settings.model_name!r} is overloaded: {len(self._queue)}"
                        f" requests are already waiting (max_queue={limit}). Retry later, add "
                        "workers, or raise max_queue."
                    )
            worker = None if self._batching else self._idle_worker()
            if worker is not None:
                if direct:
                    self._watch(worker, False)
                    worker.reader_active = True
                else:
                    req.future.set_running_or_notify_cancel()  # new: cannot be cancelled yet
                self._assign(worker, req)
                self._hold_channel(worker)
            else:
                queue = self._queue
                while queue and queue[0].future.done():  # settled at the head: not in line
                    self._rows_queued -= queue.popleft().rows
                queue.append(req)
                self._rows_queued += req.rows
                wake = self._must_look(req)
            if req.deadline is not None:
                self._timed[req.id] = req
                heapq.heappush(self._deadlines, (req.deadline, req.id))
                if self._deadlines[0][1] == req.id:
                    wake = True
        if wake:
            self._wake()
        return worker

    def close(self, *, cancel_futures: bool, force: bool) -> None:
        with self._lock:
            if not self._closing:
                self._closing = True
                if self.settings.drain_timeout is not None:
                    self._drain_until = time.monotonic() + self.settings.drain_timeout
            if force:
                self._force = True
            cancelled = []
            if cancel_futures or force:
                cancelled = list(self._queue)
                self._queue.clear()
                self._rows_queued = 0
        for req in cancelled:  # outside the lock: cancel() runs done-callbacks
            if not req.future.cancel():
                self._fail(req, PoolClosedError("the pool was shut down"))
        self._wake()  # (not guarded by is_alive(): an interrupted join() can make it lie)

    def close_soon(self) -> None:
        """Ask the supervisor thread to close (safe from a finalizer, in any thread, at any
        moment: it only sets a flag and wakes the loop)."""
        self._close_requested = True
        self._wake()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the supervisor to finish; True when it has (or never started)."""
        if self._thread.ident is None:
            return True
        return self._done.wait(timeout)

    def stats(self) -> list[WorkerStats]:
        with self._lock:
            workers = list(self._workers)
            last_exit = list(self._last_exit)
            generations = list(self._generation)
            pending = set(self._respawn_at)
            broken = self._broken is not None
            active = set(self._active)
        out = []
        now = time.monotonic()
        live = {w.index for w in workers}
        for index in sorted(active):
            if index not in live:  # a slot with no process right now: say why
                state = "restarting" if index in pending else "failed" if broken else "stopped"
                out.append(
                    WorkerStats(
                        index,
                        max(0, generations[index]),
                        None,
                        state,
                        0,
                        max(0, generations[index]),
                        last_exit[index],
                        None,
                    )
                )
        for w in workers:
            out.append(
                WorkerStats(
                    index=w.index,
                    generation=w.generation,
                    pid=w.pid,
                    state="retiring" if w.retiring and w.state != STOPPING else w.state,
                    served=w.served,
                    restarts=max(0, generations[w.index]),
                    last_exit=last_exit[w.index],
                    rss=rss(w.pid),
                    busy_for=now - w.busy_since if w.state == BUSY else None,
                )
            )
        return sorted(out, key=lambda s: (s.index, s.generation))

    def telemetry(self) -> dict[str, dict[Any, int]]:
        """Totals since start: worker exits by kind, and batches by rows (batching only)."""
        with self._lock:
            return {
                "exit_reasons": dict(self._exit_reasons),
                "batch_sizes": dict(sorted(self._batch_sizes.items())),
            }

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "queued": sum(1 for r in self._queue if not r.future.done()),
                "in_flight": sum(1 for w in self._workers if w.request is not None),
            }

    # ------------------------------------------------------------------ internals (locked)

    def _idle_worker(self) -> WorkerHandle | None:
        """The idle worker that has served least (spreads load and recycling evenly)."""
        best = None
        for w in self._workers:
            usable = w.state == IDLE and not (w.retiring and self._has_successor(w))
            if usable and (best is None or w.served < best.served):
                best = w
        return best

    def _must_look(self, req: Request) -> bool:
        """Whether the supervisor must look at the queue now that ``req`` joined it (lock held).

        Settled requests (cancelled, timed out, a client that hung up) must never stand in for
        a live head: ``_admit`` drops them from the head of the queue before this is asked, and
        every dispatch drops them all, so the queue's head is always one the supervisor saw.
        """
        if len(self._queue) == 1:  # the first live one in line (settled heads were dropped)
            return True  # start a batch timer; a worker may be starting, or the pool scale up
        # Behind a live head the supervisor already knows of: its batch timer, or a worker's
        # answer, brings it back. Only a full batch is worth waking it early for.
        return self._batching and self._rows_queued >= self.settings.max_batch_size

    def _drop_settled(self) -> None:
        """Remove cancelled or timed-out requests from the queue (lock held)."""
        if any(r.future.done() for r in self._queue):
            self._queue = collections.deque(r for r in self._queue if not r.future.done())
            self._rows_queued = sum(r.rows for r in self._queue)

    def _capacity(self) -> bool:
        """Some worker is loaded (or loading) and able to serve."""
        return any(w.state in (IDLE, BUSY, STARTING) and not w.kill_reason for w in self._workers)

    def _assign(self, worker: WorkerHandle, req: Request) -> None:
        worker.state = BUSY
        worker.request = req
        worker.busy_since = time.monotonic()
        req.worker = worker
        for member in req.members:
            member.attempts += 1
            member.worker = worker

    def _fail(self, req: Request, exc: BaseException) -> None:
        """Fail ``req`` now. Never call with the lock held: done-callbacks run here, and one
        may call back into the pool (use ``_fail_later``)."""
        self._timed.pop(req.id, None)
        future = req.future
        if future.done():
            return
        with contextlib.suppress(cf.InvalidStateError, RuntimeError):  # settled meanwhile
            if future.running() or future.set_running_or_notify_cancel():
                future.set_exception(exc)

    def _fail_later(self, req: Request, exc: BaseException) -> None:
        """Fail ``req`` once the lock is released (lock held; see ``_settle_pending``)."""
        self._timed.pop(req.id, None)
        self._settle.append((req, exc))

    def _settle_pending(self) -> None:
        """Report the failures (and write the log records) decided under the lock (call
        without the lock)."""
        while self._settle:
            req, exc = self._settle.pop(0)
            self._fail(req, exc)
        while self._logs:
            level, message, args, exc_info = self._logs.pop(0)
            log.log(level, message, *args, exc_info=exc_info)

    def _log_later(
        self, level: int, message: str, *args: object, exc_info: BaseException | None = None
    ) -> None:
        """Log once the lock is released (lock held): formatting a traceback or a blocking
        write to stderr must not hold up every caller, and a handler may call the pool."""
        self._logs.append((level, message, args, exc_info))

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def _send(self, worker: WorkerHandle, req: Request) -> None:
        if isinstance(req, Batch):
            try:  # merging copies rows: done here, outside the lock
                merged = _batching.merge([part.inputs for part in req.parts])
                tags = [part.tag for part in req.parts if part.tag is not None]
                message = (PREDICT_TAGGED, req.id, (",".join(tags), merged)) if tags else None
                req.frame = _transport.encode(message or (PREDICT, req.id, merged))
            except BaseException as exc:
                with self._lock:
                    if worker.request is req:
                        self._complete(worker)
                for part in req.parts:
                    self._fail(part, exc)
                self._wake()
                return
        try:
            with self._lock:
                if worker.request is not req or worker.kill_reason is not None:
                    return  # settled meanwhile (timed out, crashed): nothing to send
                self._watch(worker, True)
            worker.channel.send_encoded(req.frame)
        except _transport.PlacementError as exc:  # nothing was sent; the worker is fine
            with self._lock:
                if worker.request is req:
                    worker.request = None
                    worker.state = IDLE
            for member in req.members:
                self._fail(member, exc)
            self._wake()
        except BaseException as exc:
            if isinstance(exc, Exception) and _peer_gone(exc):
                return  # the worker died; its sentinel will tell the supervisor
            # a local failure or an interruption mid-write: the stream may be out of step
            with self._lock:
                if worker.request is req:
                    worker.request = None
                    self._kill(worker, "killed by modelpool: sending to it failed")
            error = _transport_error(exc, worker) if isinstance(exc, Exception) else exc
            for member in req.members:
                self._fail(member, error)
            self._wake()
            if not isinstance(exc, Exception):
                raise
        finally:
            with self._lock:
                self._release_channel(worker)

    def _watch(self, worker: WorkerHandle, on: bool) -> None:
        """(Un)register ``worker``'s connection with the selector (caller holds the lock)."""
        if worker.watched == on or (on and (worker.kill_reason or worker.exited)):
            return
        if on:
            self._selector.register(worker.channel.fileno(), selectors.EVENT_READ, ("conn", worker))
        else:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(worker.channel.fileno())
        worker.watched = on

    def _complete(self, worker: WorkerHandle) -> None:
        """``worker`` answered its request (caller holds the lock)."""
        if worker.request is None or worker.request.counted:
            worker.served += 1
        worker.request = None
        if worker.state == BUSY:
            worker.state = IDLE
            worker.idle_since = time.monotonic()
        if worker.limit is not None and worker.served >= worker.limit:
            worker.retiring = True

    def _dispatch_to(self, worker: WorkerHandle) -> Request | None:
        """Give ``worker`` (just freed) the oldest queued request, if any (lock held)."""
        if self._batching:
            return None  # the supervisor forms batches
        while (
            self._queue
            and worker.state == IDLE
            and not (worker.retiring and self._has_successor(worker))
        ):
            req = self._queue.popleft()
            if not (req.future.running() or req.future.set_running_or_notify_cancel()):
                continue  # cancelled while queued
            self._assign(worker, req)
            self._hold_channel(worker)
            return req
        return None

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            while True:
                timeout = self._tick()
                if timeout is None:
                    break
                for key, _ in self._selector.select(timeout):
                    if key.data is None:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                    else:
                        what, worker = key.data
                        if what == "conn":
                            self._on_message(worker)
                        else:
                            self._on_exit(worker)
        except BaseException as exc:  # a bug in modelpool: fail loudly, never hang callers
            error = RuntimeError(f"modelpool supervisor thread crashed: {exc!r}")
            error.__cause__ = exc
            with self._changed:
                self._crash = error
                self._closing = True
                self._force = True
                self._fail_everything(error)
                self._changed.notify_all()
            self._settle_pending()
        finally:
            self._kill_all()
            self._cleanup()
            self._done.set()
            if self.on_done is not None:
                self.on_done(self)

    def _tick(self) -> float | None:
        """Housekeeping; returns the select timeout, or None when the loop should end."""
        if self._close_requested and not self._closing:
            self.close(cancel_futures=True, force=False)  # asked by a finalizer
        now = time.monotonic()
        to_send: list[tuple[WorkerHandle, Request]] = []
        with self._changed:
            self._expire(now)
            finished = False
            if self._closing:
                finished = self._shutdown_step(now)
            else:
                self._respawn(now)
                self._retire(now)
                if self.settings.max_memory_per_worker and now >= self._next_memory_check:
                    self._check_memory()
                    self._next_memory_check = now + MEMORY_CHECK_INTERVAL
            if not finished:
                to_send = self._dispatch()
            if not self._closing and self.settings.floor < self.settings.workers:
                # after dispatch: a worker that just loaded is busy now, not idle, so requests
                # still waiting make the pool grow again (before, it grew one step per answer)
                self._autoscale(now)
            wake_at = self._next_wake()
            self._changed.notify_all()
        self._settle_pending()  # failures decided above, reported now that the lock is free
        if finished:
            return None
        for worker, req in to_send:
            self._send(worker, req)
        if wake_at is None:
            return 3600.0  # nothing scheduled: sleep until an event
        return max(0.0, wake_at - time.monotonic())

    def _next_wake(self) -> float | None:
        times = [w.deadline for w in self._workers if w.deadline is not None]
        if self._deadlines:
            times.append(self._deadlines[0][0])
        if not self._loading_full():  # else a READY (or an exit) wakes us
            times.extend(self._respawn_at.values())
        if self.settings.floor < self.settings.workers and len(self._active) > self.settings.floor:
            idle = [w.idle_since for w in self._workers if w.state == IDLE]
            if idle:
                times.append(min(idle) + self.settings.scale_down_after)
        if self.settings.max_memory_per_worker:
            times.append(self._next_memory_check)
        if self._batch_due is not None:
            times.append(self._batch_due)
        if self._closing and self._drain_until is not None:
            times.append(self._drain_until)
        return min(times) if times else None

    def _dispatch(self) -> list[tuple[WorkerHandle, Request]]:
        if self._batching:
            return self._dispatch_batches(time.monotonic())
        out = []
        while self._queue:
            if self._queue[0].future.done():
                self._queue.popleft()
                continue
            worker = self._idle_worker()
            if worker is None:
                break
            req = self._queue.popleft()
            if not (req.future.running() or req.future.set_running_or_notify_cancel()):
                continue  # cancelled while queued
            self._assign(worker, req)
            self._hold_channel(worker)
            out.append((worker, req))
        return out

    def _dispatch_batches(self, now: float) -> list[tuple[WorkerHandle, Request]]:
        """Form batches for idle workers (lock held); see ``_batching``."""
        out: list[tuple[WorkerHandle, Request]] = []
        self._batch_due = None
        self._drop_settled()  # abandoned requests neither head a batch nor count towards one
        while self._queue:
            worker = self._idle_worker()
            if worker is None:
                break
            chosen, due = _batching.select(
                self._queue,
                now,
                self.settings.max_batch_size,
                self.settings.max_batch_delay,
                is_live=lambda r: not r.future.done(),
            )
            if not chosen:
                self._batch_due = due
                break
            picked = {id(r) for r in chosen}
            self._queue = collections.deque(
                r for r in self._queue if id(r) not in picked and not r.future.done()
            )
            parts = [
                r for r in chosen if r.future.running() or r.future.set_running_or_notify_cancel()
            ]
            if not parts:
                continue  # all cancelled meanwhile
            if len(parts) == 1 and parts[0].inputs is None:
                unit: Request = parts[0]  # not batchable (a function call, odd inputs)
            else:
                unit = Batch(next(self._ids), parts)
                for part in parts:
                    part.batch = unit
                self._batch_sizes[sum(part.rows for part in parts)] += 1
            self._assign(worker, unit)
            self._hold_channel(worker)
            out.append((worker, unit))
        self._rows_queued = sum(r.rows for r in self._queue)
        return out

    def _expire(self, now: float) -> None:
        if len(self._deadlines) > 64 + 2 * len(self._timed):  # mostly settled: compact
            snapshot = list(self._timed.items())  # one C call: callers pop from it unlocked
            self._deadlines = [(r.deadline or 0.0, i) for i, r in snapshot]
            heapq.heapify(self._deadlines)
        while self._deadlines and self._deadlines[0][0] <= now:
            _, rid = heapq.heappop(self._deadlines)
            req = self._timed.pop(rid, None)
            if req is None or req.future.done():
                continue  # settled already
            limit = f"model {self.settings.model_name!r}"
            worker = req.worker
            batch = req.batch
            running = worker is not None and (
                worker.request is req or (batch is not None and worker.request is batch)
            )
            if running and batch is not None and len(batch.parts) > 1:
                assert worker is not None
                # in a running batch: this request fails alone; the worker is killed only
                # when no member still waits for the answer
                self._fail_later(
                    req,
                    RequestTimeoutError(
                        f"request to {limit} timed out while running in a batch of "
                        f"{len(batch.parts)} requests in worker pid {worker.pid}. Raise the "
                        "timeout if the model is just slow."
                    ),
                )
                failing = {id(r) for r, _ in self._settle}  # decided, reported after the lock
                if all(p.future.done() or id(p) in failing for p in batch.parts):
                    worker.request = None
                    self._kill(
                        worker, "killed by modelpool: a batch ran past its timeout", "timeout"
                    )
            elif not running:
                with contextlib.suppress(ValueError):
                    self._queue.remove(req)
                    self._rows_queued -= req.rows
                loading = sum(1 for w in self._workers if w.state == STARTING)
                busy = sum(1 for w in self._workers if w.state == BUSY)
                self._fail_later(
                    req,
                    RequestTimeoutError(
                        f"request to {limit} timed out while waiting for a free worker "
                        f"({busy} busy, {loading} still loading the model); it was never run. "
                        "Add workers, or raise the timeout."
                    ),
                )
            else:
                assert worker is not None  # running
                self._fail_later(
                    req,
                    RequestTimeoutError(
                        f"request to {limit} timed out while running in worker pid "
                        f"{worker.pid}; the worker was killed and is being replaced. Raise the "
                        "timeout if the model is just slow."
                    ),
                )
                worker.request = None
                self._kill(worker, "killed by modelpool: a request ran past its timeout", "timeout")
        for w in list(self._workers):
            if w.deadline is None or w.deadline > now:
                continue
            if w.state == STARTING:
                w.setup_error = ModelSetupError(
                    f"worker {w.index} (pid {w.pid}) of {self.settings.model_name!r} did not "
                    f"finish setup() within setup_timeout={self.settings.setup_timeout} s; it "
                    "was killed. Raise setup_timeout if loading is just slow."
                )
                self._kill(w, "killed by modelpool: setup() ran past setup_timeout", "timeout")
            elif w.state == STOPPING:
                self._kill(w, "killed by modelpool: teardown() did not finish in time", "timeout")

    def _respawn(self, now: float) -> None:
        if self._broken is not None:
            self._respawn_at.clear()
            if not self._capacity():
                self._fail_everything(self._broken)
            return
        for index, when in sorted(self._respawn_at.items()):
            if index not in self._active:
                del self._respawn_at[index]  # scaled away meanwhile
                continue
            if when <= now:
                if self._loading_full():
                    break  # load one at a time (load_concurrency): the next READY resumes us
                del self._respawn_at[index]
                if self._ctx.get_start_method() == "fork":
                    hazards = fork_hazards()
                    if hazards:  # the parent changed since start(): forking now would break
                        self._broken = UnsafeForkError(
                            f"cannot start a replacement worker for {self.settings.model_name!r}"
                            " with start_method='fork': " + "; ".join(hazards) + ". Use the "
                            "default start method (forkserver) for a pool that must heal."
                        )
                        return
                try:
                    self._spawn(index)
                except Exception as exc:  # e.g. EAGAIN from fork, EMFILE: retry with backoff
                    self._generation[index] -= 1
                    error = ModelSetupError(
                        f"could not start a worker process for {self.settings.model_name!r}: "
                        f"{type(exc).__name__}: {exc}"
                    )
                    error.__cause__ = exc
                    self._count_setup_failure(index, error, now)

    def _spawn(self, index: int) -> None:
        s = self.settings
        self._generation[index] += 1
        generation = self._generation[index]
        lanes = {w.lane for w in self._workers if w.index == index}  # alive: e.g. retiring
        lane = min(set(range(len(lanes) + 1)) - lanes)
        spec = WorkerSpec(
            model_ref=s.model_ref,
            model_name=s.model_name,
            options=s.options,
            index=index,
            generation=generation,
            seed=derive_seed(s.seed, index, generation),
            threads=s.threads,
            # the parent's whole environment now, as spawn would give it (a fork server keeps
            # the one it started with), with the thread limits on top
            env={
                **os.environ,
                **s.env,
                **(s.devices[index % len(s.devices)] if s.devices else {}),
            },
            initializer=s.initializer,
            lane=lane,
            sys_path=import_path(),
        )
        worker = launch(self._ctx, spec)
        if s.setup_timeout is not None:
            worker.deadline = time.monotonic() + s.setup_timeout
        if s.max_requests_per_worker:
            jitter = random.randint(0, max(0, s.max_requests_per_worker // 10))
            worker.limit = s.max_requests_per_worker + jitter
        self._workers.append(worker)
        self._watch(worker, True)  # for its READY (or why it could not start)
        self._selector.register(worker.process.sentinel, selectors.EVENT_READ, ("exit", worker))

    def _on_message(self, worker: WorkerHandle) -> bool:
        """Handle one message from ``worker``; False when there is nothing for us to read."""
        with self._lock:
            if not worker.watched or worker.reader_active or worker.channel.wire.fd < 0:
                return False  # a stale event: a calling thread owns this connection now
        try:
            message = worker.channel.recv(block=False)  # never hang on a half-sent message
            if message is None:
                return False  # incomplete: the rest arrives with a later event
            kind, rid, payload = message
        except (EOFError, OSError):
            with self._lock:
                self._watch(worker, False)
            return False  # the exit sentinel follows; _on_exit handles it
        except _transport.DecodeError as exc:
            kind, rid, payload = ERR, 0, exc.remote
        current = worker.request
        if kind in (OK, ERR) and current is not None and rid not in (current.id, 0):
            with self._lock:  # not the answer to this request: out of step, a bug
                self._kill(worker, f"killed by modelpool: answer {rid} to request {current.id}")
            return False
        with self._changed:
            if worker.kill_reason is not None:
                return True  # being killed: a late answer (its request already failed) is dropped
            if kind == READY:
                worker.state = IDLE
                worker.idle_since = time.monotonic()
                worker.deadline = None
                worker.pid = payload
                self._watch(worker, False)
                self._setup_failures = 0
                self._changed.notify_all()
                return True
            if kind == SETUP_FAILED:
                cause = payload.rebuild()
                error = ModelSetupError(
                    f"setup of {self.settings.model_name!r} failed in worker {worker.index} "
                    f"(pid {worker.pid}): {type(cause).__name__}: {cause}"
                )
                error.__cause__ = cause
                worker.setup_error = error
                return True
            req = worker.request
            self._complete(worker)
            if req is not None:
                for member in req.members:
                    self._timed.pop(member.id, None)
        if isinstance(req, Batch):
            self._deliver_batch(req, kind, payload)
        elif req is not None:
            if kind == OK:
                with contextlib.suppress(cf.InvalidStateError):
                    req.future.set_result(payload)
            else:
                self._fail(req, payload.rebuild())
        return True

    def _deliver_batch(self, batch: Batch, kind: int, payload: Any) -> None:
        for part in batch.parts:  # the batch is over: break the part <-> batch cycle, so
            part.batch = None  # its requests are freed now, not by a garbage-collector pause
        if kind != OK:
            for part in batch.parts:
                self._fail(part, payload.rebuild())  # a fresh exception for each caller
            return
        try:
            answers = _batching.split(
                payload, [part.rows for part in batch.parts], self.settings.model_name
            )
        except _batching.BatchError as exc:
            for part in batch.parts:
                self._fail(part, _batching.BatchError(*exc.args))
            return
        for part, answer in zip(batch.parts, answers, strict=True):
            with contextlib.suppress(cf.InvalidStateError):  # cancelled: answer dropped
                part.future.set_result(answer)

    def _on_exit(self, worker: WorkerHandle) -> None:
        worker.process.join(1.0)
        exitcode = worker.process.exitcode
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(worker.process.sentinel)
        # a message may still sit in the pipe (a result or a setup error written just before
        # the exit): read it first so nothing is lost
        with contextlib.suppress(OSError, EOFError):
            while worker.channel.readable() and self._on_message(worker):
                pass
        what, signame, likely = describe_exit(exitcode)
        now = time.monotonic()
        with self._changed:
            if worker in self._workers:
                self._workers.remove(worker)
            self._watch(worker, False)
            worker.exited = True
            if worker.users <= 0:
                worker.channel.close()
            else:  # a caller thread holds it: wake it (a process the model forked may keep
                worker.channel.wire.shutdown()  # the socket open) and let it close the channel
            with contextlib.suppress(OSError):
                worker.lifeline.close()
            if worker.process.exitcode is not None:
                with contextlib.suppress(ValueError):
                    worker.process.close()
            reason = worker.kill_reason or what
            self._last_exit[worker.index] = f"pid {worker.pid}: {reason}"
            self._exit_reasons[_exit_kind(worker, signame, exitcode)] += 1
            if worker.state == STARTING:
                self._setup_failed(worker, what, likely, now)
            elif worker.state != STOPPING:  # died, or killed for a timeout, while serving
                self._crashed(worker, what, signame, likely, exitcode, now)
            elif worker.stop_unreplaced and not self._closing and worker.index in self._active:
                self._respawn_at.setdefault(worker.index, now)  # the slot loads again, alone
            self._changed.notify_all()
        self._settle_pending()
        self._wake()

    def _setup_failed(self, worker: WorkerHandle, what: str, likely: str, now: float) -> None:
        error = worker.setup_error
        if not isinstance(error, ModelSetupError):
            error = ModelSetupError(
                f"worker {worker.index} (pid {worker.pid}) of {self.settings.model_name!r} "
                f"{what} while loading the model ({likely}). If your script creates the Pool at "
                "import time, guard it with `if __name__ == '__main__':`."
            )
            worker.setup_error = error
        self._count_setup_failure(worker.index, error, now)

    def _count_setup_failure(self, index: int, error: ModelSetupError, now: float) -> None:
        """A worker could not be started or loaded: back off, or trip the breaker (lock held).

        Each failure is logged with the worker's traceback and recorded in ``events()``. A
        replacement that fails while the worker it replaces still runs (recycling) may fail
        *because* the two overlap (a port or a lock per slot, GPU memory for two copies): at
        the breaker's count, the old worker is stopped without a replacement instead, and the
        slot loads again alone once it is gone; if that fails too, the breaker trips.
        """
        self._last_setup_error = error
        self.failure_seq += 1
        if self._closing:
            return
        self._setup_failures += 1
        failures = self._setup_failures
        self._event("setup_failed", str(error))
        retiring = [
            w
            for w in self._workers
            if w.index == index and w.retiring and w.state != STOPPING and not w.stop_unreplaced
        ]
        if failures >= MAX_SETUP_FAILURES and retiring:
            self._respawn_at.pop(index, None)
            for w in retiring:
                w.stop_unreplaced = True  # no new work (_has_successor); _retire stops it
                if w.state == IDLE:
                    self._stop(w, now)
            pids = ", ".join(str(w.pid) for w in retiring)
            reason = (
                f"the replacement of worker {index} (pid {pids}) of "
                f"{self.settings.model_name!r} failed to load {failures} times in a row while "
                "that worker still ran; it is stopped without a replacement (it is past its "
                "recycling limit), and the slot loads again once it has exited. A model that "
                "holds a port, a file or a device per worker must tell the two processes of a "
                "slot apart during recycling: use worker_info().lane. Last error"
            )
            self._event("retired_unreplaced", f"{reason}: {error}")
            self._log_later(logging.ERROR, "%s: %s", reason, error, exc_info=error)
            return
        if failures >= MAX_SETUP_FAILURES:
            broken = ModelSetupError(
                f"{self.settings.model_name!r} failed to load {failures} times in "
                f"a row; the pool stopped starting workers (those already loaded keep "
                f"serving). Last error: {error}"
            )
            broken.__cause__ = error.__cause__ or error
            self._broken = broken
            self._event("stopped_starting", str(broken))
            self._log_later(logging.ERROR, "%s", broken, exc_info=error)
            if not self._capacity():
                self._fail_everything(broken)
            return
        delay = min(5.0, 0.5 * 2 ** (failures - 1))
        self._respawn_at[index] = now + delay
        self._log_later(
            logging.WARNING,
            "%s (setup failure %d in a row; the pool stops starting workers after %d); "
            "starting another in %.1f s",
            error,
            failures,
            MAX_SETUP_FAILURES,
            delay,
            exc_info=error,
        )

    def _crashed(
        self,
        worker: WorkerHandle,
        what: str,
        signame: str | None,
        likely: str,
        exitcode: int | None,
        now: float,
    ) -> None:
        req = worker.request
        worker.request = None
        replaced = any(
            w.index == worker.index and w.generation > worker.generation for w in self._workers
        )
        if not self._closing and not replaced and worker.index in self._active:
            self._respawn_at.setdefault(worker.index, now)
        if req is None:
            if worker.kill_reason is None and not self._closing:  # no request will tell of it
                self._log_later(
                    logging.WARNING,
                    "worker %d (pid %s) of %r %s while idle; likely cause: %s. It is being "
                    "replaced.",
                    worker.index,
                    worker.pid,
                    self.settings.model_name,
                    what,
                    likely,
                )
            return
        members = req.members
        for member in reversed(members):  # retries go back to the front, in their order
            if member.future.done():
                continue
            member.batch = None
            if member.attempts <= self.settings.retries and not self._closing:
                member.worker = None
                self._queue.appendleft(member)
                self._rows_queued += member.rows
                continue
            if worker.kill_reason is not None and self._closing:
                self._fail_later(
                    member, PoolClosedError(f"the pool was shut down ({worker.kill_reason})")
                )
                continue
            tries = f" (tried {member.attempts} times)" if member.attempts > 1 else ""
            shared = f" in a batch of {len(members)}" if len(members) > 1 else ""
            if worker.kill_reason is not None:
                what, likely = "was stopped", worker.kill_reason
            self._fail_later(
                member,
                WorkerCrashedError(
                    f"worker {worker.index} (pid {worker.pid}) of {self.settings.model_name!r} "
                    f"{what} while running this request{shared}{tries}; likely cause: {likely}."
                    " The worker is being replaced; other requests are unaffected.",
                    pid=worker.pid,
                    exitcode=exitcode,
                    signal_name=signame,
                    likely_cause=likely,
                ),
            )

    def _loading_full(self) -> bool:
        """As many workers are loading as ``load_concurrency`` allows (lock held)."""
        limit = self.settings.load_concurrency
        return limit is not None and sum(1 for w in self._workers if w.state == STARTING) >= limit

    def _autoscale(self, now: float) -> None:
        """Grow while requests wait and no worker is free; shrink after a quiet period (lock
        held). One step per tick, one worker loading at a time, within [floor, workers]."""
        s = self.settings
        waiting = any(not r.future.done() for r in self._queue)
        loading = any(w.state == STARTING for w in self._workers)
        if waiting and not loading and self._idle_worker() is None:
            if len(self._active) < s.workers and self._broken is None:
                index = min(set(range(s.workers)) - self._active)
                self._active.add(index)
                self._respawn_at[index] = now
                self._event("scale_up", f"{len(self._queue)} requests waiting, no worker free")
            return
        if waiting or len(self._active) <= s.floor:
            return
        for w in self._workers:
            if w.state == IDLE and now - w.idle_since >= s.scale_down_after:
                self._active.discard(w.index)
                self._stop(w, now)
                self._event("scale_down", f"worker {w.index} idle for {now - w.idle_since:.0f} s")
                return

    def _event(self, kind: str, reason: str) -> None:
        self._events.append(
            {"time": time.time(), "event": kind, "workers": len(self._active), "reason": reason}
        )

    def events(self) -> list[dict[str, Any]]:
        """Recent scaling events, oldest first."""
        with self._lock:
            return list(self._events)

    def _has_successor(self, worker: WorkerHandle) -> bool:
        """Whether ``worker`` (retiring) is to take no more work: its replacement is ready, or
        it stops without one (``stop_unreplaced``)."""
        return worker.stop_unreplaced or any(
            w.index == worker.index and w.generation > worker.generation and w.state in (IDLE, BUSY)
            for w in self._workers
        )

    def _retire(self, now: float) -> None:
        for w in list(self._workers):
            if not w.retiring or w.state == STOPPING:
                continue
            if w.stop_unreplaced:  # its replacements kept failing: stop it once it is idle
                if w.state == IDLE:
                    self._stop(w, now)
                continue
            newer = [x for x in self._workers if x.index == w.index and x.generation > w.generation]
            if not newer and w.index not in self._respawn_at and self._broken is None:
                self._respawn_at[w.index] = now  # start the replacement first
            elif self._has_successor(w) and w.state == IDLE:
                self._stop(w, now)

    def _check_memory(self) -> None:
        limit = self.settings.max_memory_per_worker
        for w in self._workers:
            if w.state in (IDLE, BUSY) and not w.retiring:
                private = private_memory(w.pid)
                if private is not None and limit is not None and private > limit:
                    w.retiring = True

    def _stop(self, worker: WorkerHandle, now: float) -> None:
        worker.state = STOPPING
        worker.deadline = now + STOP_GRACE
        with contextlib.suppress(OSError):
            worker.channel.send((STOP, 0, None))

    def _kill(self, worker: WorkerHandle, reason: str, kind: str = "killed") -> None:
        """SIGKILL ``worker``; its exit is handled in ``_on_exit`` by the state it died in.
        ``kind`` labels the exit in the metrics: ``"timeout"``, ``"shutdown"`` or ``"killed"``."""
        worker.kill_reason = reason
        worker.kill_kind = kind
        worker.deadline = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            worker.process.kill()
        if worker.users > 0:  # a caller blocked reading it must wake now, not at end of file
            worker.channel.wire.shutdown()

    def _shutdown_step(self, now: float) -> bool:
        """One step of a staged shutdown; True when everything is stopped and reaped."""
        self._respawn_at.clear()
        self._drop_settled()  # a cancelled request is nothing to wait for
        draining = not self._force and (self._drain_until is None or now < self._drain_until)
        if self._queue and draining and not self._capacity():
            # nothing left that could run the queue (e.g. the model failed to load)
            reason = self._last_setup_error or PoolClosedError("the pool was shut down")
            while self._queue:
                self._fail_later(self._queue.popleft(), _fresh(reason))
        if not draining:
            while self._queue:
                self._fail_later(self._queue.popleft(), PoolClosedError("the pool was shut down"))
        for w in list(self._workers):
            if w.state == STOPPING or w.kill_reason is not None:
                continue
            if self._force or (w.state == STARTING and not (draining and self._queue)):
                self._kill(w, "killed by modelpool: pool shut down", "shutdown")
            elif w.state == BUSY and not draining:
                if w.request is not None:
                    for member in w.request.members:
                        self._fail_later(
                            member,
                            PoolClosedError(
                                "the pool was shut down before this request finished "
                                f"(drain_timeout={self.settings.drain_timeout} s)"
                            ),
                        )
                    w.request = None
                self._kill(w, "killed by modelpool: still busy at the end of shutdown", "shutdown")
            elif w.state == IDLE and not (self._queue and draining):
                self._stop(w, now)
        return not self._workers and not self._queue

    def _fail_everything(self, error: BaseException) -> None:
        while self._queue:
            self._fail_later(self._queue.popleft(), error)

    def _kill_all(self) -> None:
        with self._lock:
            workers = list(self._workers)
        for w in workers:
            with contextlib.suppress(Exception):
                if w.request is not None:
                    for member in w.request.members:
                        self._fail(member, PoolClosedError("the pool was shut down"))
                w.process.kill()
        for w in workers:
            with contextlib.suppress(Exception):
                w.process.join(5.0)
            with contextlib.suppress(Exception):
                w.lifeline.close()
            with self._lock:
                w.exited = True
                if w.users <= 0:
                    with contextlib.suppress(Exception):
                        w.channel.close()
                else:
                    w.channel.wire.shutdown()

    def _cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1


_PEER_GONE = frozenset(
    {errno.EPIPE, errno.ECONNRESET, errno.EBADF, errno.ENOTCONN, errno.ESHUTDOWN}
)


def _peer_gone(exc: BaseException) -> bool:
    """Does ``exc`` mean the worker's end of the connection is gone (it died, or the pool shut
    the socket to wake us)? Anything else is a failure on our side."""
    return isinstance(exc, EOFError) or (isinstance(exc, OSError) and exc.errno in _PEER_GONE)


def _transport_error(exc: Exception, worker: WorkerHandle) -> TransportError:
    """A local failure while talking to ``worker`` (which is then replaced), as a modelpool
    error that names it; never blamed on the model."""
    if isinstance(exc, TransportError):
        return exc
    error = TransportError(
        f"modelpool could not exchange a request with worker pid {worker.pid} "
        f"({type(exc).__name__}: {exc}); the request did not complete and the worker is being "
        "replaced. Retry the call; if it keeps failing, please report it."
    )
    error.__cause__ = exc
    return error


def _fresh(error: BaseException) -> BaseException:
    """A new instance of a stored error, so raising it in many threads shares no traceback."""
    try:
        clone = type(error)(*error.args)
    except Exception:
        return error
    clone.__cause__ = error.__cause__
    return clone


def _exit_kind(worker: WorkerHandle, signame: str | None, exitcode: int | None) -> str:
    """A short label for why a worker exited (metrics count these)."""
    if worker.kill_reason is not None:
        return worker.kill_kind
    if worker.state == STOPPING:
        return "recycled" if worker.retiring else "stopped"
    if worker.state == STARTING:
        return "setup_failed"
    return signame or f"exit_{exitcode}"
