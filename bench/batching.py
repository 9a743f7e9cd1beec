"""Dynamic batching: throughput and latency with 64 concurrent callers, batching off vs on.

    python bench/batching.py            # ~80 s on 2 cores
    python bench/batching.py --quick    # ~20 s

Each caller sends one row at a time (asyncio, 64 in flight). Each round runs batching off
and on back to back (order reversed every other round) and then times one full batch from a
single caller. Ratios are taken within a round, one per round: the speedup (req/s on / req/s
off) and p99 with batching on / its bound (max_batch_delay + 2 x that round's full-batch
time). Printed is the median of the per-round ratios, their p25-p75 and the number of rounds;
no ratio is a quotient of two medians. req/s are medians over rounds, p50/p99 are over all
rounds' requests pooled (context). Target (docs/benchmarks.md), checked on those medians:
with the fixed-cost model, >= 5x the unbatched throughput, and p99 <= the bound.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import FixedCostMLP, TorchMLP, spread

import modelpool

CALLERS = 64
MAX_BATCH = 64
DELAY = 0.005


async def load(pool: modelpool.Pool, seconds: float) -> tuple[float, list[float]]:
    """(requests per second, latencies) with CALLERS concurrent one-row callers."""
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await pool.apredict({"x": x})
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return len(latencies) / (time.perf_counter() - t0), latencies


def service_time(pool: modelpool.Pool, rows: int) -> float:
    """Median seconds for one call of ``rows`` rows from a single caller."""
    x = np.zeros((rows, 64), np.float32)
    samples = []
    for _ in range(30):
        t = time.perf_counter()
        pool.predict({"x": x})
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[int(len(ordered) * 0.99)]


def run(model: type, rounds: int, seconds: float) -> dict[str, Any]:
    results: dict[str, list[Any]] = {"off": [], "on": []}
    full_batch: list[float] = []
    with (
        modelpool.Pool(model, workers=2) as off,
        modelpool.Pool(model, workers=2, max_batch_size=MAX_BATCH, max_batch_delay=DELAY) as on,
    ):
        pools = [("off", off), ("on", on)]
        asyncio.run(load(off, 0.5))  # warm up
        asyncio.run(load(on, 0.5))
        service_time(off, MAX_BATCH)
        for i in range(rounds):
            for name, pool in pools if i % 2 == 0 else pools[::-1]:
                results[name].append(asyncio.run(load(pool, seconds)))
            full_batch.append(service_time(off, MAX_BATCH))
    out: dict[str, Any] = {"full_batch_service_s": statistics.median(full_batch)}
    for name, runs in results.items():
        rates = [r for r, _ in runs]
        lat = sorted(x for _, lats in runs for x in lats)
        out[name] = {
            "req_per_s": statistics.median(rates),
            "p50_ms": lat[len(lat) // 2] * 1e3,
            "p99_ms": lat[int(len(lat) * 0.99)] * 1e3,
        }
    # every ratio below is taken within one round
    pairs = zip(results["on"], results["off"], strict=True)
    out["speedup"] = spread([rate_on / rate_off for (rate_on, _), (rate_off, _) in pairs])
    bounds = [DELAY + 2 * s for s in full_batch]
    out["p99_bound_ms"] = statistics.median(bounds) * 1e3
    out["p99_over_bound"] = spread(
        [p99(lats) / bound for (_, lats), bound in zip(results["on"], bounds, strict=True)]
    )
    return out


def fmt(s: dict[str, Any], digits: int) -> str:
    """A spread() as ``median x (p25-p75, n rounds)``."""
    return (
        f"{s['median']:.{digits}f}x (p25-p75 {s['p25']:.{digits}f}-{s['p75']:.{digits}f}, "
        f"{s['rounds']} rounds)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, seconds = (3, 1.0) if args.quick else (5, 3.0)
    print(
        f"{CALLERS} concurrent callers, 1 row each; 2 workers; batching: max_batch_size="
        f"{MAX_BATCH}, max_batch_delay={DELAY * 1e3:.0f} ms; {rounds} rounds of {seconds:g} s"
    )
    print(
        "req/s: median over rounds; p50/p99: all rounds pooled; speedup and p99 / bound: median\n"
        "(p25-p75) of ratios taken within each round, never a quotient of two medians"
    )
    ok = True
    for model in (FixedCostMLP, TorchMLP):
        r = run(model, rounds, seconds)
        print(
            f"\n{model.__name__}  (one full batch of {MAX_BATCH} rows: "
            f"{r['full_batch_service_s'] * 1e3:.1f} ms, median over rounds)"
        )
        for name in ("off", "on"):
            m = r[name]
            print(
                f"  batching {name:<3}  {m['req_per_s']:8.0f} req/s   p50 {m['p50_ms']:6.1f} ms"
                f"   p99 {m['p99_ms']:6.1f} ms"
            )
        print(f"  speedup (on / off, per round): {fmt(r['speedup'], 1)}")
        print(
            f"  p99 with batching / bound (delay + 2 x full batch, per round): "
            f"{fmt(r['p99_over_bound'], 2)}; bound {r['p99_bound_ms']:.1f} ms (median)"
        )
        if model is FixedCostMLP:
            met_speed = r["speedup"]["median"] >= 5
            met_p99 = r["p99_over_bound"]["median"] <= 1
            ok = met_speed and met_p99
            print(
                f"  target speedup >= 5x: {'met' if met_speed else 'MISSED'};"
                f" p99 <= bound: {'met' if met_p99 else 'MISSED'}"
            )
    print("\nall targets met" if ok else "\nsome targets MISSED")


if __name__ == "__main__":
    main()
