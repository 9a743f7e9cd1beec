"""Streamed predicts (``Pool.stream``, ``_streaming``): a generator ``predict``'s pieces come
back as they are produced, a slow reader holds the generator back, closing the stream runs
its ``finally`` in the worker, and errors, crashes and timeouts end the stream clearly."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import modelpool
from _waiting import wait_for
from modelpool import _streaming


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _read_into(stream: modelpool.PredictStream, got: list[int]) -> None:
    for piece in stream:
        got.append(int(piece["i"][0]))


def _n(n: int, **extra: int) -> dict[str, np.ndarray]:
    return {"n": np.array([n]), **{k: np.array([v]) for k, v in extra.items()}}


def test_pieces_come_as_the_generator_yields_them(tmp_path: Path) -> None:
    log = tmp_path / "log"
    options = {"log": str(log), "pause": 0.05}
    with modelpool.Pool("_stream_models:Counter", workers=1, options=options) as pool:
        stream = pool.stream(_n(20))
        first = next(stream)
        assert first["i"].tolist() == [0]
        assert "finally" not in _lines(log), "the first piece waited for the whole generator"
        rest = [int(piece["i"][0]) for piece in stream]
    assert rest == list(range(1, 20))
    assert _lines(log)[-1] == "finally"


def test_a_slow_reader_holds_the_generator_back(tmp_path: Path) -> None:
    """The worker runs at most ``WINDOW`` pieces ahead of its reader: with one piece read,
    a generator that could yield 1000 pieces at once has yielded ``WINDOW`` + 1."""
    log = tmp_path / "log"
    options = {"log": str(log)}
    with (
        modelpool.Pool("_stream_models:Counter", workers=1, options=options) as pool,
        pool.stream(_n(1000)) as stream,
    ):
        next(stream)
        ahead = _streaming.WINDOW + 1
        wait_for(lambda: len(_lines(log)) >= ahead, 30, "the worker to fill its window")
        time.sleep(0.5)  # (unbounded, it would yield all 1000 in far less)
        assert len(_lines(log)) == ahead, _lines(log)[-3:]
        pieces = [int(p["i"][0]) for p in stream]
    assert pieces == list(range(1, 1000))


def test_closing_the_stream_runs_the_generators_finally_and_keeps_the_worker(
    tmp_path: Path,
) -> None:
    log = tmp_path / "log"
    with modelpool.Pool("_stream_models:Counter", workers=1, options={"log": str(log)}) as pool:
        pid = pool.stats().workers[0].pid
        with pool.stream(_n(1000)) as stream:
            assert [int(next(stream)["i"][0]) for _ in range(2)] == [0, 1]
        wait_for(lambda: "finally" in _lines(log), 30, "the generator's finally to run")
        assert len(_lines(log)) < 1000
        # the same worker serves on, and stale credit it may still get is harmless
        for _ in range(10):
            assert [int(p["i"][0]) for p in pool.stream(_n(3))] == [0, 1, 2]
        assert pool.stats().workers[0].pid == pid
        assert pool.stats().workers[0].restarts == 0


def test_a_stream_closed_while_queued_never_runs(tmp_path: Path) -> None:
    log = tmp_path / "log"
    options = {"log": str(log), "pause": 0.2}
    with modelpool.Pool("_stream_models:Counter", workers=1, options=options) as pool:
        busy = pool.stream(_n(5))
        next(busy)  # the only worker runs it
        queued = pool.stream(_n(5, fail_at=0))  # would fail at once if it ever ran
        queued.close()
        assert [int(p["i"][0]) for p in busy] == [1, 2, 3, 4]
        assert [int(p["i"][0]) for p in pool.stream(_n(2))] == [0, 1]
    assert _lines(log).count("finally") == 2  # busy's and the last one's: not queued's


def test_an_exception_mid_stream_ends_it_after_the_pieces_before(tmp_path: Path) -> None:
    with modelpool.Pool("_stream_models:Counter", workers=1) as pool:
        got: list[int] = []
        with pytest.raises(ValueError, match="piece 2 failed"):
            _read_into(pool.stream(_n(5, fail_at=2)), got)
        assert got == [0, 1]
        assert [int(p["i"][0]) for p in pool.stream(_n(2))] == [0, 1]  # the worker lives


def test_a_crash_mid_stream_fails_it_and_is_not_retried(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with modelpool.Pool(
        "_stream_models:Counter", workers=1, retries=2, options={"log": str(log)}
    ) as pool:
        got: list[int] = []
        with pytest.raises(modelpool.WorkerCrashedError, match="exited with code 9"):
            _read_into(pool.stream(_n(5, crash_at=2)), got)
        assert got == [0, 1]
        assert _lines(log) == ["yielded 0", "yielded 1"]  # run once: its pieces were out
        assert [int(p["i"][0]) for p in pool.stream(_n(2))] == [0, 1]  # a new worker


def _pid(pool: modelpool.Pool) -> int | None:
    return pool.stats().workers[0].pid


def test_the_timeout_covers_the_whole_stream_and_stops_the_generator(tmp_path: Path) -> None:
    """Past its timeout the reader fails at once, and the generator is told to stop as a
    close does: its ``finally`` runs and the worker is kept."""
    log = tmp_path / "log"
    options = {"log": str(log), "pause": 0.1}
    with modelpool.Pool("_stream_models:Counter", workers=1, options=options) as pool:
        pid = _pid(pool)
        with pytest.raises(modelpool.RequestTimeoutError, match="generator was stopped"):
            _read_into(pool.stream(_n(1000), timeout=1.0), [])
        wait_for(lambda: "finally" in _lines(log), 30, "the generator's finally")
        assert len(_lines(log)) < 500
        assert [int(p["i"][0]) for p in pool.stream(_n(2))] == [0, 1]
        assert _pid(pool) == pid  # the same worker


def test_a_stream_stuck_past_its_timeout_loses_its_worker(tmp_path: Path) -> None:
    """A generator stuck between two pieces cannot hear the stop: the reader still fails at
    the timeout, and the worker is killed ``STOP_GRACE`` seconds later and replaced."""
    log = tmp_path / "log"
    with modelpool.Pool("_stream_models:Counter", workers=1, options={"log": str(log)}) as pool:
        pid = _pid(pool)
        got: list[int] = []
        with pytest.raises(modelpool.RequestTimeoutError, match="generator was stopped"):
            _read_into(pool.stream(_n(3, stuck_at=1), timeout=1.0), got)
        assert got == [0]
        assert [int(p["i"][0]) for p in pool.stream(_n(2))] == [0, 1]  # (a new worker)
        assert _pid(pool) != pid
        assert _lines(log)[:2] == ["yielded 0", "yielded 0"]  # (no finally: it was killed)


def test_async_generators_and_async_iteration() -> None:
    async def main(pool: modelpool.Pool) -> list[int]:
        async with pool.stream(_n(6)) as stream:
            return [int(piece["i"][0]) async for piece in stream]

    with modelpool.Pool("_stream_models:AsyncCounter", workers=1) as pool:
        assert asyncio.run(main(pool)) == list(range(6))


def test_on_an_attached_loop_a_crash_comes_after_every_piece_sent_before_it() -> None:
    """The worker writes three pieces and dies at once. Its pipe is read by the event loop
    the pool is attached to, while its exit is seen by the supervisor thread: the crash must
    wait for the loop to read the pieces, or they would be lost (the loop is kept busy
    while the worker dies, as a server's loop is, and it is tried 8 times)."""

    async def read(pool: modelpool.Pool, got: list[int]) -> None:
        async for piece in pool.stream(_n(5, crash_at=3)):
            got.append(int(piece["i"][0]))
            if len(got) == 1:
                time.sleep(0.2)  # the loop is busy (it is the race, not a wait)

    async def main(pool: modelpool.Pool) -> list[list[int]]:
        pool.attach_loop()
        runs = []
        try:
            for _ in range(8):
                got: list[int] = []
                with pytest.raises(modelpool.WorkerCrashedError):
                    await read(pool, got)
                runs.append(got)
        finally:
            pool.detach_loop()
        return runs

    with modelpool.Pool("_stream_models:Counter", workers=1, retries=0) as pool:
        assert asyncio.run(main(pool)) == [[0, 1, 2]] * 8


def test_a_model_that_does_not_stream_streams_its_one_answer() -> None:
    with modelpool.Pool("_stream_models:Plain", workers=1) as pool:
        (piece,) = list(pool.stream({"x": np.array([1.5])}))
        assert piece["y"].tolist() == [3.0]
        assert pool.predict({"x": np.array([2.0])})["y"].tolist() == [4.0]


def test_a_stream_queued_behind_a_request_made_on_an_attached_loop() -> None:
    """Read by the event loop the pool is attached to (as under ``modelpool serve``): when the
    loop's own request ends, the loop hands the worker the queued stream and reads its
    pieces itself."""

    async def main(pool: modelpool.Pool) -> tuple[list[int], Any]:
        pool.attach_loop()
        try:
            slow = asyncio.ensure_future(pool.apredict({"sleep": np.array([0.3])}))
            while pool.stats().workers[0].state != "busy":
                await asyncio.sleep(0.01)
            stream = pool.stream(_n(50))  # queued: the only worker is busy
            pieces = [int(piece["i"][0]) async for piece in stream]
            return pieces, await slow
        finally:
            pool.detach_loop()

    with modelpool.Pool("_stream_models:Mixed", workers=1) as pool:
        pieces, slept = asyncio.run(main(pool))
        assert pieces == list(range(50))
        assert slept["slept"].tolist() == [0.3]
        assert pool.stats().workers[0].restarts == 0


def test_predict_on_a_streaming_model_says_to_use_stream() -> None:
    with modelpool.Pool("_stream_models:Counter", workers=1) as pool:
        with pytest.raises(modelpool.ModelSpecError, match=r"call it with pool\.stream\(inputs\)"):
            pool.predict(_n(3))
        assert [int(p["i"][0]) for p in pool.stream(_n(2))] == [0, 1]
