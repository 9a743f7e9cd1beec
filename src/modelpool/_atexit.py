"""What must happen when the interpreter exits: stop the pools still running, then
multiprocessing's process-wide helpers (the fork server, the resource tracker).

Supervisors register themselves when their pool starts and unregister when they finish.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.util
import os
import threading

from ._hygiene import THREAD_PREFIX
from ._supervisor import Supervisor

__all__ = ["register_atexit", "stop_process_helpers"]


# Supervisors (not pools: a pool may be garbage already) still running at interpreter exit are
# stopped then, before multiprocessing's own exit handler would wait for their workers forever.
_running: set[Supervisor] = set()
_atexit_registered = False
_atexit_lock = threading.Lock()


def register_atexit(supervisor: Supervisor) -> None:
    global _atexit_registered
    with _atexit_lock:
        _running.add(supervisor)
        supervisor.on_done = _running.discard
        if not _atexit_registered:
            atexit.register(_stop_running)
            # the very last step of multiprocessing's exit handler: after its own finalizers
            # ran and it joined every child, nothing can need the fork server any more
            multiprocessing.util.Finalize(
                None, _stop_helpers_at_exit, args=(os.getpid(),), exitpriority=-100
            )
            _atexit_registered = True


def _stop_running() -> None:
    for supervisor in list(_running):
        supervisor.close(cancel_futures=True, force=True)
    for supervisor in list(_running):
        supervisor.join(timeout=30.0)


def _stop_helpers_at_exit(pid: int) -> None:
    if os.getpid() == pid:  # not in a child that os.fork() copied the registration into
        stop_process_helpers()


#: A stop of the helpers timed out once (its thread still waits): later calls return at once.
_helpers_stuck = False


def stop_process_helpers(timeout: float = 10.0) -> bool:
    """Stop and reap multiprocessing's fork server and resource tracker, when nothing can
    still need them: no pool of this process is running and no multiprocessing child is alive.

    They are process-wide helpers that multiprocessing starts with the first forkserver (or
    spawn) process and otherwise leaves running until this process exits; they then exit on
    their own, after it, as orphans someone else must reap. The server calls this once its
    pools are stopped; for library users it runs at interpreter exit (see the README), never
    at ``Pool.shutdown()``, since other pools of the process may use them later. A helper
    that does not stop within ``timeout`` seconds (something else holds its pipe) is left
    alone. True when none is left running.
    """
    global _helpers_stuck
    if _helpers_stuck:  # an earlier attempt is still blocked: waiting again would not help
        return False
    with _atexit_lock:
        if any(not supervisor.join(timeout=0) for supervisor in list(_running)):
            return False
    if multiprocessing.active_children():
        return False
    try:
        from multiprocessing import forkserver, resource_tracker
    except ImportError:  # no fork server on this platform
        return True
    stops = [  # the fork server first: it and its children hold the tracker's pipe too
        getattr(forkserver._forkserver, "_stop", None),
        getattr(resource_tracker._resource_tracker, "_stop", None),
    ]

    def stop_all() -> None:
        for stop in stops:
            if stop is not None:
                with contextlib.suppress(Exception):
                    stop()  # closes its pipe, then waitpid(): it exits on EOF

    thread = threading.Thread(target=stop_all, name=f"{THREAD_PREFIX}stop-helpers")
    thread.daemon = True
    try:
        thread.start()
    except RuntimeError:  # no new threads this late in interpreter shutdown
        stop_all()
        return True
    thread.join(timeout)
    _helpers_stuck = thread.is_alive()
    return not _helpers_stuck
