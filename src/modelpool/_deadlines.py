"""The deadline index: which unsettled requests have a deadline, earliest first.

A heap of ``(deadline, request id)`` beside a dict of the requests still waiting for theirs.
Settling a request only removes it from the dict (``discard``: one dict operation, safe from
any thread without the supervisor's lock); its heap entry is skipped when it comes up, and the
heap is rebuilt once it is mostly such leftovers. Everything else requires the supervisor's
lock. Pure bookkeeping: what a missed deadline means is the supervisor's business.
"""

from __future__ import annotations

import heapq

from ._requests import Request

__all__ = ["Deadlines"]

#: Leftover heap entries tolerated before the heap is rebuilt (beyond twice the live ones).
_SLACK = 64


class Deadlines:
    """Requests by deadline. See the module docstring for the locking rules."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []  # (deadline, request id), lazily pruned
        self._timed: dict[int, Request] = {}  # unsettled requests that have a deadline

    def __len__(self) -> int:
        return len(self._timed)

    def add(self, req: Request) -> bool:
        """Track ``req`` (it has a deadline); True when it is now the earliest one."""
        assert req.deadline is not None
        self._timed[req.id] = req
        heapq.heappush(self._heap, (req.deadline, req.id))
        return self._heap[0][1] == req.id

    def discard(self, rid: int) -> None:
        """Forget request ``rid`` (settled). Safe without the lock."""
        self._timed.pop(rid, None)

    def expired(self, now: float) -> list[Request]:
        """Remove and return the tracked requests whose deadline is ``now`` or earlier, in
        deadline order. The caller decides what each one's failure is."""
        if len(self._heap) > _SLACK + 2 * len(self._timed):  # mostly settled: compact
            snapshot = list(self._timed.items())  # one C call: callers discard unlocked
            self._heap = [(r.deadline or 0.0, i) for i, r in snapshot]
            heapq.heapify(self._heap)
        out = []
        while self._heap and self._heap[0][0] <= now:
            _, rid = heapq.heappop(self._heap)
            req = self._timed.pop(rid, None)
            if req is not None and not req.future.done():
                out.append(req)
        return out

    def next_due(self) -> float | None:
        """The earliest deadline still in the heap (perhaps of a settled request: waking
        for it early only costs a look), or None."""
        return self._heap[0][0] if self._heap else None

    def heap_size(self) -> int:
        """Entries in the heap, leftovers included (for tests of the compaction)."""
        return len(self._heap)
