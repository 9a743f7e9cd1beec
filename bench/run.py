"""modelpool's data-path benchmarks, every baseline measured in the same run.

    python bench/run.py            # full run (~1.5 min on 2 cores)
    python bench/run.py --quick    # fewer rounds
    python bench/run.py --json results.json

How ratios are taken: each round times every contender back to back (the order reversed
every other round), giving one median time per call per contender per round. A ratio (x floor:
this / the floor; PPE/this: ProcessPoolExecutor / this; x PPE for throughput) is computed
from two times of the same round, one ratio per round, and the figure printed is the median
of those per-round ratios, with their p25-p75 spread and the number of rounds. No ratio is a
quotient of two medians. Absolute times (median over rounds) are context only: a shared
machine drifts 2-3x within a minute, which a within-round ratio cancels.

Floors: a bare Pipe ping-pong; two np.copyto. Targets (docs/benchmarks.md), checked on the
median per-round ratio: small call <= 2x the Pipe and >= 4x faster than ProcessPoolExecutor;
64 MiB in and out <= 2x the two-copy floor and >= 20x faster than ProcessPoolExecutor.
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
from common import Identity, echo_pipe, noop, spread

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


def within_rounds(num: list[float], den: list[float]) -> list[float]:
    """One ratio per round: ``num[i] / den[i]``, both measured in round ``i``."""
    return [a / b for a, b in zip(num, den, strict=True)]


def alternate(
    contenders: dict[str, Callable[[], object]], rounds: int, per_round: int, warmup: int
) -> dict[str, Any]:
    """Time every contender once per round, back to back (order reversed every other round).

    Returns for each contender: its median seconds per call in each round
    (``per_round_seconds``), the median of those (``seconds``, context only), and two
    ``spread()``s of ratios each taken within one round: this / the first contender, the floor
    (``x_floor``), and ProcessPoolExecutor / this (``ppe_over_this``)."""
    for fn in contenders.values():
        timed(fn, warmup)
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    for i in range(rounds):
        for name in order if i % 2 == 0 else order[::-1]:
            samples[name].append(statistics.median(timed(contenders[name], per_round)))
    floor, ppe = samples[order[0]], samples["ProcessPoolExecutor"]
    return {
        name: {
            "seconds": statistics.median(samples[name]),
            "x_floor": spread(within_rounds(samples[name], floor)),
            "ppe_over_this": spread(within_rounds(ppe, samples[name])),
            "per_round_seconds": samples[name],
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


def bench_throughput(quick: bool) -> dict[str, Any]:
    """Calls per second with 2 workers: 8 client threads; asyncio with 64 in flight. Each round
    runs modelpool and ProcessPoolExecutor back to back (order reversed every other round);
    ``x_ppe`` is modelpool's calls/s over PPE's in the same round, a ``spread()`` over rounds."""
    rounds, n = (3, 1500) if quick else (7, 3000)
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

        async def ppe_call() -> object:
            return await asyncio.wrap_future(ppe.submit(noop, SMALL))

        modes: dict[str, tuple[Callable[[], float], Callable[[], float]]] = {
            "8 client threads": (
                lambda: threads(lambda: pool.predict(SMALL)),
                lambda: threads(lambda: ppe.submit(noop, SMALL).result()),
            ),
            "asyncio, 64 in flight": (
                lambda: asyncio.run(in_flight(lambda: pool.apredict(SMALL))),
                lambda: asyncio.run(in_flight(ppe_call)),
            ),
        }
        out: dict[str, Any] = {}
        for mode, (ours, theirs) in modes.items():
            ours(), theirs()  # warm up both
            rates: dict[str, list[float]] = {"modelpool": [], "ProcessPoolExecutor": []}
            for i in range(rounds):
                pair = [("modelpool", ours), ("ProcessPoolExecutor", theirs)]
                for name, fn in pair if i % 2 == 0 else pair[::-1]:
                    rates[name].append(fn())
            out[mode] = {
                "calls_per_s": {k: statistics.median(v) for k, v in rates.items()},
                "x_ppe": spread(within_rounds(rates["modelpool"], rates["ProcessPoolExecutor"])),
                "per_round_calls_per_s": rates,
            }
    return out


def fmt(s: dict[str, float], digits: int) -> str:
    """A spread() as ``median (p25-p75)``."""
    return f"{s['median']:.{digits}f}x ({s['p25']:.{digits}f}-{s['p75']:.{digits}f})"


def report(title: str, measured: dict[str, Any], unit: str, scale: float) -> None:
    rounds = next(iter(measured.values()))["x_floor"]["rounds"]
    print(f"\n{title} ({rounds} rounds)")
    print(f"  {'':<34} {'median':>13}  {'x floor (p25-p75)':>20}  {'PPE/this (p25-p75)':>19}")
    for name, m in measured.items():
        print(
            f"  {name:<34} {m['seconds'] * scale:10.1f} {unit}  {fmt(m['x_floor'], 2):>20}"
            f"  {fmt(m['ppe_over_this'], 1):>19}"
        )


def target(what: str, s: dict[str, Any], ok: Callable[[float], bool]) -> tuple[str, bool]:
    """A target line and its verdict, taken on the median of the per-round ratios."""
    held = sum(ok(r) for r in s["per_round"])
    line = (
        f"{what} (median of per-round ratios {s['median']:.2f}x, p25-p75 {s['p25']:.2f}-"
        f"{s['p75']:.2f}x, min-max {s['min']:.2f}-{s['max']:.2f}x; held in {held} of "
        f"{s['rounds']} rounds)"
    )
    return line, ok(s["median"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Every ratio printed is the median over rounds of a ratio of two times measured "
        "back to back in the same round (p25-p75 of the per-round ratios in brackets); "
        "never a quotient of two medians.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    print(
        f"modelpool {modelpool.__version__}, Python {sys.version.split()[0]}, "
        f"numpy {np.__version__}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    print(
        "Each round times every contender back to back. 'median' is the median over rounds of\n"
        "its time per call (context only). 'x floor' (this / floor), 'PPE/this' and 'x PPE'\n"
        "are ratios of two times from the same round, one per round: shown is their median\n"
        "over rounds and, in brackets, their p25-p75. No ratio is a quotient of two medians."
    )
    base = Baselines()
    results: dict[str, Any] = {}
    try:
        with modelpool.Pool(Identity, workers=1) as pool, modelpool.Pool(workers=1) as fn_pool:
            results["small"] = bench_small(base, pool, fn_pool, args.quick)
            report(
                "Small call round trip (a no-op on 4 bytes), per call", results["small"], "us", 1e6
            )
            results["big"] = bench_big(base, pool, args.quick)
            report(
                "64 MiB float32 array in and out of a worker (identity), per call",
                results["big"],
                "ms",
                1e3,
            )
    finally:
        base.close()
    results["throughput"] = bench_throughput(args.quick)
    rounds = next(iter(results["throughput"].values()))["x_ppe"]["rounds"]
    print(f"\nThroughput of small calls, 2 workers, calls/s ({rounds} rounds)")
    print(f"  {'':<24} {'modelpool':>10} {'PPE':>8}  {'x PPE (p25-p75)':>17}")
    for mode, m in results["throughput"].items():
        rate = m["calls_per_s"]
        print(
            f"  {mode:<24} {rate['modelpool']:10.0f} {rate['ProcessPoolExecutor']:8.0f}"
            f"  {fmt(m['x_ppe'], 2):>17}"
        )

    small, big = results["small"]["modelpool predict"], results["big"]["modelpool predict"]
    checks = dict(
        [
            target("small call <= 2x bare Pipe", small["x_floor"], lambda r: r <= 2),
            target("small call >= 4x faster than PPE", small["ppe_over_this"], lambda r: r >= 4),
            target("64 MiB <= 2x two-copy floor", big["x_floor"], lambda r: r <= 2),
            target("64 MiB >= 20x faster than PPE", big["ppe_over_this"], lambda r: r >= 20),
        ]
    )
    print("\nTargets (verdict on the median of the per-round ratios):")
    for name, ok in checks.items():
        print(f"  {'met   ' if ok else 'MISSED'} {name}")
    print(f"\n(load average at the end: {os.getloadavg()[0]:.2f})")
    results["targets"] = checks
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
