"""The parent side: the supervisor's loop and what it does on each event.

One thread (``modelpool-supervisor``) owns the workers' life cycle. It sleeps in ``epoll`` on
every worker's connection and process sentinel plus a wake-up pipe, with a timeout set to the
next thing due; it never polls. Callers hand a request straight to an idle worker from their
own thread (the fast path); otherwise the request queues and the supervisor dispatches it when
a worker frees up. Each worker runs one request at a time, so every request has exactly one
owner: when a worker dies, only its own request fails (or is retried).

The parts, each in its module:

* ``Fleet`` (``_fleet``): the worker handles and the policies on their number (spawn, respawn
  with backoff, recycling, the setup breaker, the memory limit, autoscaling);
* ``Dispatcher`` (``_dispatch``): the queue, batching, and the exchanges with workers;
* ``Deadlines`` (``_deadlines``): requests by deadline;
* ``Outbox`` (``_requests``): failures and log records decided under the lock, delivered after.

The lock rules. One lock (``Supervisor._lock``, also the ``_changed`` condition) guards the
fleet, the queue, the deadline index and every worker's ``state``, ``request`` and ``users``.
Caller threads take it briefly to admit a request and, on the fast path, to hand a worker back;
the supervisor thread takes it for each decision. Nobody settles a future, writes a log record
or does I/O on a worker's connection while holding it (done-callbacks and log handlers may call
the pool; a write may block): decisions made under the lock go to the ``Outbox`` and are
delivered by ``_flush`` after it is released. A worker's connection has one reader at a time:
a caller thread on the fast path (``reader_active``) or the loop (``watched``). The only state
touched without the lock is ``Deadlines.discard`` (one dict operation) and ``close_soon``'s flag.

All processes are started from the supervisor thread: PR_SET_PDEATHSIG fires when the thread that
forked a child exits, so children must come from a thread that lives as long as the pool.

Time: every decision reads the injected ``clock`` (``time.monotonic`` by default), so tests can
drive deadlines, backoff and scale-down with a fake clock instead of sleeping.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable
from multiprocessing.context import BaseContext
from typing import Any, cast

from . import _exits, _handle
from ._deadlines import Deadlines
from ._dispatch import Dispatcher, out_of_step, peer_gone, transport_error
from ._exceptions import (
    ModelpoolError,
    ModelSetupError,
    PoolClosedError,
    PoolOverloadedError,
)
from ._fleet import Fleet, Launch, exit_kind, worker_stats
from ._handle import STARTING, STOPPING, WorkerHandle, WorkerStats, describe_exit
from ._hygiene import THREAD_PREFIX
from ._loopside import LoopFuture, LoopSide
from ._poller import Poller
from ._requests import Outbox, Request, fresh
from ._settings import PoolSettings
from ._streaming import PIECE
from ._transport import DecodeError
from ._worker import ERR, OK, READY, SETUP_FAILED

__all__ = ["Supervisor"]

#: Setup failures (with the worker's traceback), and what the pool does about them.
log = logging.getLogger("modelpool.pool")
#: seconds a dead worker's exit waits for the attached loop to read what it wrote before
EXIT_DRAIN = 1.0


class Supervisor:
    """Owns the workers and the queue. Thread-safe; see the module docstring."""

    def __init__(
        self,
        settings: PoolSettings,
        ctx: BaseContext,
        *,
        clock: Callable[[], float] = time.monotonic,
        launch: Launch | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.poller = Poller()
        self._wake = self.poller.wake
        self.loopside: LoopSide | None = None  # an event loop that reads its own answers
        self._ids = itertools.count(1)
        self.deadlines = Deadlines()
        self._deferred_exits: list[WorkerHandle] = []  # exits waiting for the loop (_defer_exit)
        self.outbox = Outbox(log, self.deadlines.discard)
        self.fleet = Fleet(
            settings,
            launch or functools.partial(_handle.launch, ctx),
            self._lock,
            self.outbox,
            watch=self.poller.watch_new,
            fork=ctx.get_start_method() == "fork",
        )
        self.dispatch = Dispatcher(
            settings,
            self._lock,
            self.fleet,
            self.deadlines,
            clock=clock,
            watch=self._watch,
            wake=self._wake,
            new_id=self._ids.__next__,
            closing=lambda: self._closing,
        )
        self._close_requested = False
        self._closing = False
        self._force = False
        self._drain_until: float | None = None
        self._crash: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"{THREAD_PREFIX}supervisor", daemon=True
        )
        self._done = threading.Event()
        self.on_done: Callable[[Supervisor], object] | None = None

    # ------------------------------------------------------------------ caller-facing

    @property
    def failure_seq(self) -> int:
        """Setup failures ever; ``wait_ready(since)`` raises on one newer than ``since``."""
        return self.fleet.failure_seq

    def start(self) -> None:
        self.poller.open()
        self._thread.start()

    def wait_ready(self, since: int) -> None:
        """Block until every worker finished setup(); raise ModelSetupError if a setup fails
        after failure number ``since`` (see ``failure_seq``)."""
        with self._changed:
            while True:
                error = self.fleet.broken or self._crash
                if error is None and self.fleet.failure_seq > since:
                    error = self.fleet.last_setup_error
                if error is not None:
                    raise fresh(error)
                if self._closing:
                    raise PoolClosedError("the pool was shut down while it was starting")
                if self.fleet.ready() >= self.settings.floor:
                    return
                self._changed.wait()

    def new_request(self, timeout: float | None) -> Request:
        """A request whose deadline counts from now; set its ``frame`` before ``submit``."""
        now = self._clock()
        return Request(next(self._ids), None if timeout is None else now + timeout, now)

    def submit(self, req: Request) -> None:
        """Queue ``req`` or hand it to an idle worker now; its future gets the answer."""
        side = self.loopside
        if side is None or not isinstance(cast(Any, req.future), LoopFuture):
            side = None  # (a LoopFuture: made on the attached loop's thread, which runs this)
        worker = self._admit(req, direct=False, side=side)
        if worker is not None:
            self.dispatch.send(worker, req)
        elif side is not None:
            side.reap()  # a worker may have answered meanwhile: it takes this one

    def call(self, req: Request) -> Any:
        """Run ``req`` and return its answer, blocking. The fast path: when a worker is idle,
        this thread sends the request and reads the answer itself (no thread handoff)."""
        worker = self._admit(req, direct=True)
        if worker is None:
            return req.future.result()
        return self.dispatch.exchange(worker, req)

    def _admit(
        self, req: Request, *, direct: bool, side: LoopSide | None = None
    ) -> WorkerHandle | None:
        """Take ``req`` in: assign it to an idle worker (returned) or queue it. With batching,
        a request made on the attached loop (``side``) has the loop look at the queue when it
        must be looked at (a batch to time or to send), instead of waking this thread: at two
        wake-ups per batch, the wake-up and the hand-over of the GIL were a third of the
        front's time per request (docs/benchmarks.md)."""
        with self._lock:
            if self._crash is not None:
                raise fresh(self._crash)
            if self._closing:
                raise PoolClosedError(
                    f"pool of {self.settings.model_name!r} is shut down; create a new Pool"
                )
            if self.fleet.broken is not None and not self.fleet.capacity():
                raise fresh(self.fleet.broken)
            if self.dispatch.full():
                raise PoolOverloadedError(
                    f"pool of {self.settings.model_name!r} is overloaded: "
                    f"{len(self.dispatch.queue)} requests are already waiting "
                    f"(max_queue={self.settings.max_queue}). Retry later, add workers, or "
                    "raise max_queue."
                )
            worker, look = self.dispatch.admit(req, direct=direct)
            on_loop = look and side is not None and self.dispatch.loop_batches()
            wake = look and not on_loop
            if req.deadline is not None and self.deadlines.add(req):
                wake = True  # the earliest deadline now: the loop's timeout must shrink
        if wake:
            self._wake()
        if on_loop:
            assert side is not None
            side.dispatch_due()
        return worker

    def attach_loop(self, loop: Any) -> None:
        """Let ``loop`` (running in this thread) read the answers to the requests it sends;
        see ``_loopside``. One loop at a time: attaching another detaches the first."""
        if self.loopside is not None and self.loopside.loop is loop and not self.loopside.detached:
            return
        self.detach_loop()
        self.loopside = LoopSide(
            loop,
            self._lock,
            self.dispatch,
            discard=self.deadlines.discard,
            clock=self._clock,
            wake=self._wake,
            closing=lambda: self._closing,
            out_of_step=self._out_of_step,
            give_back=lambda worker: self.poller.watch(worker, True),
        )

    def detach_loop(self) -> None:
        """Hand what the attached loop watches back to the supervisor (on the loop's thread,
        before it stops)."""
        side = self.loopside
        if side is not None:
            # detached first (under the lock, every watched worker handed back at once), only
            # then forgotten: a thread routing a watch meanwhile never sees a half-detached loop
            side.detach()
            self.loopside = None

    def loop_future(self, req: Request) -> LoopFuture | None:
        """Give ``req`` a ``LoopFuture`` when this thread runs the attached loop."""
        side = self.loopside
        if side is None or not side.here():
            return None
        future = side.future()
        req.use_future(future)
        return future

    def _watch(self, worker: WorkerHandle, on: bool) -> None:
        """(Un)register ``worker``'s answers with a reader: the attached loop when this thread
        runs it (or it reads them already), else the supervisor's selector (lock held)."""
        side = self.loopside
        if side is not None and side.watch(worker, on):
            self.poller.watch(worker, False)
        else:
            self.poller.watch(worker, on)

    def close(self, *, cancel_futures: bool, force: bool) -> None:
        with self._lock:
            if not self._closing:
                self._closing = True
                if self.settings.drain_timeout is not None:
                    self._drain_until = self._clock() + self.settings.drain_timeout
            if force:
                self._force = True
            cancelled = self.dispatch.take_all() if cancel_futures or force else []
        for req in cancelled:  # outside the lock: cancel() runs done-callbacks
            if not req.future.cancel():
                self.dispatch.fail(req, PoolClosedError("the pool was shut down"))
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
            snapshot = self.fleet.snapshot()
        return worker_stats(snapshot, self._clock())

    def telemetry(self) -> dict[str, dict[Any, int]]:
        """Totals since start: worker exits by kind, and batches by rows (batching only)."""
        with self._lock:
            return {
                "exit_reasons": dict(self.fleet.exit_reasons),
                "batch_sizes": dict(sorted(self.dispatch.batch_sizes.items())),
            }

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "queued": self.dispatch.waiting(),
                "in_flight": sum(1 for w in self.fleet.workers if w.request is not None),
            }

    def events(self) -> list[dict[str, Any]]:
        """Recent scaling events, oldest first."""
        with self._lock:
            return self.fleet.events()

    # ------------------------------------------------------------------ the loop's plumbing

    def _flush(self) -> None:
        """Deliver what was decided under the lock (call without it)."""
        self.outbox.flush()

    def _fail_waiting(self, error: BaseException) -> None:
        """Fail every queued request with ``error`` (lock held)."""
        for req in self.dispatch.take_all():
            self.outbox.fail_later(req, error)

    def _fail_if_broken(self) -> None:
        """Nothing can serve and the pool stopped starting workers: fail what waits (lock
        held)."""
        if self.fleet.broken is not None and not self.fleet.capacity():
            self._fail_waiting(self.fleet.broken)

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            while True:
                timeout = self._tick()
                if timeout is None:
                    break
                for what, worker in self.poller.wait(timeout):
                    if what == "conn":
                        self._on_message(worker)
                    else:
                        self._on_exit(worker)
                for worker in self._exits_due():
                    self._on_exit(worker)
        except BaseException as exc:  # a bug in modelpool: fail loudly, never hang callers
            error = ModelpoolError(
                f"modelpool's supervisor thread crashed ({type(exc).__name__}: {exc}): a bug in "
                "modelpool, please report it with this traceback. Every worker was stopped; "
                "create a new Pool."
            )
            error.__cause__ = exc
            with self._changed:
                self._crash = error
                self._closing = True
                self._force = True
                self._fail_waiting(error)
                self._changed.notify_all()
            self._flush()
        finally:
            for req in self.fleet.kill_all(self._lock):
                for member in req.members:
                    crash = self._crash
                    why = fresh(crash) if crash else PoolClosedError("the pool was shut down")
                    self.dispatch.fail(member, why)
            self.poller.close()
            self._done.set()
            if self.on_done is not None:
                self.on_done(self)

    def _tick(self) -> float | None:
        """One round of decisions; returns the select timeout, or None to end the loop."""
        if self._close_requested and not self._closing:
            self.close(cancel_futures=True, force=False)  # asked by a finalizer
        now = self._clock()
        to_send: list[tuple[WorkerHandle, Request]] = []
        fleet = self.fleet
        with self._changed:
            self.dispatch.expire(now, self.outbox)
            fleet.expire(now)
            finished = False
            if self._closing:
                finished = self._shutdown_step(now)
            else:
                fleet.respawn(now)
                self._fail_if_broken()
                fleet.retire(now)
                fleet.check_memory(now)
            if not finished:
                to_send = self.dispatch.dispatch(now)
            if not self._closing and self.settings.autoscaling:
                # after dispatch: a worker that just loaded is busy now, not idle, so requests
                # still waiting make the pool grow again (before, it grew one step per answer)
                fleet.autoscale(now, self.dispatch.waiting())
            wake_at = self._next_wake(now)
            self._changed.notify_all()
        self._flush()  # failures decided above, reported now that the lock is free
        if finished:
            return None
        for worker, req in to_send:
            self.dispatch.send(worker, req)
        if wake_at is None:
            return 3600.0  # nothing scheduled: sleep until an event
        return max(0.0, wake_at - self._clock())

    def _next_wake(self, now: float) -> float | None:
        times = self.fleet.next_wake(now)
        due = self.deadlines.next_due()
        if due is not None:
            times.append(due)
        if self.dispatch.batch_due is not None:
            times.append(self.dispatch.batch_due)
        if self._closing and self._drain_until is not None:
            times.append(self._drain_until)
        times += [(w.exit_deferred_at or now) + EXIT_DRAIN for w in self._deferred_exits]
        return min(times) if times else None

    # ------------------------------------------------------------------ events

    def _on_message(self, worker: WorkerHandle) -> bool:
        """Handle one message from ``worker``; False when there is nothing for us to read."""
        with self._lock:
            if (
                not worker.watched
                or worker.reader_active
                or worker.loop_watched
                or worker.channel.wire.fd < 0
            ):
                return False  # a stale event: a calling thread owns this connection now
        try:
            message = worker.channel.recv(block=False)  # never hang on a half-sent message
            if message is None:
                return False  # incomplete: the rest arrives with a later event
            kind, rid, payload = message
        except DecodeError as exc:  # whole, but not readable here: the answer is that error
            kind, rid, payload = ERR, 0, exc.remote
        except Exception as exc:
            if peer_gone(exc):
                with self._lock:
                    self._watch(worker, False)
                return False  # the exit sentinel follows; _on_exit handles it
            # not a message (kind, id, payload), or a local failure reading it: out of step
            self._out_of_step(worker, transport_error(exc, worker), "reading from it failed")
            return False
        current = worker.request
        if kind == PIECE:  # a streamed predict's piece; more may have come in the same read
            if (wrong := self.dispatch.piece(worker, rid, payload)) is not None:
                self._out_of_step(worker, wrong, f"a piece of {rid}, not a stream it runs")
            return wrong is None and (not worker.channel.readable() or self._on_message(worker))
        if kind in (OK, ERR) and current is not None and rid not in (current.id, 0):
            wrong = out_of_step(worker, rid, current.id)  # a bug: never blame the model
            self._out_of_step(worker, wrong, f"answer {rid} to request {current.id}")
            return False
        with self._changed:
            if worker.kill_reason is not None:
                return True  # being killed: a late answer (its request already failed) is dropped
            if kind == READY:
                self.fleet.loaded(worker, payload, self._clock())
                self._watch(worker, False)
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
            req = cast(Request | None, worker.request)  # the handle's view of what we assigned
            self.dispatch.complete(worker)
            if req is not None:
                for member in req.members:
                    self.deadlines.discard(member.id)
        if req is not None:
            self.dispatch.deliver(req, kind, payload)
        return True

    def _out_of_step(self, worker: WorkerHandle, error: Exception, why: str) -> None:
        """The stream from ``worker`` cannot be trusted: replace the worker; its request fails
        with ``error`` (a ``TransportError``), not as a crash: it is not retried."""
        with self._lock:
            req, worker.request = worker.request, None
            self._watch(worker, False)
            self.fleet.kill(worker, f"killed by modelpool: {why}")
            for member in req.members if req is not None else ():
                self.outbox.fail_later(member, fresh(error))
        self._flush()

    def _defer_exit(self, worker: WorkerHandle) -> bool:
        """Whether ``worker``'s exit waits: a stream's pieces it wrote before it died may be
        in its pipe, and only the attached loop, which reads its answers, may read them. The
        loop reads them (``LoopSide.drain_soon``), then the exit is handled (at the latest
        ``EXIT_DRAIN`` seconds later)."""
        with self._lock:
            side, req = self.loopside, worker.request
            if (
                side is None
                or worker.exit_deferred_at is not None
                or not worker.loop_watched
                or getattr(req, "stream", None) is None
            ):
                return False
            worker.exit_deferred_at = self._clock()
            self._deferred_exits.append(worker)
        self.poller.forget_exit(worker)
        side.drain_soon(worker, self._drained)
        return True

    def _drained(self, worker: WorkerHandle) -> None:
        with self._lock:
            worker.exit_drained = True
        self._wake()

    def _exits_due(self) -> list[WorkerHandle]:
        """The deferred exits to handle now (``_defer_exit``)."""
        if not self._deferred_exits:
            return []
        with self._lock:
            since = self._clock() - EXIT_DRAIN
            due = [
                w
                for w in self._deferred_exits
                if w.exit_drained or (w.exit_deferred_at or 0.0) <= since
            ]
            self._deferred_exits = [w for w in self._deferred_exits if w not in due]
        return due

    def _on_exit(self, worker: WorkerHandle) -> None:
        if self._defer_exit(worker):
            return
        worker.process.join(1.0)
        exitcode = worker.process.exitcode
        self.poller.forget_exit(worker)
        # a message may still sit in the pipe (a result or a setup error written just before
        # the exit): read it first so nothing is lost
        with contextlib.suppress(OSError, EOFError):
            while worker.channel.readable() and self._on_message(worker):
                pass
        what, signame, likely = describe_exit(exitcode)
        now = self._clock()
        with self._changed:
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
            kind = exit_kind(worker, signame, exitcode)
            self.fleet.exited(worker, worker.kill_reason or what, kind, now, self._closing)
            if worker.state == STARTING:
                self._setup_failed(worker, what, likely, now)
            elif worker.state != STOPPING:  # died, or killed for a timeout, while serving
                self._crashed(worker, what, signame, likely, exitcode)
            self._fail_if_broken()
            self._changed.notify_all()
        self._flush()
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
        self.fleet.setup_failed(worker.index, error, now, closing=self._closing)

    def _crashed(
        self, worker: WorkerHandle, what: str, signame: str | None, likely: str, code: int | None
    ) -> None:
        """``worker`` died (or was killed) while serving: retry or fail its request (lock
        held)."""
        exit_ = _exits.Exit(what, signame, likely, code)
        _exits.settle_crashed(
            worker, exit_, self.dispatch, self.outbox, self.settings, self._closing
        )

    # ------------------------------------------------------------------ shutdown

    def _shutdown_step(self, now: float) -> bool:
        """One step of a staged shutdown; True when everything is stopped and reaped."""
        draining = not self._force and (self._drain_until is None or now < self._drain_until)
        return _exits.shutdown_step(
            self.fleet,
            self.dispatch,
            self.outbox,
            self.settings,
            now,
            draining=draining,
            force=self._force,
        )
