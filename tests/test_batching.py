"""The batcher's pure logic, with an explicit clock: exact and fast."""

from __future__ import annotations

import numpy as np
import pytest

from modelpool._batching import BatchError, Item, merge, select, signature, split


def req(rows: int, arrival: float = 0.0, dtype: str = "float32", width: int = 4) -> Item:
    inputs = {"x": np.zeros((rows, width), dtype=dtype)}
    sig, n = signature(inputs)
    return Item(arrival=arrival, rows=n, signature=sig, ref=inputs)


def test_signature_separates_dtype_and_trailing_shape() -> None:
    a, _ = signature({"x": np.zeros((2, 4), np.float32)})
    assert a == signature({"x": np.zeros((7, 4), np.float32)})[0]
    assert a != signature({"x": np.zeros((2, 4), np.float64)})[0]
    assert a != signature({"x": np.zeros((2, 5), np.float32)})[0]
    assert a != signature({"x": np.zeros((2, 4), np.float32), "y": np.zeros((2,))})[0]
    assert signature({"x": np.zeros((3, 4)), "y": np.zeros((2, 4))}) == (None, 1)
    assert signature(np.zeros(3)) == (None, 1)
    assert signature({"x": np.float32(1)}) == (None, 1)


def test_waits_for_a_fuller_batch_until_the_delay() -> None:
    queue = [req(1, arrival=10.0), req(1, arrival=10.001)]
    batch, wake = select(queue, now=10.002, max_batch_size=8, max_batch_delay=0.005)
    assert batch == []
    assert wake == pytest.approx(10.005)
    batch, wake = select(queue, now=10.005, max_batch_size=8, max_batch_delay=0.005)
    assert batch == queue
    assert wake is None


def test_full_batch_goes_at_once() -> None:
    queue = [req(3, arrival=0.0), req(3, arrival=0.0), req(2, arrival=0.0), req(1)]
    batch, wake = select(queue, now=0.0, max_batch_size=8, max_batch_delay=1.0)
    assert batch == queue[:3]
    assert sum(i.rows for i in batch) == 8
    assert wake is None


def test_incompatible_requests_never_mix_and_the_oldest_goes_first() -> None:
    a, b, c = req(1, dtype="float64"), req(1), req(1, dtype="float64")
    batch, _ = select([a, b, c], now=1.0, max_batch_size=8, max_batch_delay=0.0)
    assert batch == [a, c]  # b waits its turn; the head (a) is never passed over
    batch, _ = select([b], now=1.0, max_batch_size=8, max_batch_delay=0.0)
    assert batch == [b]


def test_a_request_that_does_not_fit_waits_for_the_next_batch() -> None:
    a, b, c = req(5), req(5), req(3)
    batch, _ = select([a, b, c], now=0.0, max_batch_size=8, max_batch_delay=0.0)
    assert batch == [a, c]


def test_oversized_request_runs_alone_and_whole() -> None:
    big, small = req(20), req(1)
    batch, wake = select([big, small], now=0.0, max_batch_size=8, max_batch_delay=1.0)
    assert batch == [big]
    assert wake is None


def test_unbatchable_request_runs_alone() -> None:
    odd = Item(arrival=0.0, rows=1, signature=None)
    batch, _ = select([odd, req(1)], now=0.0, max_batch_size=8, max_batch_delay=1.0)
    assert batch == [odd]


def test_dead_requests_are_skipped() -> None:
    dead, live = req(1), req(1, arrival=5.0)
    batch, wake = select(
        [dead, live], now=5.0, max_batch_size=8, max_batch_delay=1.0, is_live=lambda i: i is live
    )
    assert batch == []
    assert wake == 6.0  # the delay counts from the oldest *live* request


def test_empty_queue() -> None:
    assert select([], now=0.0, max_batch_size=8, max_batch_delay=1.0) == ([], None)


def test_merge_and_split_round_trip() -> None:
    parts = [{"x": np.full((n, 2), n, np.float32)} for n in (1, 3, 2)]
    merged = merge(parts)
    assert merged["x"].shape == (6, 2)
    answers = split({"y": merged["x"] * 10}, [1, 3, 2], "M")
    for part, answer in zip(parts, answers, strict=True):
        np.testing.assert_array_equal(answer["y"], part["x"] * 10)


@pytest.mark.parametrize(
    ("outputs", "match"),
    [
        ({"y": np.zeros((5, 2))}, r"output 'y' as shape \[5, 2\] for a batch of 6 rows"),
        ({"y": np.float32(1)}, "first dimension"),
        (np.zeros((6, 2)), "returned ndarray"),
    ],
)
def test_split_rejects_outputs_without_one_row_per_input(outputs: object, match: str) -> None:
    with pytest.raises(BatchError, match=match):
        split(outputs, [1, 3, 2], "M")
