"""An attached event loop sends its requests and reads their answers itself (``_loopside``):
no thread hand-off, and every failure rule of the supervisor's path still holds."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

import modelpool
from _models import Crashy, Doubler, Gate
from _spies import delivering_threads
from _waiting import until
from modelpool._loopside import LoopFuture


def _x(value: float, rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, 4), value, dtype=np.float32)}


def test_answers_are_read_and_settled_on_the_attached_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def main(pool: modelpool.Pool, seen: list[str]) -> list[Any]:
        pool.attach_loop()
        try:
            # 40 requests for 2 workers: most queue, and each answer read on the loop hands
            # its worker the next one from there
            return await asyncio.gather(*(pool.apredict(_x(i)) for i in range(40)))
        finally:
            pool.detach_loop()

    with modelpool.Pool(Doubler, workers=2) as pool:
        seen = delivering_threads(pool, monkeypatch)
        results = asyncio.run(main(pool, seen))
        assert [float(r["y"][0, 0]) for r in results] == [2.0 * i for i in range(40)]
        assert seen == [threading.main_thread().name] * 40  # none by the supervisor thread
        # once detached, answers go back through the supervisor thread
        assert asyncio.run(pool.apredict(_x(1)))["y"][0, 0] == 2.0
        assert seen[-1] == "modelpool-supervisor"


def test_a_loop_that_is_not_attached_keeps_the_supervisor_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with modelpool.Pool(Doubler, workers=1) as pool:
        seen = delivering_threads(pool, monkeypatch)
        assert asyncio.run(pool.apredict(_x(3)))["y"][0, 0] == 6.0
        assert seen == ["modelpool-supervisor"]
        assert pool.predict(_x(1))["y"][0, 0] == 2.0  # the blocking fast path: no deliver


def test_a_crash_on_the_loop_path_fails_that_request_alone_and_closes_its_channel() -> None:
    async def main(pool: modelpool.Pool) -> None:
        pool.attach_loop()
        try:
            (before,) = pool.stats().workers
            with pytest.raises(modelpool.WorkerCrashedError, match="SIGKILL"):
                await pool.apredict({"die": np.array(["sigkill"])})
            # the loop stopped watching the dead worker's connection and released it
            dead = [w for w in pool._supervisor.fleet.workers if w.pid == before.pid]
            assert not dead or not dead[0].loop_watched
            assert (await pool.apredict({"x": np.zeros(1)}))["pid"] != before.pid
        finally:
            pool.detach_loop()

    with modelpool.Pool(Crashy, workers=1) as pool:
        asyncio.run(main(pool))
        assert all(not w.loop_watched for w in pool._supervisor.fleet.workers)


def test_a_hung_request_on_the_loop_path_times_out_and_its_worker_is_replaced(
    tmp_path: Path,
) -> None:
    async def main(pool: modelpool.Pool) -> None:
        pool.attach_loop()
        try:
            (before,) = pool.stats().workers
            with pytest.raises(modelpool.RequestTimeoutError):
                await pool.apredict(_x(-1), timeout=0.5)  # waits for a gate never opened

            def gone() -> bool:
                with contextlib.suppress(psutil.NoSuchProcess):
                    return psutil.Process(before.pid).status() == psutil.STATUS_ZOMBIE
                return True

            await until(gone, 30, "the hung worker to be killed")
            assert (await pool.apredict(_x(2)))["y"][0, 0] == 4.0
        finally:
            pool.detach_loop()

    with modelpool.Pool(Gate, workers=1, options={"path": str(tmp_path / "gate")}) as pool:
        asyncio.run(main(pool))


def test_cancelling_on_the_loop_path_drops_a_queued_request_and_a_running_ones_answer(
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"

    async def main(pool: modelpool.Pool) -> None:
        pool.attach_loop()
        try:
            running = asyncio.ensure_future(pool.apredict(_x(-1)))  # holds the only worker
            await until(lambda: pool.stats().in_flight == 1, 60, "the gated request to run")
            queued = asyncio.ensure_future(pool.apredict(_x(5)))
            await until(lambda: pool.stats().queued == 1, 60, "the second request to queue")
            queued.cancel()
            running.cancel()
            # the cancelled one leaves the queue once its task has run its cancellation
            await until(lambda: pool.stats().queued == 0, 60, "the cancelled request to leave")
            gate.touch()
            # the worker finishes the running one (its answer is dropped) and serves again
            assert (await pool.apredict(_x(3)))["y"][0, 0] == 6.0
            assert running.cancelled()
            assert queued.cancelled()
        finally:
            pool.detach_loop()

    with modelpool.Pool(Gate, workers=1, options={"path": str(gate)}) as pool:
        asyncio.run(main(pool))
        assert pool.stats().workers[0].served == 2  # both ran; neither worker was replaced


def test_detaching_hands_a_request_in_flight_to_the_supervisor(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def main(pool: modelpool.Pool) -> None:
        pool.attach_loop()
        started = pool.start_predict(_x(-1))
        await until(lambda: pool.stats().in_flight == 1, 60, "the gated request to run")
        future: Any = started.future
        assert isinstance(future, LoopFuture)
        pool.detach_loop()  # the loop stops while the request runs

    with modelpool.Pool(Gate, workers=1, options={"path": str(gate)}) as pool:
        asyncio.run(main(pool))
        gate.touch()
        # read by the supervisor now: the worker is free again and serves a blocking call
        assert pool.predict(_x(4), timeout=60)["y"][0, 0] == 8.0


def test_loop_future_follows_the_future_rules() -> None:
    async def main() -> None:
        side: Any = type("Side", (), {})()
        side.loop = asyncio.get_running_loop()
        side.settle = lambda waiter, result, exc, cancel=False: (
            waiter.cancel() if cancel else waiter.set_result(result)
        )
        pending = LoopFuture(side)
        assert pending.cancel()
        assert pending.cancelled()
        assert pending.done()
        assert not pending.set_running_or_notify_cancel()  # a cancelled request never runs
        running = LoopFuture(side)
        assert running.set_running_or_notify_cancel()
        assert running.running()
        assert not running.cancel()  # too late to cancel: its answer is dropped instead
        running.set_result(7)
        assert await running.wait() == 7
        with pytest.raises(cf.InvalidStateError):
            running.set_result(8)
        with pytest.raises(RuntimeError):
            running.set_running_or_notify_cancel()

    asyncio.run(main())


def test_an_answer_settled_from_another_thread_reaches_the_loop() -> None:
    async def main(pool: modelpool.Pool) -> None:
        pool.attach_loop()
        try:
            side = pool._supervisor.loopside
            assert side is not None
            future = side.future()
            threading.Thread(target=future.set_exception, args=(ValueError("x"),)).start()
            with pytest.raises(ValueError, match="x"):
                await asyncio.wait_for(future.wait(), 60)
        finally:
            pool.detach_loop()

    with modelpool.Pool(Doubler, workers=1) as pool:
        asyncio.run(main(pool))


def test_no_descriptor_leaks_across_many_crashes_on_the_loop_path() -> None:
    me = psutil.Process(os.getpid())

    async def main(pool: modelpool.Pool) -> None:
        pool.attach_loop()
        try:
            for _ in range(5):
                with pytest.raises(modelpool.WorkerCrashedError):
                    await pool.apredict({"die": np.array(["sigkill"])})
            await pool.apredict({"x": np.zeros(1)})
        finally:
            pool.detach_loop()

    with modelpool.Pool(Crashy, workers=1) as pool:
        pool.predict({"x": np.zeros(1)})
        before = me.num_fds()
        asyncio.run(main(pool))
        assert me.num_fds() <= before + 2  # (an event loop's own descriptors may linger)


def test_a_request_queued_on_the_loop_takes_a_worker_whose_answer_waits_unread() -> None:
    """The loop runs one turn's callbacks in a row: a request queued while a worker's answer
    sits unread takes that worker at once (``LoopSide.reap``), not at the next turn."""
    import select

    async def main(pool: modelpool.Pool) -> None:
        pool.attach_loop()
        try:
            first = pool.start_predict(_x(1))
            (worker,) = pool._supervisor.fleet.workers
            # the answer is written, and this turn has not ended: the loop has not read it
            assert select.select([worker.channel.fileno()], [], [], 60)[0]
            second = pool.start_predict(_x(2))
            assert second.worker_pid == worker.pid  # sent now, not queued behind the turn
            assert (await first.wait())["y"][0, 0] == 2.0
            assert (await second.wait())["y"][0, 0] == 4.0
        finally:
            pool.detach_loop()

    with modelpool.Pool(Doubler, workers=1) as pool:
        pool.start()
        asyncio.run(main(pool))


def test_with_batching_the_loop_forms_and_times_its_batches_without_the_supervisor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Batches of requests made on the attached loop are formed, timed and sent by the loop:
    the supervisor thread is not woken on their way (it was twice per batch: once to time a
    new batch, once to send a full one)."""

    async def main(pool: modelpool.Pool) -> tuple[list[Any], Any]:
        pool.attach_loop()
        try:
            full = await asyncio.gather(*(pool.apredict(_x(i)) for i in range(40)))
            # a lone request: its batch never fills, so it goes when its delay is spent
            lone = await asyncio.wait_for(pool.apredict(_x(100)), 30)
            return full, lone
        finally:
            pool.detach_loop()

    with modelpool.Pool(Doubler, workers=2, max_batch_size=4, max_batch_delay=0.05) as pool:
        pool.start()
        supervisor = pool._supervisor
        seen = delivering_threads(pool, monkeypatch)
        ticks = [0]
        tick = supervisor._tick

        def counted() -> float | None:
            ticks[0] += 1
            return tick()

        monkeypatch.setattr(supervisor, "_tick", counted)
        before = sum(supervisor.dispatch.batch_sizes.values())
        full, lone = asyncio.run(main(pool))
        assert [float(r["y"][0, 0]) for r in full] == [2.0 * i for i in range(40)]
        assert lone["y"][0, 0] == 200.0
        batches = sum(supervisor.dispatch.batch_sizes.values()) - before
        assert batches >= 10  # 40 requests, at most 4 rows a batch, and the lone one
        assert set(seen) == {threading.main_thread().name}
        # (the detach at the end wakes it once; nothing else should)
        assert ticks[0] <= 2, f"the supervisor ran {ticks[0]} times for {batches} batches"
