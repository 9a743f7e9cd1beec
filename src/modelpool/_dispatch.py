"""Dispatch: the queue, and the exchanges that carry requests to workers and answers back.

``Dispatcher`` owns the queue (and, with batching on, forms batches from it) and does the
sending and receiving that happens outside the supervisor's lock:

* ``admit`` (lock held) hands a new request to an idle worker or queues it;
* ``exchange`` is the fast path: the caller's own thread sends the request and reads the answer;
* ``send`` writes a request the supervisor (or a freed worker) dispatched;
* ``dispatch`` / ``next_for`` (lock held) pair queued requests with idle workers;
* ``complete`` (lock held) and ``deliver`` (unlocked) finish a request;
* ``expire`` (lock held) fails the requests past their deadline.

Locking: the queue, each worker's ``state`` / ``request`` / ``users`` and the selector
registrations are guarded by the supervisor's lock; methods marked "lock held" assert it.
A worker's connection is written or read outside the lock by one thread at a time: the thread
that assigned the request (``hold_channel``), or the supervisor's loop when the worker is
``watched``; ``release_channel`` closes it once the last holder is done with an exited worker.
Requests are settled (futures completed) only without the lock.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import errno
import threading
from collections.abc import Callable
from typing import Any, cast

from . import _batching, _infer, _transport
from ._deadlines import Deadlines
from ._exceptions import ProtocolError, RequestTimeoutError, TransportError
from ._fleet import Fleet
from ._handle import BUSY, IDLE, STARTING, WorkerHandle
from ._requests import Batch, Outbox, Request, settle_failed
from ._settings import PoolSettings
from ._streaming import STOP_GRACE
from ._worker import ERR, INFER_BATCH, OK, PREDICT, PREDICT_TAGGED

__all__ = ["Dispatcher", "out_of_step", "peer_gone", "transport_error"]


class Dispatcher:
    """The queue and the exchanges with workers; see the module docstring."""

    def __init__(
        self,
        settings: PoolSettings,
        lock: threading.Lock,
        fleet: Fleet,
        deadlines: Deadlines,
        *,
        clock: Callable[[], float],
        watch: Callable[[WorkerHandle, bool], None],
        wake: Callable[[], None],
        new_id: Callable[[], int],
        closing: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self._lock = lock
        self._fleet = fleet
        self._deadlines = deadlines
        self._clock = clock
        self._watch = watch  # (un)register a worker's connection with the loop's selector
        self._wake = wake
        self._new_id = new_id
        self._closing = closing  # the pool is shutting down: the loop waits for idle workers
        self._batching = settings.batching
        self.queue: collections.deque[Request] = collections.deque()
        #: (batching) rows of every request in the queue, settled ones included until
        #: dropped: a hint for waking up on a full batch (too high costs a spurious wake-up)
        self.rows_queued = 0
        self.batch_due: float | None = None  # when the batcher wants to look again
        self.batch_sizes: collections.Counter[int] = collections.Counter()

    # ------------------------------------------------------------------ the queue (lock held)

    def admit(self, req: Request, *, direct: bool) -> tuple[WorkerHandle | None, bool]:
        """Assign ``req`` to an idle worker (returned: the caller sends it) or queue it.
        Also returns whether the supervisor must look at the queue now. (Lock held.)"""
        assert self._lock.locked()
        worker = None if self._batching else self._fleet.idle_worker()
        if worker is None:
            queue = self.queue
            while queue and queue[0].future.done():  # settled at the head: not in line
                self.rows_queued -= queue.popleft().rows
            queue.append(req)
            self.rows_queued += req.rows
            return None, self._must_look()
        if direct:
            self._watch(worker, False)
            worker.reader_active = True
        else:
            req.future.set_running_or_notify_cancel()  # new: cannot be cancelled yet
        self.assign(worker, req)
        self.hold_channel(worker)
        return worker, False

    def _must_look(self) -> bool:
        """Whether the supervisor must look at the queue now that a request joined it.

        Settled requests (cancelled, timed out, a client that hung up) must never stand in for
        a live head: ``admit`` drops them from the head of the queue before this is asked, and
        every dispatch drops them all, so the queue's head is always one the supervisor saw.
        """
        if len(self.queue) == 1:  # the first live one in line (settled heads were dropped)
            # the supervisor (or the attached loop, for its own requests: ``Supervisor._admit``)
            # starts a batch timer for an idle worker, or grows the pool; with
            # every worker busy (or starting) and no growing to do, the next answer (or READY,
            # or exit) brings it to the queue anyway: a wake-up now would be spent for nothing,
            # and at one per batch it cost the front a tenth of its time (issue 13's bench)
            return self.settings.autoscaling or self._fleet.idle_worker() is not None
        # Behind a live head the supervisor already knows of: its batch timer, or a worker's
        # answer, brings it back. Only a full batch is worth waking it early for.
        return self._batching and self.rows_queued >= self.settings.max_batch_size

    def loop_batches(self) -> bool:
        """Whether the attached loop may form and time batches itself (batching on, and no
        autoscaling: growing the pool is the supervisor's). (Lock held.)"""
        return self._batching and not self.settings.autoscaling and not self._closing()

    def full(self) -> bool:
        """The queue holds ``max_queue`` live requests."""
        limit = self.settings.max_queue
        if limit is None or len(self.queue) < limit:
            return False
        self.drop_settled()
        return len(self.queue) >= limit

    def drop_settled(self) -> None:
        """Remove cancelled or timed-out requests from the queue."""
        if any(r.future.done() for r in self.queue):
            self.queue = collections.deque(r for r in self.queue if not r.future.done())
            self.rows_queued = sum(r.rows for r in self.queue)

    def waiting(self) -> int:
        """Live requests in the queue."""
        return sum(1 for r in self.queue if not r.future.done())

    def remove(self, req: Request) -> None:
        with contextlib.suppress(ValueError):
            self.queue.remove(req)
            self.rows_queued -= req.rows

    def requeue(self, req: Request) -> None:
        """Put ``req`` (to be retried) at the front of the queue."""
        req.worker = None
        req.batch = None
        self.queue.appendleft(req)
        self.rows_queued += req.rows

    def take_all(self) -> list[Request]:
        out = list(self.queue)
        self.queue.clear()
        self.rows_queued = 0
        return out

    # ------------------------------------------------------------------ pairing (lock held)

    def assign(self, worker: WorkerHandle, req: Request) -> None:
        worker.state = BUSY
        worker.request = req
        worker.busy_since = self._clock()
        req.worker = worker
        for member in req.members:
            member.attempts += 1
            member.worker = worker

    def complete(self, worker: WorkerHandle) -> None:
        """``worker`` answered its request."""
        assert self._lock.locked()
        req = cast(Request | None, worker.request)
        if req is None or req.counted:
            worker.served += 1
        if req is not None and req.stream is not None:
            req.stream.close()  # no more CREDIT or CANCEL: it may take another request now
        worker.request = None
        if worker.state == BUSY:
            worker.state = IDLE
            worker.idle_since = self._clock()
        if worker.limit is not None and worker.served >= worker.limit:
            worker.retiring = True

    def piece(self, worker: WorkerHandle, rid: int, payload: Any) -> ProtocolError | None:
        """A piece of the streamed predict ``worker`` runs, to its reader (``_streaming``);
        the error to report when it runs no such stream."""
        req = cast(Request | None, worker.request)
        if req is None or req.stream is None or rid != req.id:
            return out_of_step(worker, rid, req.id if req is not None else 0)
        req.stream.started = True  # (a crash from now on fails it: no retry)
        req.stream.put(payload)
        return None

    def next_for(self, worker: WorkerHandle) -> Request | None:
        """Give ``worker`` (just freed) the oldest queued request, if any."""
        if self._batching:
            return None  # batches are formed by ``dispatch`` (the supervisor's, or the loop's)
        while (
            self.queue
            and worker.state == IDLE
            and not (worker.retiring and self._fleet.has_successor(worker))
        ):
            req = self.queue.popleft()
            if not req.claim():
                continue  # cancelled while queued
            self.assign(worker, req)
            self.hold_channel(worker)
            return req
        return None

    def dispatch(self, now: float) -> list[tuple[WorkerHandle, Request]]:
        """Pair queued requests with idle workers; the caller sends them after the lock."""
        assert self._lock.locked()
        if self._batching:
            return self._dispatch_batches(now)
        out = []
        while self.queue:
            if self.queue[0].future.done():
                self.queue.popleft()
                continue
            worker = self._fleet.idle_worker()
            if worker is None:
                break
            req = self.queue.popleft()
            if not req.claim():
                continue  # cancelled while queued
            self.assign(worker, req)
            self.hold_channel(worker)
            out.append((worker, req))
        return out

    def _dispatch_batches(self, now: float) -> list[tuple[WorkerHandle, Request]]:
        """Form batches for idle workers; see ``_batching``."""
        out: list[tuple[WorkerHandle, Request]] = []
        self.batch_due = None
        self.drop_settled()  # abandoned requests neither head a batch nor count towards one
        while self.queue:
            worker = self._fleet.idle_worker()
            if worker is None:
                break
            chosen, due = _batching.select(
                self.queue,
                now,
                self.settings.max_batch_size,
                self.settings.max_batch_delay,
                is_live=lambda r: not r.future.done(),
            )
            if not chosen:
                self.batch_due = due
                break
            picked = {id(r) for r in chosen}
            self.queue = collections.deque(
                r for r in self.queue if id(r) not in picked and not r.future.done()
            )
            parts = [r for r in chosen if r.claim()]
            if not parts:
                continue  # all cancelled meanwhile
            if len(parts) == 1 and parts[0].inputs is None:
                unit: Request = parts[0]  # not batchable (a function call, odd inputs)
            else:
                unit = Batch(self._new_id(), parts)
                for part in parts:
                    part.batch = unit
                self.batch_sizes[sum(part.rows for part in parts)] += 1
            self.assign(worker, unit)
            self.hold_channel(worker)
            out.append((worker, unit))
        self.rows_queued = sum(r.rows for r in self.queue)
        return out

    def expire(self, now: float, outbox: Outbox) -> None:
        """Fail the requests past their deadline (lock held; the failures go to ``outbox``).
        A queued one just fails; a running one fails and its worker is killed, unless it runs
        in a batch whose other members still wait for the answer."""
        model = f"model {self.settings.model_name!r}"
        for req in self._deadlines.expired(now):
            worker, batch = req.worker, req.batch
            running = worker is not None and (
                worker.request is req or (batch is not None and worker.request is batch)
            )
            if not running:
                self.remove(req)
                outbox.fail_later(
                    req,
                    RequestTimeoutError(
                        f"request to {model} timed out while waiting for a free worker "
                        f"({self._fleet.count(BUSY)} busy, {self._fleet.count(STARTING)} still "
                        "loading the model); it was never run. Add workers, or raise the "
                        "timeout."
                    ),
                )
                continue
            assert worker is not None
            if req.stream is not None and self._stop_stream(req, worker, now, outbox):
                continue
            if batch is not None and len(batch.parts) > 1:
                outbox.fail_later(
                    req,
                    RequestTimeoutError(
                        f"request to {model} timed out while running in a batch of "
                        f"{len(batch.parts)} requests in worker pid {worker.pid}. Raise the "
                        "timeout if the model is just slow."
                    ),
                )
                if all(p.future.done() or outbox.failing(p) for p in batch.parts):
                    worker.request = None
                    self._fleet.kill(
                        worker, "killed by modelpool: a batch ran past its timeout", "timeout"
                    )
                continue
            outbox.fail_later(
                req,
                RequestTimeoutError(
                    f"request to {model} timed out while running in worker pid {worker.pid}; "
                    "the worker was killed and is being replaced. Raise the timeout if the "
                    "model is just slow."
                ),
            )
            worker.request = None
            self._fleet.kill(
                worker, "killed by modelpool: a request ran past its timeout", "timeout"
            )

    def _stop_stream(self, req: Request, worker: WorkerHandle, now: float, outbox: Outbox) -> bool:
        """A running stream past its deadline: the first time, its reader fails now and the
        worker is told to stop the generator (its ``finally`` runs), with ``STOP_GRACE``
        seconds to do it (True: nothing more to do now); the second time, it did not stop
        (False: the worker is killed as for any request past its timeout)."""
        if req.stream.stopping:
            return False
        req.stream.stopping = True
        error = RequestTimeoutError(
            f"request to model {self.settings.model_name!r} timed out while streaming in "
            f"worker pid {worker.pid}; the model's generator was stopped. Raise the timeout "
            "if the model is just slow."
        )
        outbox.call_later(req.stream.stop, worker, req.id, error)  # (a write: after the lock)
        req.deadline = now + STOP_GRACE
        self._deadlines.add(req)
        return True

    # ------------------------------------------------------------------ channels (lock held)

    def hold_channel(self, worker: WorkerHandle) -> None:
        """This thread will write (or read) ``worker``'s connection outside the lock."""
        worker.users += 1

    def release_channel(self, worker: WorkerHandle) -> None:
        """A thread is done with ``worker``'s connection."""
        worker.users -= 1
        if worker.users <= 0:
            worker.reader_active = False
            if worker.exited:  # the exit handler left the channel open for us
                worker.channel.close()

    # ------------------------------------------------------------------ exchanges (unlocked)

    def fail(self, req: Request, exc: BaseException) -> None:
        """Fail ``req`` now (without the lock)."""
        self._deadlines.discard(req.id)
        settle_failed(req, exc)

    def exchange(self, worker: WorkerHandle, req: Request) -> Any:
        """The fast path: send ``req`` (assigned to ``worker`` by ``admit(direct=True)``) and
        read the answer in this thread; return it or raise the model's exception."""
        kind, payload, answered = ERR, None, False
        try:
            if req.frame.buffers:
                worker.channel.send_encoded(req.frame)
            else:
                worker.channel.send_small(req.frame.body)
            kind, rid, payload = worker.channel.recv()
            answered = True
            if rid not in (req.id, 0):
                raise out_of_step(worker, rid, req.id)
        except _transport.PlacementError:
            # nothing was sent: the worker is fine, the request fails with the reason
            with self._lock:
                if worker.request is req:
                    worker.request = None
                    worker.state = IDLE
                self.release_channel(worker)
            self._deadlines.discard(req.id)
            self._wake()
            raise
        except _transport.DecodeError as exc:
            kind, payload, answered = ERR, exc.remote, True
        except Exception as exc:
            if not peer_gone(exc):  # a local failure (no memory, no descriptors...) or a bug
                error = transport_error(exc, worker)
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
                self.complete(worker)
                self._deadlines.discard(req.id)
                follow = self.next_for(worker)
            self.release_channel(worker)
            wake = worker.retiring or self._closing()
        if not mine:  # timed out or crashed meanwhile: the supervisor decided
            return req.future.result()
        if follow is not None:
            self.send(worker, follow)
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
                self._fleet.kill(worker, f"killed by modelpool: {why}")
            self.release_channel(worker)
        self.fail(req, exc)
        self._wake()

    def send(self, worker: WorkerHandle, req: Request) -> None:
        """Write ``req`` (assigned to ``worker``, channel held) to it; its answer arrives
        through the loop. Batches are merged here, outside the lock."""
        if isinstance(req, Batch):
            try:  # merging copies rows: done here, outside the lock
                if req.parts[0].signature is _infer.SIGNATURE:  # bodies: the worker decodes
                    bodies = [part.inputs for part in req.parts]
                    req.frame = _transport.encode_plain(
                        (INFER_BATCH, req.id, (self.settings.max_batch_size, bodies))
                    )
                else:
                    merged = _batching.merge([part.inputs for part in req.parts])
                    tags = [part.tag for part in req.parts if part.tag is not None]
                    message = (PREDICT_TAGGED, req.id, (",".join(tags), merged)) if tags else None
                    req.frame = _transport.encode_request(
                        message or (PREDICT, req.id, merged), "the inputs"
                    )
            except BaseException as exc:
                with self._lock:
                    if worker.request is req:
                        self.complete(worker)
                for part in req.parts:
                    self.fail(part, exc)
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
                self.fail(member, exc)
            self._wake()
        except BaseException as exc:
            if isinstance(exc, Exception) and peer_gone(exc):
                return  # the worker died; its sentinel will tell the supervisor
            # a local failure or an interruption mid-write: the stream may be out of step
            with self._lock:
                if worker.request is req:
                    worker.request = None
                    self._fleet.kill(worker, "killed by modelpool: sending to it failed")
            error = transport_error(exc, worker) if isinstance(exc, Exception) else exc
            for member in req.members:
                self.fail(member, error)
            self._wake()
            if not isinstance(exc, Exception):
                raise
        finally:
            with self._lock:
                self.release_channel(worker)

    def deliver(self, req: Request, kind: int, payload: Any) -> None:
        """Settle ``req`` (answered by its worker) with the answer."""
        if isinstance(req, Batch):
            self._deliver_batch(req, kind, payload)
        elif kind == OK:
            with contextlib.suppress(cf.InvalidStateError):
                req.future.set_result(payload)
        else:
            self.fail(req, payload.rebuild())

    def _deliver_batch(self, batch: Batch, kind: int, payload: Any) -> None:
        for part in batch.parts:  # the batch is over: break the part <-> batch cycle, so
            part.batch = None  # its requests are freed now, not by a garbage-collector pause
        if kind != OK:
            for part in batch.parts:
                self.fail(part, payload.rebuild())  # a fresh exception for each caller
            return
        if batch.parts[0].signature is _infer.SIGNATURE:  # one answer, or error, per request
            for part, answer in zip(batch.parts, payload, strict=True):
                if isinstance(answer, _transport.RemoteException):
                    self.fail(part, answer.rebuild())
                else:
                    with contextlib.suppress(cf.InvalidStateError):  # cancelled: dropped
                        part.future.set_result(answer)
            return
        try:
            answers = _batching.split(
                payload, [part.rows for part in batch.parts], self.settings.model_name
            )
        except _batching.BatchError as exc:
            for part in batch.parts:
                self.fail(part, _batching.BatchError(*exc.args))
            return
        for part, answer in zip(batch.parts, answers, strict=True):
            with contextlib.suppress(cf.InvalidStateError):  # cancelled: answer dropped
                part.future.set_result(answer)


_PEER_GONE = frozenset(
    {errno.EPIPE, errno.ECONNRESET, errno.EBADF, errno.ENOTCONN, errno.ESHUTDOWN}
)


def peer_gone(exc: BaseException) -> bool:
    """Does ``exc`` mean the worker's end of the connection is gone (it died, or the pool shut
    the socket to wake us)? Anything else is a failure on our side."""
    return isinstance(exc, EOFError) or (isinstance(exc, OSError) and exc.errno in _PEER_GONE)


def out_of_step(worker: WorkerHandle, rid: int, expected: int) -> ProtocolError:
    """The error for an answer that does not belong to the request in flight."""
    return ProtocolError(
        f"worker pid {worker.pid} sent the answer to request {rid} for request {expected}: the "
        "pool and its worker are out of step, which is a bug in modelpool (please report it). "
        "The worker was replaced; retry the call."
    )


def transport_error(exc: Exception, worker: WorkerHandle) -> TransportError:
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
