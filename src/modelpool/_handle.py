"""The parent's handle on one worker process: start it, describe how it ended, read its memory.

A handle wraps a ``multiprocessing`` process (composition, not a subclass) with the channel to
it, the write end of its lifeline, and the facts the supervisor tracks. Which state a worker is
in and what happens next is the supervisor's business, not this module's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
from collections.abc import Iterator
from multiprocessing.context import BaseContext
from typing import Any, Protocol

import psutil

from . import _shm, _transport
from ._hygiene import THREAD_PREFIX
from ._worker import EXIT_TRANSPORT, WorkerSpec, run_worker

__all__ = [
    "BUSY",
    "IDLE",
    "STARTING",
    "STOPPING",
    "WorkerHandle",
    "WorkerStats",
    "describe_exit",
    "launch",
    "private_memory",
    "rss",
]

STARTING, IDLE, BUSY, STOPPING = "starting", "idle", "busy", "stopping"


class Assigned(Protocol):
    """What a handle knows of the request it runs (a ``_requests.Request``; this module sits
    below that one and does not import it)."""

    id: int
    counted: bool

    @property
    def members(self) -> tuple[Any, ...]: ...


@dataclasses.dataclass
class WorkerStats:
    """One worker as ``Pool.stats()`` reports it. Also readable as a mapping (``s["pid"]``)."""

    index: int
    generation: int
    pid: int | None
    state: str
    served: int
    restarts: int
    last_exit: str | None
    rss: int | None
    busy_for: float | None = None  # seconds the current request has been running

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


class WorkerHandle:
    """Parent-side handle of one worker process (composition, not a Process subclass)."""

    def __init__(
        self,
        index: int,
        generation: int,
        process: Any,
        channel: _transport.Channel,
        lifeline: Any,
    ) -> None:
        self.index = index
        self.generation = generation
        self.process = process
        self.channel = channel
        self.watched = False  # the supervisor's selector reads this worker's answers
        self.reader_active = False  # a caller thread is reading this worker's answer
        self.loop_watched = False  # an attached event loop reads its answers (``_loopside``)
        self.users = 0  # threads holding the channel (writing or reading); close waits for 0
        self.idle_since = 0.0  # when it last became idle (for scaling down)
        self.exited = False
        self.exit_deferred_at: float | None = None  # its exit waits for the loop to read the rest
        self.exit_drained = False  # the loop has read it
        self.lifeline = lifeline  # write end; closing it (or our death) tells the worker to exit
        self.pid: int | None = process.pid
        self.state = STARTING
        self.request: Assigned | None = None
        self.busy_since = 0.0
        self.served = 0
        self.limit: int | None = None  # recycle after this many requests
        self.retiring = False
        self.lane = 0  # WorkerInfo.lane: distinct among the live processes of its slot
        # retiring, and its replacements kept failing while it ran: it stops without one, and
        # the slot is loaded again once it is gone (``Supervisor._count_setup_failure``)
        self.stop_unreplaced = False
        self.deadline: float | None = None  # setup or stop deadline
        self.setup_error: BaseException | None = None
        self.kill_reason: str | None = None  # set when the pool itself killed the worker
        self.kill_kind = "killed"  # the metrics' label for that: "timeout", "shutdown", ...


_LIKELY = {
    "SIGKILL": "possibly killed by the out-of-memory killer (check `dmesg`), or by kill -9",
    "SIGSEGV": "a segmentation fault in native code (a C extension, a driver, or a library "
    "state that did not survive fork)",
    "SIGBUS": "a bus error in native code, often a memory-mapped file that shrank",
    "SIGABRT": "abort() in native code, usually a failed assertion in a C/C++ library",
    "SIGFPE": "a floating-point exception in native code",
    "SIGILL": "an illegal instruction: a library built for a newer CPU than this one",
    "SIGTERM": "terminated by someone else's SIGTERM",
}


def describe_exit(exitcode: int | None) -> tuple[str, str | None, str]:
    """(short description, signal name or None, likely cause) of a worker's exit code."""
    if exitcode is None:
        return "unknown exit", None, "the exit status could not be read"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}", name, _LIKELY.get(name, "killed by a signal")
    if exitcode == 0:
        return "exited with code 0", None, "the worker process exited on its own"
    if exitcode == EXIT_TRANSPORT:
        return (
            f"exited with code {exitcode}",
            None,
            "the worker could not write its answer to the pool (see its message on stderr); "
            "not the model's doing",
        )
    return (
        f"exited with code {exitcode}",
        None,
        "the model or a library called os._exit() / sys.exit(), or the interpreter failed",
    )


def launch(ctx: BaseContext, spec: WorkerSpec) -> WorkerHandle:
    """Start one worker process for ``spec`` and return its handle (state STARTING).

    On any failure everything made so far is closed again: no descriptor leaks.
    """
    made: list[Any] = []  # what to close if we fail
    try:
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        made += [parent_conn, child_conn]
        lifeline_r, lifeline_w = ctx.Pipe(duplex=False)
        made += [lifeline_r, lifeline_w]
        to_worker = to_parent = None
        if _shm.arenas_supported():
            to_worker = _shm.Arena.create(f"w{spec.index}-in")
            made.append(to_worker)
            to_parent = _shm.Arena.create(f"w{spec.index}-out")
            made.append(to_parent)
        process = ctx.Process(  # type: ignore[attr-defined]
            target=run_worker,
            args=(
                spec,
                child_conn,
                lifeline_r,
                to_worker and _shm.FdHandle(to_worker.fd),
                to_parent and _shm.FdHandle(to_parent.fd),
            ),
            name=f"{THREAD_PREFIX}worker-{spec.index}",
            daemon=False,
        )
        with _main_path_workers_can_use(ctx.get_start_method()):
            process.start()
    except BaseException:
        for thing in made:
            with contextlib.suppress(Exception):
                thing.close()
        raise
    child_conn.close()  # the child has its own copies now
    lifeline_r.close()
    channel = _transport.Channel(parent_conn, out_arena=to_worker, in_arena=to_parent)
    handle = WorkerHandle(spec.index, spec.generation, process, channel, lifeline_w)
    handle.lane = spec.lane
    return handle


@contextlib.contextmanager
def _main_path_workers_can_use(method: str) -> Iterator[None]:
    """Hide a ``__main__.__file__`` that names no file while a worker starts.

    Under spawn/forkserver, multiprocessing re-runs the parent's main script in the child (and
    in the fork server) from ``__main__.__file__``. For a script read from standard input that
    is ``'<stdin>'``, and every worker would die at start with FileNotFoundError. Without the
    attribute, multiprocessing skips the step, as it does for ``python -c``.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    spec = getattr(main, "__spec__", None)
    if method == "fork" or path is None or spec is not None or os.path.exists(path):
        yield
        return
    del main.__file__  # type: ignore[union-attr]
    try:
        yield
    finally:
        main.__file__ = path  # type: ignore[union-attr]


def private_memory(pid: int | None) -> int | None:
    """Resident memory of ``pid`` that is its own: RSS minus shared pages (libraries, and the
    shared-memory arenas, which hold the data in flight, not leaks)."""
    if pid is None:
        return None
    try:
        info = psutil.Process(pid).memory_info()
    except (psutil.Error, OSError):
        return None
    return int(info.rss - getattr(info, "shared", 0))


def rss(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.Error, OSError):
        return None
