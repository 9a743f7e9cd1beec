"""Which batch size and delay to serve with: the same model and load, batching set three ways.

The small MLP of bench/server.py (1 row per request, 2 workers) served by ``modelpool serve``
with batching off, with batches of 16 rows (the connections over the workers) and of 32 rows
(every connection's request) after a 2 ms delay, and with batches of up to 32 rows and no
delay (what is queued goes as soon as a worker is free); the bare aiohttp handler computing
the MLP inline is the baseline. Loaded by ``wrk`` at 32 connections, then at 4 (a light load,
where a batch does not fill). docs/guide.md ("Choosing the batch size and the delay") quotes
its figures; docs/benchmarks.md keeps the runs.

    python bench/batch_settings.py                 # 4 rounds of 3 s per contender (~4 min)
    python bench/batch_settings.py --quick         # one short round
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import server as bench  # bench/server.py: the servers, wrk and the tables

PATH = "/v2/models/mlp/infer"
WIDE = bench.WIDE_BATCH_SIZE
#: (server key, label, ``modelpool serve`` batching options); None: the bare handler
SETTINGS: list[tuple[str, str, list[str] | None]] = [
    ("bare", bench.BARE_MLP_LABEL, None),
    ("off", "batching off", []),
    ("narrow", f"batching {bench.BATCH_SIZE} / 2 ms", bench.batching_args(bench.BATCH_SIZE)),
    ("wide", f"batching {WIDE} / 2 ms", bench.batching_args(WIDE)),
    ("eager", f"batching {WIDE} / 0 ms", ["--max-batch-size", str(WIDE), "--max-batch-delay", "0"]),
]
LIGHT_CONNECTIONS = 4


def make_servers() -> dict[str, bench.ServerProcess]:
    servers = {}
    for key, label, options in SETTINGS:
        if options is None:
            me = [sys.executable, os.path.join(bench.HERE, "server.py")]
            servers[key] = bench.ServerProcess(label, [*me, "--app", "bare"])
        else:
            argv = bench.modelpool_server("common:MLP", "mlp", *options)
            servers[key] = bench.ServerProcess(f"modelpool serve, {label}", argv)
    return servers


def plan(servers: dict[str, bench.ServerProcess]) -> list[bench.Scenario]:
    contenders = [bench.Contender(label, key, PATH) for key, label, _ in SETTINGS]
    return [
        bench.Scenario("Small MLP", "mlp", bench.SMALL_CONNECTIONS, list(contenders)),
        bench.Scenario("Small MLP, light load", "mlp", LIGHT_CONNECTIONS, list(contenders)),
    ]


def main() -> int:
    options = bench.short_bench_options(__doc__.split("\n")[0], full=(4, 3), quick=(1, 1))
    if options is None:
        return 2
    rounds, seconds, quick = options
    warmup = 0 if quick else 1
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; small MLP, "
        f"{bench.WORKERS} workers; {rounds} round(s) of {seconds} s per contender; x base: "
        "median of per-round ratios to the bare handler (p25-p75)"
    )
    servers = make_servers()
    scenarios = bench.measured(
        servers, lambda: bench.measure(servers, rounds, seconds, warmup, plan_for=plan)
    )
    if scenarios is None:
        return 1
    for scenario in scenarios:
        bench.report(scenario, bench.summarize(scenario))
    print(f"\n(load average at the end: {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
