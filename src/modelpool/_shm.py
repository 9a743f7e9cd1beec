"""Shared-memory arenas: how large buffers cross between the pool and a worker.

Each worker has two arenas, one per direction. An arena is an anonymous ``memfd`` (Linux) that
the parent creates when it starts the worker and both sides map once. It has no name, so it
cannot leak: the kernel frees it when the last process holding it exits, however it exits.

The *writer* of an arena allocates a region, copies a buffer into it and sends only its offset.
The *reader* builds its arrays directly over the region (no copy) and tracks, with a weak
reference, when the last array over a region dies; it then reports the region released on its
next message and only then may the writer reuse it. So the receiver owns what it receives: no
one writes to memory under an array that is still alive. Pages are reused, which matters: on
virtual machines fresh pages cost ~10x a copy to fault in.

The arena grows (``ftruncate`` + a new mapping) when a message needs more room; old mappings
stay alive as long as arrays over them do.
"""

from __future__ import annotations

import bisect
import collections
import mmap
import os
import weakref
from multiprocessing import reduction
from typing import Any

import numpy as np

__all__ = ["ALIGN", "THRESHOLD", "Arena", "FdHandle", "arenas_supported"]

#: Buffers at least this large travel through shared memory; smaller ones through the pipe.
THRESHOLD = 64 * 1024
#: Region alignment (a cache line; also keeps any dtype aligned).
ALIGN = 64
_GROW_QUANTUM = 1 << 20


def arenas_supported() -> bool:
    return hasattr(os, "memfd_create")


class FdHandle:
    """A file descriptor to hand to a worker process at start.

    Under spawn/forkserver it is duplicated into the child like a ``Connection``'s handle;
    under fork the child inherits the same number.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_fd, (reduction.DupFd(self.fd),))


def _rebuild_fd(dup: Any) -> FdHandle:
    return FdHandle(dup.detach())


class _Region(np.ndarray):
    """A slice of an arena; its lifetime tells when the reader is done with the memory."""


class Arena:
    """One direction of shared memory between the pool and one worker (see module doc)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._size = os.fstat(fd).st_size
        self._map: mmap.mmap | None = None
        self._view: np.ndarray[Any, Any] | None = None
        # writer side: sorted (offset, end) of allocated regions
        self._starts: list[int] = []
        self._ends: dict[int, int] = {}
        # reader side: offsets whose last array died, to report to the writer
        self.released: collections.deque[int] = collections.deque()
        self._watch: dict[int, weakref.ref[Any]] = {}

    @classmethod
    def create(cls, label: str) -> Arena:
        return cls(os.memfd_create(f"modelpool-{label}", os.MFD_CLOEXEC))

    @property
    def size(self) -> int:
        return self._size

    def close(self) -> None:
        """Close the descriptor and drop our mapping (arrays still over it keep it alive)."""
        self._view = None
        self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ------------------------------------------------------------------ both sides

    def _remap(self, size: int) -> np.ndarray[Any, Any]:
        if self._view is None or self._view.nbytes < size:
            self._map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
            self._view = np.frombuffer(self._map, dtype=np.uint8)
        return self._view

    # ------------------------------------------------------------------ writer side

    def write(self, raw: memoryview) -> int:
        """Copy ``raw`` into a free region; return its offset."""
        n = raw.nbytes
        offset = self._allocate(n)
        view = self._remap(self._size)
        dst = view[offset : offset + n]
        np.copyto(dst, np.frombuffer(raw, dtype=np.uint8))
        return offset

    def _allocate(self, n: int) -> int:
        n = max(ALIGN, -(-n // ALIGN) * ALIGN)
        cursor = 0
        for start in self._starts:  # first fit between allocated regions
            if start - cursor >= n:
                break
            cursor = max(cursor, self._ends[start])
        if cursor + n > self._size:
            self._grow(cursor + n)
        bisect.insort(self._starts, cursor)
        self._ends[cursor] = cursor + n
        return cursor

    def _grow(self, needed: int) -> None:
        size = max(needed, 2 * self._size)
        size = -(-size // _GROW_QUANTUM) * _GROW_QUANTUM
        os.ftruncate(self.fd, size)
        self._size = size

    def free(self, offset: int) -> None:
        """The reader is done with the region at ``offset``."""
        if self._ends.pop(offset, None) is not None:
            i = bisect.bisect_left(self._starts, offset)
            del self._starts[i]

    def allocated(self) -> int:
        return sum(end - start for start, end in self._ends.items())

    # ------------------------------------------------------------------ reader side

    def read(self, offset: int, n: int, writer_size: int) -> memoryview:
        """A writable buffer over the region; ``released`` learns when its last user dies."""
        if writer_size > self._size:
            self._size = writer_size
        view = self._remap(self._size)
        region = view[offset : offset + max(n, 1)].view(_Region)
        watch, released = self._watch, self.released

        def done(_: object, offset: int = offset) -> None:
            watch.pop(offset, None)
            released.append(offset)

        watch[offset] = weakref.ref(region, done)
        return memoryview(region)[:n]  # type: ignore[arg-type]
