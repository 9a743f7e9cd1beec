"""The deadline index: earliest first, settled requests skipped, the heap kept small."""

from __future__ import annotations

from modelpool._deadlines import Deadlines
from modelpool._requests import Request


def _req(rid: int, deadline: float) -> Request:
    return Request(rid, deadline)


def test_expired_returns_due_requests_in_deadline_order_and_only_those() -> None:
    index = Deadlines()
    reqs = {rid: _req(rid, deadline) for rid, deadline in [(1, 5.0), (2, 1.0), (3, 3.0)]}
    added = [index.add(r) for r in reqs.values()]
    assert added == [True, True, False]  # "now the earliest": the loop must wake sooner
    assert index.next_due() == 1.0
    assert [r.id for r in index.expired(2.999)] == [2]
    assert [r.id for r in index.expired(3.0)] == [3]  # a deadline is due at its own instant
    assert index.next_due() == 5.0
    assert len(index) == 1
    assert [r.id for r in index.expired(10.0)] == [1]
    assert index.next_due() is None
    assert len(index) == 0


def test_settled_requests_are_skipped() -> None:
    index = Deadlines()
    discarded, answered, live = _req(1, 1.0), _req(2, 1.0), _req(3, 1.0)
    for r in (discarded, answered, live):
        index.add(r)
    index.discard(discarded.id)
    answered.future.set_result(None)
    assert index.expired(2.0) == [live]


def test_the_heap_is_compacted_when_mostly_settled() -> None:
    index = Deadlines()
    for rid in range(1, 1001):
        index.add(_req(rid, float(rid)))
        index.discard(rid)  # answered before its deadline, as nearly all are
    index.add(_req(5000, 5000.0))
    assert index.expired(0.0) == []
    assert index.heap_size() == 1  # not 1001: answered requests do not pile up
    assert [r.id for r in index.expired(5000.0)] == [5000]
