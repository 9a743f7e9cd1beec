"""Did a process reap its own children before it exited?

A child its parent left behind is re-parented to the nearest "child subreaper", else to
init, which reaps it some time later: the ``<defunct>`` lines seen after a stop. The test
process makes itself the subreaper for the duration of ``orphans_adopted()``, so anything
left behind becomes the test's own child, where it can be seen without racing init.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

_PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        pytest.skip(f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}")


@contextlib.contextmanager
def orphans_adopted(watched: set[int]) -> Iterator[None]:
    """While inside, processes orphaned by our descendants become our children. On the way
    out, those in ``watched`` (pids the test recorded) that we adopted are reaped again."""
    if not sys.platform.startswith("linux"):
        pytest.skip("child subreapers are a Linux feature")
    _set_subreaper(True)
    try:
        yield
    finally:
        _set_subreaper(False)
        deadline = time.monotonic() + 30
        for pid in watched:
            while adopted(pid) and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        break
                time.sleep(0.02)


def adopted(pid: int) -> bool:
    """Is ``pid`` (alive or a zombie) now a child of this process?"""
    try:
        return psutil.Process(pid).ppid() == os.getpid()
    except psutil.NoSuchProcess:
        return False


def left_behind(pids: set[int]) -> dict[int, str]:
    """Of ``pids``, those that still exist (any state, any parent): pid -> description."""
    out = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            out[pid] = f"{proc.status()}, parent {proc.ppid()}: {' '.join(proc.cmdline())[:120]}"
        except psutil.ZombieProcess:
            out[pid] = "zombie"
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied:
            out[pid] = "exists"
    return out


def descendants(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()
