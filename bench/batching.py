"""Dynamic batching: throughput and latency with 64 concurrent callers, batching off vs on.

    python bench/batching.py            # ~1 min on 2 cores
    python bench/batching.py --quick

Each caller sends one row at a time (asyncio, 64 in flight). Configurations alternate; the
figures are medians over rounds. Target (docs/benchmarks.md): with the fixed-cost model,
>= 5x the unbatched throughput, and p99 latency <= max_batch_delay + 2 x the service time of
one full batch (measured here too, from a single caller).
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
from common import FixedCostMLP, TorchMLP

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


def run(model: type, rounds: int, seconds: float) -> dict[str, Any]:
    results: dict[str, list[Any]] = {"off": [], "on": []}
    with (
        modelpool.Pool(model, workers=2) as off,
        modelpool.Pool(model, workers=2, max_batch_size=MAX_BATCH, max_batch_delay=DELAY) as on,
    ):
        asyncio.run(load(off, 0.5))  # warm up
        asyncio.run(load(on, 0.5))
        for _ in range(rounds):
            results["off"].append(asyncio.run(load(off, seconds)))
            results["on"].append(asyncio.run(load(on, seconds)))
        full_batch = service_time(off, MAX_BATCH)
    out: dict[str, Any] = {"full_batch_service_s": full_batch}
    for name, runs in results.items():
        rates = [r for r, _ in runs]
        lat = sorted(x for _, lats in runs for x in lats)
        out[name] = {
            "req_per_s": statistics.median(rates),
            "p50_ms": lat[len(lat) // 2] * 1e3,
            "p99_ms": lat[int(len(lat) * 0.99)] * 1e3,
        }
    out["speedup"] = out["on"]["req_per_s"] / out["off"]["req_per_s"]
    out["p99_bound_ms"] = (DELAY + 2 * full_batch) * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, seconds = (1, 1.5) if args.quick else (3, 3.0)
    print(
        f"{CALLERS} concurrent callers, 1 row each; 2 workers; batching: max_batch_size="
        f"{MAX_BATCH}, max_batch_delay={DELAY * 1e3:.0f} ms"
    )
    ok = True
    for model in (FixedCostMLP, TorchMLP):
        r = run(model, rounds, seconds)
        print(
            f"\n{model.__name__}  (one full batch of {MAX_BATCH} rows: "
            f"{r['full_batch_service_s'] * 1e3:.1f} ms)"
        )
        for name in ("off", "on"):
            m = r[name]
            print(
                f"  batching {name:<3}  {m['req_per_s']:8.0f} req/s   p50 {m['p50_ms']:6.1f} ms"
                f"   p99 {m['p99_ms']:6.1f} ms"
            )
        print(
            f"  speedup {r['speedup']:.1f}x; p99 with batching {r['on']['p99_ms']:.1f} ms vs "
            f"bound (delay + 2 x full batch) {r['p99_bound_ms']:.1f} ms"
        )
        if model is FixedCostMLP:
            met_speed = r["speedup"] >= 5
            met_p99 = r["on"]["p99_ms"] <= r["p99_bound_ms"]
            ok = met_speed and met_p99
            print(
                f"  target >= 5x: {'met' if met_speed else 'MISSED'};"
                f" p99 bound: {'met' if met_p99 else 'MISSED'}"
            )
    print("\nall targets met" if ok else "\nsome targets MISSED")


if __name__ == "__main__":
    main()
