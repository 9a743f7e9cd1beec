"""modelpool's data-path benchmarks, every baseline measured in the same run.

    python bench/run.py            # full run (~2 min on 2 cores)
    python bench/run.py --quick    # fewer rounds
    python bench/run.py --json results.json

Rounds alternate between contenders, so load on a shared machine hits them alike; medians
are reported, with ratios to the floor (bare Pipe ping-pong; two np.copyto) and to
ProcessPoolExecutor. Targets (docs/benchmarks.md): small call <= 2x the Pipe and >= 4x faster
than ProcessPoolExecutor; 64 MiB in and out <= 2x the two-copy floor and >= 20x faster than
ProcessPoolExecutor.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Identity, echo_pipe, noop

import modelpool

SMALL = b"ping"
BIG_BYTES = 64 * 2**20


def timed(fn: Callable[[], object], n: int) -> list[float]:
    """Seconds per call of ``fn``, one sample per call."""
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return samples


def alternate(
    contenders: dict[str, Callable[[], object]], rounds: int, per_round: int, warmup: int
) -> dict[str, dict[str, float]]:
    """For each contender: the median seconds per call, and the median over rounds of its
    ratio to the first contender measured in the same round. Shared machines drift 2-3x within
    a minute; a ratio taken within one round cancels that drift."""
    for fn in contenders.values():
        timed(fn, warmup)
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    ratios: dict[str, list[float]] = {name: [] for name in contenders}
    floor = next(iter(contenders))
    for _ in range(rounds):
        for name, fn in contenders.items():
            samples[name].append(statistics.median(timed(fn, per_round)))
        for name in contenders:
            ratios[name].append(samples[name][-1] / samples[floor][-1])
    return {
        name: {
            "seconds": statistics.median(samples[name]),
            "x_floor": statistics.median(ratios[name]),
        }
        for name in contenders
    }


class Baselines:
    """The peers, each with one worker process (forkserver, as modelpool)."""

    def __init__(self) -> None:
        ctx = mp.get_context("forkserver")
        self.pipe, child = ctx.Pipe()
        self.echo = ctx.Process(target=echo_pipe, args=(child,), daemon=True)
        self.echo.start()
        child.close()
        self.ppe = cf.ProcessPoolExecutor(1, mp_context=ctx)
        self.mp_pool = ctx.Pool(1)
        import loky

        self.loky = loky.ProcessPoolExecutor(1)
        for ex in (self.ppe, self.loky):
            ex.submit(noop, 1).result()
        self.mp_pool.apply(noop, (1,))

    def pipe_roundtrip(self) -> None:
        self.pipe.send_bytes(SMALL)
        self.pipe.recv_bytes()

    def close(self) -> None:
        self.pipe.send_bytes(b"")
        self.echo.join(5)
        self.ppe.shutdown()
        self.mp_pool.close()
        self.mp_pool.join()
        self.loky.shutdown()


def bench_small(base: Baselines, pool: modelpool.Pool, fn_pool: modelpool.Pool, quick: bool):
    contenders = {
        "bare Pipe ping-pong (floor)": base.pipe_roundtrip,
        "modelpool predict": lambda: pool.predict(SMALL),
        "modelpool submit().result()": lambda: fn_pool.submit(noop, SMALL).result(),
        "ProcessPoolExecutor": lambda: base.ppe.submit(noop, SMALL).result(),
        "multiprocessing.Pool.apply": lambda: base.mp_pool.apply(noop, (SMALL,)),
        "loky": lambda: base.loky.submit(noop, SMALL).result(),
    }
    rounds, per_round = (7, 100) if quick else (41, 150)
    return alternate(contenders, rounds, per_round, warmup=200)


def bench_big(base: Baselines, pool: modelpool.Pool, quick: bool):
    x = np.random.default_rng(0).random(BIG_BYTES // 4, dtype=np.float32)
    tmp, out = np.empty_like(x), np.empty_like(x)

    def floor() -> None:
        np.copyto(tmp, x)
        np.copyto(out, tmp)

    def modelpool_call() -> None:
        y = pool.predict({"x": x})["x"]
        assert y.shape == x.shape

    contenders = {
        "two np.copyto of 64 MiB (floor)": floor,
        "modelpool predict": modelpool_call,
        "ProcessPoolExecutor": lambda: base.ppe.submit(noop, x).result(),
        "multiprocessing.Pool.apply": lambda: base.mp_pool.apply(noop, (x,)),
        "loky": lambda: base.loky.submit(noop, x).result(),
    }
    rounds = 3 if quick else 9
    return alternate(contenders, rounds, per_round=3, warmup=2)


def bench_throughput(quick: bool) -> dict[str, float]:
    """Calls per second: 8 client threads; asyncio with 64 in flight (2 workers each)."""
    n = 2000 if quick else 6000
    out = {}
    ctx = mp.get_context("forkserver")
    with (
        modelpool.Pool(Identity, workers=2) as pool,
        cf.ProcessPoolExecutor(2, mp_context=ctx) as ppe,
    ):
        ppe.submit(noop, 1).result()

        def threads(call: Callable[[], object]) -> float:
            per = n // 8

            def client() -> None:
                for _ in range(per):
                    call()

            ts = [threading.Thread(target=client) for _ in range(8)]
            t = time.perf_counter()
            for th in ts:
                th.start()
            for th in ts:
                th.join()
            return per * 8 / (time.perf_counter() - t)

        async def in_flight(make: Callable[[], Any], limit: int = 64) -> float:
            sem = asyncio.Semaphore(limit)

            async def one() -> None:
                async with sem:
                    await make()

            t = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(n)))
            return n / (time.perf_counter() - t)

        for _ in range(2):  # warm up both
            threads(lambda: pool.predict(SMALL))
            threads(lambda: ppe.submit(noop, SMALL).result())
        out["modelpool, 8 threads (calls/s)"] = threads(lambda: pool.predict(SMALL))
        out["ProcessPoolExecutor, 8 threads (calls/s)"] = threads(
            lambda: ppe.submit(noop, SMALL).result()
        )
        out["modelpool apredict, 64 in flight (calls/s)"] = asyncio.run(
            in_flight(lambda: pool.apredict(SMALL))
        )

        async def ppe_call() -> object:
            return await asyncio.wrap_future(ppe.submit(noop, SMALL))

        out["ProcessPoolExecutor + asyncio, 64 in flight (calls/s)"] = asyncio.run(
            in_flight(ppe_call)
        )
    return out


def report(title: str, measured: dict[str, dict[str, float]], unit: str, scale: float) -> None:
    print(f"\n{title}")
    print(f"  {'':<34} {'median':>13}  {'x floor':>8}  {'PPE/this':>9}")
    ppe = measured["ProcessPoolExecutor"]["x_floor"]
    for name, m in measured.items():
        print(
            f"  {name:<34} {m['seconds'] * scale:10.1f} {unit}  {m['x_floor']:7.2f}x"
            f"  {ppe / m['x_floor']:8.1f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    print(
        f"modelpool {modelpool.__version__}, Python {sys.version.split()[0]}, "
        f"numpy {np.__version__}, {os.cpu_count()} CPUs"
    )
    print("(x floor and PPE/this are medians of ratios taken within each round)")
    base = Baselines()
    results: dict[str, Any] = {}
    try:
        with modelpool.Pool(Identity, workers=1) as pool, modelpool.Pool(workers=1) as fn_pool:
            results["small"] = bench_small(base, pool, fn_pool, args.quick)
            report(
                "Small call round trip (a no-op on 4 bytes), per call:", results["small"], "us", 1e6
            )
            results["big"] = bench_big(base, pool, args.quick)
            report(
                "64 MiB float32 array in and out of a worker (identity), per call:",
                results["big"],
                "ms",
                1e3,
            )
    finally:
        base.close()
    results["throughput"] = bench_throughput(args.quick)
    print("\nThroughput of small calls, 2 workers:")
    for name, value in results["throughput"].items():
        print(f"  {name:<52} {value:10.0f}")

    small = {k: v["x_floor"] for k, v in results["small"].items()}
    big = {k: v["x_floor"] for k, v in results["big"].items()}
    mp_small, mp_big = small["modelpool predict"], big["modelpool predict"]
    ppe_small = small["ProcessPoolExecutor"] / mp_small
    ppe_big = big["ProcessPoolExecutor"] / mp_big
    checks = {
        f"small call <= 2x bare Pipe (measured {mp_small:.2f}x)": mp_small <= 2,
        f"small call >= 4x faster than PPE (measured {ppe_small:.1f}x)": ppe_small >= 4,
        f"64 MiB <= 2x two-copy floor (measured {mp_big:.2f}x)": mp_big <= 2,
        f"64 MiB >= 20x faster than PPE (measured {ppe_big:.1f}x)": ppe_big >= 20,
    }
    print("\nTargets:")
    for name, ok in checks.items():
        print(f"  {'met   ' if ok else 'MISSED'} {name}")
    results["targets"] = checks
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
