"""Handing answers to asyncio: many answers, one wake-up of the loop; cancellation both ways."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading

import pytest

from modelpool import _aio


def test_a_burst_of_answers_wakes_the_loop_once_and_each_gets_its_own() -> None:
    async def run() -> list[object]:
        loop = asyncio.get_running_loop()
        wakes = 0
        real = loop.call_soon_threadsafe

        def counting(*args: object) -> object:
            nonlocal wakes
            wakes += 1
            return real(*args)  # type: ignore[arg-type]

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        futures: list[cf.Future[object]] = [cf.Future() for _ in range(50)]
        waits = [asyncio.ensure_future(_aio.await_future(f)) for f in futures]
        await asyncio.sleep(0)

        def settle() -> None:  # another thread settles them all at once, as a batch does
            for i, f in enumerate(futures):
                if i == 7:
                    f.set_exception(ValueError("seven"))
                else:
                    f.set_result(i)

        thread = threading.Thread(target=settle)
        thread.start()
        thread.join()
        results = await asyncio.gather(*waits, return_exceptions=True)
        assert wakes == 1
        return results

    results = asyncio.run(run())
    assert isinstance(results[7], ValueError)
    assert [r for i, r in enumerate(results) if i != 7] == [i for i in range(50) if i != 7]


def test_cancelling_the_await_cancels_the_future() -> None:
    async def run() -> cf.Future[object]:
        future: cf.Future[object] = cf.Future()
        task = asyncio.ensure_future(_aio.await_future(future))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return future

    assert asyncio.run(run()).cancelled()


def test_a_cancelled_future_cancels_the_await() -> None:
    async def run() -> None:
        future: cf.Future[object] = cf.Future()
        task = asyncio.ensure_future(_aio.await_future(future))
        await asyncio.sleep(0)
        future.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())


def test_an_event_loop_that_awaited_answers_can_be_freed() -> None:
    """The inbox of a loop must not keep the loop alive: every ``asyncio.run`` would leak one."""
    import gc
    import weakref

    loops = []

    async def answer() -> int:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        done: cf.Future[int] = cf.Future()
        threading.Timer(0.01, done.set_result, (7,)).start()
        return int(await _aio.await_future(done))

    assert asyncio.run(answer()) == 7
    gc.collect()
    assert loops[0]() is None
