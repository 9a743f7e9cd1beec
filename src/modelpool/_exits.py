"""What a worker's exit, or the pool's shutdown, means for the requests (the supervisor's
decisions, lock held; failures go to the ``Outbox``)."""

from __future__ import annotations

import logging
from typing import NamedTuple

from ._dispatch import Dispatcher
from ._exceptions import PoolClosedError, WorkerCrashedError
from ._fleet import Fleet
from ._handle import BUSY, IDLE, STARTING, STOPPING, WorkerHandle
from ._requests import Outbox, fresh
from ._settings import PoolSettings

__all__ = ["Exit", "settle_crashed", "shutdown_step"]


class Exit(NamedTuple):
    """How a worker ended: what it did (for messages), its signal's name, the likely cause,
    its exit code."""

    what: str
    signame: str | None
    likely: str
    code: int | None


def settle_crashed(
    worker: WorkerHandle,
    exit_: Exit,
    dispatch: Dispatcher,
    outbox: Outbox,
    settings: PoolSettings,
    closing: bool,
) -> None:
    """``worker`` died (or was killed) while serving: retry or fail its request."""
    what, likely = exit_.what, exit_.likely
    req = worker.request
    worker.request = None
    if req is None:
        if worker.kill_reason is None and not closing:  # no request will tell of it
            outbox.log_later(
                logging.WARNING,
                "worker %d (pid %s) of %r %s while idle; likely cause: %s. It is being replaced.",
                worker.index,
                worker.pid,
                settings.model_name,
                what,
                likely,
            )
        return
    members = req.members
    for member in reversed(members):  # retries go back to the front, in their order
        if member.future.done():
            continue
        member.batch = None
        if member.may_retry(settings.retries) and not closing:
            dispatch.requeue(member)
            continue
        if worker.kill_reason is not None and closing:
            outbox.fail_later(
                member, PoolClosedError(f"the pool was shut down ({worker.kill_reason})")
            )
            continue
        tries = f" (tried {member.attempts} times)" if member.attempts > 1 else ""
        shared = f" in a batch of {len(members)}" if len(members) > 1 else ""
        if worker.kill_reason is not None:
            what, likely = "was stopped", worker.kill_reason
        outbox.fail_later(
            member,
            WorkerCrashedError(
                f"worker {worker.index} (pid {worker.pid}) of {settings.model_name!r} "
                f"{what} while running this request{shared}{tries}; likely cause: {likely}."
                " The worker is being replaced; other requests are unaffected.",
                pid=worker.pid,
                exitcode=exit_.code,
                signal_name=exit_.signame,
                likely_cause=likely,
            ),
        )


def shutdown_step(
    fleet: Fleet,
    dispatch: Dispatcher,
    outbox: Outbox,
    settings: PoolSettings,
    now: float,
    *,
    draining: bool,
    force: bool,
) -> bool:
    """One step of a staged shutdown; True when everything is stopped and reaped."""
    fleet.respawn_at.clear()
    dispatch.drop_settled()  # a cancelled request is nothing to wait for
    queued = bool(dispatch.queue)
    if queued and draining and not fleet.capacity():
        # nothing left that could run the queue (e.g. the model failed to load)
        reason = fleet.last_setup_error or PoolClosedError("the pool was shut down")
        for req in dispatch.take_all():
            outbox.fail_later(req, fresh(reason))
    if not draining:
        for req in dispatch.take_all():
            outbox.fail_later(req, PoolClosedError("the pool was shut down"))
    queued = bool(dispatch.queue)
    for w in list(fleet.workers):
        if w.state == STOPPING or w.kill_reason is not None:
            continue
        if force or (w.state == STARTING and not (draining and queued)):
            fleet.kill(w, "killed by modelpool: pool shut down", "shutdown")
        elif w.state == BUSY and not draining:
            if w.request is not None:
                for member in w.request.members:
                    outbox.fail_later(
                        member,
                        PoolClosedError(
                            "the pool was shut down before this request finished "
                            f"(drain_timeout={settings.drain_timeout} s)"
                        ),
                    )
                w.request = None
            fleet.kill(w, "killed by modelpool: still busy at the end of shutdown", "shutdown")
        elif w.state == IDLE and not (queued and draining):
            fleet.stop(w, now)
    return not fleet.workers and not dispatch.queue
