"""Chaos soak: many threads, a mix of good requests, crashes, hangs, errors, cancellations and
external SIGKILLs, for MODELPOOL_SOAK_SECONDS (default 30). Every request must resolve, with the
right answer or the right error; nothing may hang or leak. Run with ``pytest -m soak``."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import random
import signal
import threading
import time

import numpy as np
import pytest

import modelpool
from _models import Crashy

pytestmark = pytest.mark.soak

SOAK_SECONDS = float(os.environ.get("MODELPOOL_SOAK_SECONDS", "30"))
ALLOWED_FOR_GOOD = (modelpool.WorkerCrashedError,)  # only if an external kill hit it twice


def _client(pool: modelpool.Pool, stop: threading.Event, seed: int, tally: dict[str, int]) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        kind = rng.choices(
            ["good", "sigkill", "sigsegv", "hang", "raise", "exit"], [80, 4, 4, 3, 6, 3]
        )[0]
        i = rng.randrange(1_000_000)
        try:
            if kind == "good":
                out = pool.predict({"i": i}, timeout=60)  # may wait for a replacement
                assert out["pid"] > 0, out
            elif kind == "hang":
                with pytest.raises(modelpool.RequestTimeoutError):
                    pool.predict({"die": "hang"}, timeout=0.3)
            elif kind == "raise":
                with pytest.raises(RuntimeError, match="boom"):
                    pool.predict({"die": "raise"}, timeout=60)
            else:
                with pytest.raises(modelpool.WorkerCrashedError):
                    pool.predict({"die": kind}, timeout=60)
            tally[kind] = tally.get(kind, 0) + 1
        except ALLOWED_FOR_GOOD:
            tally["good-crashed"] = tally.get("good-crashed", 0) + 1


async def _async_client(pool: modelpool.Pool, stop: threading.Event, tally: dict[str, int]) -> None:
    rng = random.Random(99)
    while not stop.is_set():
        task = asyncio.ensure_future(pool.apredict({"x": np.arange(3)}, timeout=60))
        if rng.random() < 0.3:
            await asyncio.sleep(rng.random() * 0.01)
            task.cancel()
        try:
            out = await task
            assert out["pid"] > 0
            tally["async"] = tally.get("async", 0) + 1
        except asyncio.CancelledError:
            tally["cancelled"] = tally.get("cancelled", 0) + 1
        except ALLOWED_FOR_GOOD:
            tally["good-crashed"] = tally.get("good-crashed", 0) + 1


def test_chaos_soak() -> None:
    tally: dict[str, int] = {}
    stop = threading.Event()
    pool = modelpool.Pool(Crashy, workers=3, retries=1, max_requests_per_worker=200).start()
    try:
        with cf.ThreadPoolExecutor(6) as ex:
            clients = [ex.submit(_client, pool, stop, seed, tally) for seed in range(4)]
            clients.append(ex.submit(asyncio.run, _async_client(pool, stop, tally)))
            try:
                rng = random.Random(7)
                end = time.monotonic() + SOAK_SECONDS
                while time.monotonic() < end:
                    time.sleep(rng.uniform(0.2, 1.0))
                    pids = [w.pid for w in pool.stats().workers if w.pid and w.state == "busy"]
                    if pids:
                        try:
                            os.kill(rng.choice(pids), signal.SIGKILL)
                        except ProcessLookupError:
                            continue  # it exited (or was replaced) since stats() was taken
                        tally["external-kill"] = tally.get("external-kill", 0) + 1
                    for f in clients:
                        if f.done():
                            f.result()  # a client died: surface its assertion
            finally:
                stop.set()  # before the executor waits for its clients, whatever happened
            for f in clients:
                f.result(timeout=120)  # longer than any one call may take
        assert tally.get("good", 0) > 50, tally
        assert pool.predict({}, timeout=60)["pid"] > 0
    finally:
        stop.set()
        started = time.monotonic()
        pool.shutdown()
        assert time.monotonic() - started < 60  # nothing is left to drain: it must not hang
    print("soak tally:", tally)
