"""Console output that must never stop the server or a worker.

``modelpool serve 2>&1 | head -4``: once ``head`` exits, every write to the pipe fails with
EPIPE (Python ignores SIGPIPE, so it is ``BrokenPipeError``). A write that raises inside a
signal handler would swallow the stop request; one that raises while loading or in the drain
would turn a working server into a crash; and data left in ``sys.stderr``'s buffer makes the
interpreter exit with status 120 when it flushes at exit. So the first failed write points
that descriptor (and any standard stream on the same pipe or file) at ``/dev/null``: later
writes, log lines and the final flush all succeed, and nobody reads them anyway.

Workers write to the same pipe (a model's ``print``, a library's warning): ``guard_std_streams``
makes their ``sys.stdout`` and ``sys.stderr`` follow the same rule, so a closed reader never
fails a request.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import IO

__all__ = ["Output", "guard_std_streams", "settle_std_streams"]


class Output:
    """Write-only text output that never raises; after one failure it drops what it gets."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lost = False

    def write(self, text: str) -> None:
        if self.lost:
            return
        try:
            self.stream.write(text)
        except (OSError, ValueError) as exc:
            self._failed(exc)

    def flush(self) -> None:
        if self.lost:
            return
        try:
            self.stream.flush()
        except (OSError, ValueError) as exc:
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        """A reader that went away (EPIPE), or a closed file: drop everything from now on.
        Anything else (a full non-blocking pipe, ENOSPC, EIO) loses this write only."""
        if _gone(exc):
            self._lose()

    def isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (OSError, ValueError):
            return False

    def _lose(self) -> None:
        self.lost = True
        _silence(self.stream)


def _silence(stream: IO[str]) -> None:
    """Point ``stream``'s descriptor, and the standard streams sharing its file, at /dev/null,
    then drop whatever the stream still buffers (it goes to /dev/null)."""
    try:
        fd = stream.fileno()
        target = os.fstat(fd)
    except (OSError, ValueError):  # no descriptor (StringIO) or already closed
        return
    streams = [stream]
    for std in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if std is None or any(std is s for s in streams):
            continue
        with contextlib.suppress(OSError, ValueError):
            st = os.fstat(std.fileno())
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                streams.append(std)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        for s in streams:
            with contextlib.suppress(OSError, ValueError):
                os.dup2(devnull, s.fileno())
    finally:
        os.close(devnull)
    for s in streams:
        with contextlib.suppress(OSError, ValueError):
            s.flush()


def settle_std_streams() -> None:
    """Flush stdout and stderr now, so that a reader that went away cannot turn the exit
    status into 120 when the interpreter flushes them at exit."""
    for std in (sys.stdout, sys.stderr):
        if std is None:
            continue
        try:
            std.flush()
        except (OSError, ValueError):
            _silence(std)


def _gone(exc: BaseException) -> bool:
    """The output will never be read again: its reader exited, or the file is closed."""
    if isinstance(exc, BrokenPipeError | ConnectionResetError | ValueError):
        return True
    return isinstance(exc, OSError) and exc.errno == errno.EBADF


class _Guarded:
    """A text stream whose ``write`` and ``flush`` never raise for a reader that went away;
    everything else is the wrapped stream's."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (BrokenPipeError, ConnectionResetError):
            _silence(self._stream)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (BrokenPipeError, ConnectionResetError):
            _silence(self._stream)

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def guard_std_streams() -> None:
    """Make ``sys.stdout`` and ``sys.stderr`` survive a reader that went away (in a worker)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _Guarded):
            setattr(sys, name, _Guarded(stream))
