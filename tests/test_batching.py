"""Dynamic batching (``_batching``): which queued requests run together, first as pure
logic with an explicit clock (exact and fast), then with real workers: batching,
backpressure, deadlines and callers that give up."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import modelpool
from _models import BatchProbe, Crashy, Gate, Journal, Limited, WrongRows, wait_for_path
from _waiting import until
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


# ------------------------------------------ with real workers: batching, backpressure and deadlines


def _gather(pool: modelpool.Pool, inputs: list[dict[str, np.ndarray]], **kw: float) -> list:
    async def run() -> list:
        return await asyncio.gather(*(pool.apredict(x, **kw) for x in inputs))

    return asyncio.run(run())


def test_concurrent_requests_are_batched_and_split_back() -> None:
    inputs = [{"x": np.full((1, 3), i, np.float32)} for i in range(16)]
    with modelpool.Pool(BatchProbe, max_batch_size=8, max_batch_delay=0.05) as pool:
        outs = _gather(pool, inputs)
        batch_sizes = pool.stats().batch_sizes
    assert sum(rows * n for rows, n in batch_sizes.items()) == 16
    assert max(batch_sizes) > 1
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out["y"], np.full((1, 3), 2 * i, np.float32))
        assert out["y"].flags.writeable
    sizes = [int(out["batch"][0]) for out in outs]
    assert max(sizes) > 1, sizes
    assert all(s <= 8 for s in sizes)


def test_requests_of_different_shapes_or_dtypes_never_mix() -> None:
    inputs = []
    for i in range(12):
        dtype = np.float32 if i % 2 else np.float64
        width = 3 if i % 3 else 4
        inputs.append({"x": np.full((1, width), i, dtype)})
    with modelpool.Pool(BatchProbe, max_batch_size=16, max_batch_delay=0.05) as pool:
        outs = _gather(pool, inputs)
    for x, out in zip(inputs, outs, strict=True):
        assert out["dtype"][0] == x["x"].dtype.str  # the whole batch had this dtype
        assert out["y"].shape == x["x"].shape


def test_a_request_bigger_than_max_batch_size_runs_alone_and_whole() -> None:
    with modelpool.Pool(BatchProbe, max_batch_size=4, max_batch_delay=0.01) as pool:
        out = pool.predict({"x": np.ones((10, 2), np.float32)})
    assert out["y"].shape == (10, 2)
    assert int(out["batch"][0]) == 10


def test_model_declared_limit_is_respected() -> None:
    with modelpool.Pool(Limited, max_batch_size=64, max_batch_delay=0.02) as pool:
        with pytest.raises(modelpool.InputValidationError, match="at most 4 rows"):
            pool.predict({"x": np.ones((5, 2))})
        outs = _gather(pool, [{"x": np.ones((1, 2))} for _ in range(12)])
    assert max(int(o["n"][0]) for o in outs) <= 4


def test_wrong_output_rows_is_a_clear_error_and_the_pool_keeps_serving() -> None:
    with modelpool.Pool(WrongRows, max_batch_size=8, max_batch_delay=0.05) as pool:

        async def run() -> list:
            return await asyncio.gather(
                *(pool.apredict({"x": np.ones((1, 2))}) for _ in range(4)),
                return_exceptions=True,
            )

        results = asyncio.run(run())
        errors = [r for r in results if isinstance(r, Exception)]
        assert errors, results
        for err in errors:
            assert isinstance(err, ValueError)
            assert "'WrongRows'" in str(err)
            assert "first dimension must equal the batch size" in str(err)
        alone = pool.predict({"x": np.ones((3, 2))})  # alone, no split: the model's own answer
        assert alone["y"].shape == (2, 2)


def test_batching_off_by_default_and_fifo(tmp_path: Path) -> None:
    """Six requests queued behind a held worker: without ``max_batch_size`` each runs alone,
    in the order they arrived."""
    gate, journal = tmp_path / "gate", tmp_path / "journal"
    with modelpool.Pool(Journal, options={"path": str(journal)}) as pool:

        async def run() -> list:
            blocker = asyncio.wrap_future(pool.submit(wait_for_path, str(gate)))
            await until(lambda: pool.stats().in_flight == 1, 60, "the worker to be held")
            calls = []
            for i in range(6):
                x = {"x": np.full((1, 1), i, np.float32)}
                calls.append(asyncio.ensure_future(pool.apredict(x)))
                await until(lambda i=i: pool.stats().queued == i + 1, 60, f"request {i} to queue")
            gate.touch()
            assert await blocker is True
            return await asyncio.gather(*calls)

        outs = asyncio.run(run())
    assert [float(o["y"][0, 0]) for o in outs] == [2.0 * i for i in range(6)]
    assert journal.read_text().splitlines() == [f"{i} 1" for i in range(6)]


def test_overload_is_refused_at_once(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with modelpool.Pool(Crashy, max_queue=2) as pool:
        blocker = pool.submit(wait_for_path, str(gate))  # holds the only worker until opened
        queued = [pool.submit(time.sleep, 0) for _ in range(2)]
        started = time.monotonic()
        with pytest.raises(modelpool.PoolOverloadedError, match="max_queue=2"):
            pool.predict({})
        # refused in the caller, in milliseconds; a call that waited for room would wait for
        # the gate, which opens only below
        assert time.monotonic() - started < 1.0
        gate.touch()
        assert blocker.result(timeout=60) is True
        assert [f.result(timeout=60) for f in queued] == [None, None]
        assert pool.predict({})["pid"] > 0  # room again


def test_cancelled_queued_request_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    gate = tmp_path / "gate"

    async def run() -> None:
        with modelpool.Pool(Crashy, workers=1) as pool:
            # holds the only worker until the gate opens, so ``doomed`` stays queued
            blocker = asyncio.wrap_future(pool.submit(wait_for_path, str(gate)))
            doomed = asyncio.ensure_future(pool.apredict({"die_once": str(marker)}))
            await until(lambda: pool.stats().queued == 1, 60, "the request to queue")
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
            gate.touch()
            assert await blocker is True
            # one worker, a FIFO queue: had ``doomed`` stayed queued, it would run first
            assert (await pool.apredict({}))["pid"] > 0

    asyncio.run(run())
    assert not marker.exists()


def test_a_member_timing_out_inside_a_batch_disturbs_no_one(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    # the four requests fill a batch by rows, so they run together however slowly they arrive
    pool = modelpool.Pool(Gate, options={"path": str(gate)}, max_batch_size=4, max_batch_delay=30.0)
    with pool:

        async def run() -> list:
            slow = {"x": np.full((1, 1), -1, np.float32)}  # the batch waits for the gate
            # 2 s: the batch surely starts before this member's deadline (it leaves in
            # milliseconds), and the gate stays shut until the member has timed out
            first = asyncio.ensure_future(pool.apredict(slow, timeout=2.0))
            calls = [pool.apredict({"x": np.ones((1, 1), np.float32)}) for _ in range(3)]
            others = asyncio.ensure_future(asyncio.gather(*calls, return_exceptions=True))
            results = [(await asyncio.gather(first, return_exceptions=True))[0]]
            assert not others.done()
            gate.touch()
            return results + list(await others)

        pid = pool.stats().workers[0].pid
        results = asyncio.run(run())
        assert isinstance(results[0], modelpool.RequestTimeoutError)
        assert "in a batch" in str(results[0])
        for r in results[1:]:
            assert not isinstance(r, Exception), r
        assert pool.stats().workers[0].pid == pid  # not killed: others still wanted the answer


def test_a_crash_fails_every_member_of_the_batch_with_a_clear_error() -> None:
    with modelpool.Pool(Crashy, max_batch_size=8, max_batch_delay=0.05) as pool:

        async def run() -> list:
            return await asyncio.gather(
                *(pool.apredict({"die": np.array(["sigkill"])}) for _ in range(3)),
                return_exceptions=True,
            )

        results = asyncio.run(run())
        assert all(isinstance(r, modelpool.WorkerCrashedError) for r in results), results
        assert pool.predict({})["pid"] > 0


def test_a_hung_batch_is_killed_once_every_member_timed_out() -> None:
    # the three requests fill a batch by rows: they run together however slowly they arrive
    with modelpool.Pool(BatchProbe, max_batch_size=3, max_batch_delay=30.0) as pool:
        pid = pool.stats().workers[0].pid
        hung = {"x": np.full((1, 1), -600, np.float32)}  # the batch sleeps a minute

        async def run() -> list:
            # 1 s: the batch surely starts (in milliseconds) before the members' deadlines
            return await asyncio.gather(
                *(pool.apredict(hung, timeout=1.0) for _ in range(3)), return_exceptions=True
            )

        results = asyncio.run(run())
        assert all(isinstance(r, modelpool.RequestTimeoutError) for r in results), results
        assert all("in a batch" in str(r) for r in results), results
        # the hung worker was killed and replaced: serving again well before the batch's
        # minute would end (the timeout covers the replacement's start; three rows: a full
        # batch, which does not wait out the delay)
        out = pool.predict({"x": np.ones((3, 1), np.float32)}, timeout=30)
        assert out["y"][0, 0] == 2
        assert pool.stats().workers[0].pid != pid


def test_a_lone_request_that_hangs_is_killed_like_without_batching() -> None:
    with modelpool.Pool(BatchProbe, max_batch_size=8, max_batch_delay=0.01) as pool:
        pid = pool.stats().workers[0].pid
        with pytest.raises(modelpool.RequestTimeoutError, match="killed"):  # so it ran
            # 1 s: it surely leaves the queue (after the 10 ms batch delay) before then
            pool.predict({"x": np.full((1, 1), -600, np.float32)}, timeout=1.0)
        # the batch would sleep a minute: serving again well before proves it was killed
        assert pool.predict({"x": np.ones((1, 1), np.float32)}, timeout=30)["y"][0, 0] == 2
        assert pool.stats().workers[0].pid != pid


def test_a_batch_full_by_rows_goes_without_waiting_for_the_delay() -> None:
    with modelpool.Pool(BatchProbe, max_batch_size=8, max_batch_delay=30.0) as pool:

        async def run() -> list:
            first = asyncio.ensure_future(pool.apredict({"x": np.ones((4, 1), np.float32)}))
            await until(lambda: pool.stats().queued == 1, 60, "half a batch to wait")
            second = pool.apredict({"x": np.ones((4, 1), np.float32)})
            return await asyncio.gather(first, second)

        started = time.monotonic()
        outs = asyncio.run(run())
        assert time.monotonic() - started < 10  # milliseconds expected; not the 30 s delay
        assert [int(o["batch"][0]) for o in outs] == [8, 8]


def test_batch_error_is_public_and_a_value_error() -> None:
    assert issubclass(modelpool.BatchError, ValueError)
    assert issubclass(modelpool.BatchError, modelpool.ModelpoolError)


def test_batched_requests_leave_no_reference_cycles() -> None:
    """A finished batch must be freed by reference counting: cycles left per request make
    the garbage collector pause the caller's event loop for tens of milliseconds."""
    import gc

    x = {"x": np.ones((1, 3), np.float32)}

    async def run(pool: modelpool.Pool) -> list[str]:
        await asyncio.gather(*(pool.apredict(x) for _ in range(32)))  # warm up
        gc.collect()
        # Objects alive now are not these requests': garbage of an earlier test whose last
        # reference goes while these requests run is not theirs to answer for.
        earlier = {id(o) for o in gc.get_objects()}
        gc.disable()
        try:
            for _ in range(5):
                await asyncio.gather(*(pool.apredict(x) for _ in range(32)))
            gc.set_debug(gc.DEBUG_SAVEALL)  # keep what the collection finds, to look at it
            gc.collect()
            return [type(o).__name__ for o in gc.garbage if id(o) not in earlier]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()

    with modelpool.Pool(BatchProbe, max_batch_size=8, max_batch_delay=0.01) as pool:
        assert asyncio.run(run(pool)) == []
        assert max(pool.stats().batch_sizes) > 1


# ---------------------------------------------------------------- abandoned requests (issue 10)
#
# Callers that give up before their answer (an HTTP client hanging up, a cancelled task, a
# cancelled future, a deadline) leave settled entries in the queue. The next live request must
# still be answered within the batch delay plus its service time, never wait for a full batch.


async def _hold_both_workers(pool: modelpool.Pool) -> list[asyncio.Task[Any]]:
    """Occupy both workers with requests that wait on the gate (different widths: two
    batches, so one per worker)."""
    loop = asyncio.get_running_loop()
    held = [loop.create_task(pool.apredict({"x": np.full((1, w), -1, np.float32)})) for w in (3, 4)]
    await until(lambda: pool.stats().in_flight == 2, 60, "both workers to be busy")
    return held


ABANDON = ["apredict-cancelled", "future-cancelled", "deadline"]


def _gated_batching_pool(tmp_path: Path) -> tuple[modelpool.Pool, Path]:
    """Two workers, batches of up to 32 rows after 5 ms; the gate file (not yet there) holds
    any request with a negative input."""
    gate = tmp_path / "open"
    pool = modelpool.Pool(
        Gate, workers=2, options={"path": str(gate)}, max_batch_size=32, max_batch_delay=0.005
    )
    return pool, gate


@pytest.mark.parametrize("how", ABANDON)
def test_abandoned_requests_never_wedge_the_batch_queue(tmp_path: Path, how: str) -> None:
    pool, gate = _gated_batching_pool(tmp_path)
    with pool:

        async def scenario() -> float:
            loop = asyncio.get_running_loop()
            held = await _hold_both_workers(pool)
            x = {"x": np.ones((1, 3), np.float32)}
            for _burst in range(3):  # bursts of clients that hang up
                if how == "apredict-cancelled":
                    tasks = [loop.create_task(pool.apredict(x)) for _ in range(10)]
                    await until(lambda: pool.stats().queued >= 10, 60, "the burst to queue")
                    for task in tasks:
                        task.cancel()
                    for task in tasks:
                        with pytest.raises(asyncio.CancelledError):
                            await task
                elif how == "future-cancelled":
                    futures = [pool.submit(abs, -1) for _ in range(10)]
                    assert all(f.cancel() for f in futures)
                else:  # timed out while queued
                    tasks = [loop.create_task(pool.apredict(x, timeout=0.05)) for _ in range(10)]
                    for task in tasks:
                        with pytest.raises(modelpool.RequestTimeoutError):
                            await task
            gate.touch()
            await asyncio.gather(*held)
            await until(lambda: pool.stats().in_flight == 0, 60, "both workers to be idle")
            t0 = time.monotonic()
            out = await asyncio.wait_for(pool.apredict(x), timeout=30)
            elapsed = time.monotonic() - t0
            np.testing.assert_array_equal(out["y"], x["x"] * 2)
            return elapsed

        elapsed = asyncio.run(scenario())
        assert pool.stats().queued == 0
    # batch delay (5 ms) plus one tiny predict; a wedged queue answers never (or seconds late)
    assert elapsed < 1.0, f"a live request behind abandoned ones took {elapsed:.2f} s"


def test_abandoned_requests_do_not_delay_a_full_batch_count(tmp_path: Path) -> None:
    """Abandoned rows must not count towards a 'full batch' either: a live request behind
    31 cancelled ones still waits only its own batch delay, and runs alone."""
    pool, gate = _gated_batching_pool(tmp_path)
    with pool:

        async def scenario() -> dict:
            loop = asyncio.get_running_loop()
            held = await _hold_both_workers(pool)
            x = {"x": np.ones((1, 3), np.float32)}
            tasks = [loop.create_task(pool.apredict(x)) for _ in range(31)]
            await until(lambda: pool.stats().queued >= 31, 60, "the burst to queue")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            live = loop.create_task(pool.apredict(x))
            await until(lambda: pool.stats().queued >= 1, 60, "the live request to queue")
            gate.touch()
            await asyncio.gather(*held)
            return await asyncio.wait_for(live, timeout=30)

        out = asyncio.run(scenario())
        sizes = pool.stats().batch_sizes
    np.testing.assert_array_equal(out["y"], np.full((1, 3), 2, np.float32))
    assert 31 not in sizes, sizes  # cancelled rows never ran
    assert 32 not in sizes, sizes
