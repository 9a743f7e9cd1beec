"""Front processes: ``modelpool serve --fronts F`` swept over F, requests/s against F = 1.

    python bench/fronts.py                       # F = 1, 2, ... up to half the CPUs
    python bench/fronts.py --fronts 1,2,4,8 --workers 8 --connections 64 --wrk-threads 4
    python bench/fronts.py --fronts 1,2 --seconds 2 --rounds 1   # a quick pass
    python bench/fronts.py --json fronts.json

One front process serves HTTP for all of a server's workers; on a machine with more cores it
becomes the bottleneck, and ``--fronts F`` runs F of them on one port (SO_REUSEPORT), each with
its share of the workers (``--workers`` is the total, split over the fronts, at least one
each). Issue 12: throughput grows with F until the workers (or the cores) saturate.

The model is bench/server.py's small NumPy MLP (``common:MLP``, 64 -> 256 -> 10, 1 row per
request, batching off: the front's cost per request shows most), loaded by ``wrk`` (keep-alive
connections, ``--wrk-threads`` threads, the same for every F) running on the same machine.
For each F, in the same rounds and as a ceiling, the bare aiohttp handler computing the MLP
inline in F processes sharing the port (``bench/server.py --app bare --processes F``): no
pool, no process isolation, what F event loops can do on their own.

Everything is bench/server.py's: its server subprocesses (``ServerProcess``), request bodies,
answer checks and wrk script; only the wrk runner is extended here, for several wrk threads.
Every server starts at once and stays up; rounds alternate the contenders (order reversed
every other round). A ratio is taken within each round, from two runs of that round, and
printed as the median of the per-round ratios with their p25-p75; req/s, p50 and p99 are
medians over rounds. CPU per request is the front's (the process serving HTTP, or the front
processes and their manager; not the workers), the server's (every process of it) and wrk's.
Any non-2xx answer or socket error is a failure (exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import modelpool
import server as bench  # bench/server.py: the servers, bodies, answer checks, wrk script
from modelpool._protocol import CodecError

MLP_PATH = "/v2/models/mlp/infer"
MODELPOOL = "modelpool"
BARE = "bare"


# ----------------------------------------------------------------------------- servers


def workers_in_use(workers: int, fronts: int) -> int:
    """The workers a server with ``fronts`` fronts runs in all (each front at least one;
    ``modelpool.config.share``)."""
    return sum(
        max(1, workers // fronts + (1 if i < workers % fronts else 0)) for i in range(fronts)
    )


def make_servers(
    fronts: list[int], workers: int, ceiling: bool
) -> dict[tuple[str, int], bench.ServerProcess]:
    """``modelpool serve --fronts F`` for each F (and the bare inline app in F processes)."""
    me = [sys.executable, os.path.join(bench.HERE, "server.py")]
    servers = {}
    for f in fronts:
        argv = bench.modelpool_server("common:MLP", "mlp", "--fronts", str(f))
        argv[argv.index("--workers") + 1] = str(workers)  # (bench/server.py's own: 2)
        servers[MODELPOOL, f] = bench.ServerProcess(
            f"modelpool serve --fronts {f}",
            argv,
            ready="ready:" if f == 1 else f"all {f} fronts serving",
        )
        if ceiling:
            servers[BARE, f] = bench.ServerProcess(
                f"bare aiohttp, MLP inline, {f} process(es)",
                [*me, "--app", "bare", "--processes", str(f)],
            )
    return servers


def label(kind: str, f: int, workers: int) -> str:
    if kind == MODELPOOL:
        return f"modelpool --fronts {f} ({workers_in_use(workers, f)} workers)"
    return f"bare aiohttp, MLP inline, {f} process{'es' if f > 1 else ''}"


def warm(
    servers: dict[tuple[str, int], bench.ServerProcess], bodies: dict[str, bench.Body]
) -> None:
    """A few requests on fresh connections (each may land on another front): every front
    answers before it is timed."""
    for (_, f), server in servers.items():
        for _ in range(4 * f):
            bench.post(server, MLP_PATH, bodies["mlp"])


def measure(
    servers: dict[tuple[str, int], bench.ServerProcess],
    args: argparse.Namespace,
) -> dict[tuple[str, int], list[dict[str, float]]]:
    """Start every server, check its answers, then time them in alternating rounds."""
    samples: dict[tuple[str, int], list[dict[str, float]]] = {key: [] for key in servers}
    with tempfile.TemporaryDirectory(prefix="modelpool-bench-fronts-") as tmp:
        for server in servers.values():
            server.start()
        deadline = time.monotonic() + 180
        for server in servers.values():
            server.wait_ready(deadline)
        bodies, x_mlp = bench.make_bodies()
        named = {f"{kind}-{f}": server for (kind, f), server in servers.items()}
        try:
            bench.check_answers(named, bodies, x_mlp)
        except CodecError as exc:
            raise bench.BenchError(f"an answer could not be decoded: {exc}") from None
        warm(servers, bodies)
        load = bench.Load(tmp, bodies, args.wrk_threads)
        order = list(servers)
        for key in order if args.warmup else ():
            load.run(servers[key], MLP_PATH, "mlp", args.connections, args.warmup)
        for i in range(args.rounds):
            for key in order if i % 2 == 0 else order[::-1]:
                samples[key].append(
                    load.run(servers[key], MLP_PATH, "mlp", args.connections, args.seconds)
                )
    return samples


# ----------------------------------------------------------------------------- report


def summarize(
    samples: dict[tuple[str, int], list[dict[str, float]]], fronts: list[int]
) -> dict[str, Any]:
    """Per kind and F: medians over rounds, the ratio to the same kind at the first F, and
    (for modelpool) the ratio to the bare app with as many processes, all within rounds."""
    out: dict[str, Any] = {}
    first = fronts[0]
    for (kind, f), runs in samples.items():
        row: dict[str, Any] = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
        row["x_first"] = bench.spread(bench.within_rounds(runs, samples[kind, first]))
        if kind == MODELPOOL and (BARE, f) in samples:
            row["x_ceiling"] = bench.spread(bench.within_rounds(runs, samples[BARE, f]))
        row["per_round"] = runs
        out.setdefault(kind, {})[str(f)] = row
    return out


def _x(spread: dict[str, float]) -> str:
    return f"{spread['median']:.2f}x ({spread['p25']:.2f}-{spread['p75']:.2f})"


def report(summary: dict[str, Any], args: argparse.Namespace) -> None:
    first = args.fronts[0]
    rows = [(kind, f) for f in args.fronts for kind in (MODELPOOL, BARE) if kind in summary]
    width = max(len(label(kind, f, args.workers)) for kind, f in rows)
    print(
        f"\nSmall MLP, {args.connections} connections, wrk {args.wrk_threads} thread(s), "
        f"{os.cpu_count()} CPUs ({args.rounds} round(s) of {args.seconds} s):"
    )
    print(
        f"  {'':<{width}} {'req/s':>8} {f'x F={first} (p25-p75)':>18} {'p50 ms':>7}"
        f" {'p99 ms':>7} {'front CPU/req':>14} {'server CPU/req':>15} {'wrk CPU/req':>12}"
    )
    for kind, f in rows:
        m = summary[kind][str(f)]
        print(
            f"  {label(kind, f, args.workers):<{width}} {m['req_per_s']:8.0f}"
            f" {_x(m['x_first']):>18} {m['p50_ms']:7.2f} {m['p99_ms']:7.2f}"
            f" {m['front_cpu_us']:11.0f} us {m['server_cpu_us']:12.0f} us"
            f" {m['client_cpu_us']:9.0f} us"
        )
    if BARE in summary:
        print("\n  modelpool over the bare inline app with as many HTTP processes (same rounds):")
        for f in args.fronts:
            print(f"    F={f}: {_x(summary[MODELPOOL][str(f)]['x_ceiling'])}")


# ----------------------------------------------------------------------------- main


def _fronts(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write numbers, e.g. 1,2,4,8") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: write numbers >= 1, e.g. 1,2,4,8")
    return sorted(set(values))


def defaults(cpus: int) -> dict[str, Any]:
    """Settings sized for ``cpus`` CPUs: F up to half of them (the fronts, their workers and
    wrk share the machine), as many workers as the largest F, a few connections per front."""
    fronts = [f for f in (1, 2, 4, 8, 16, 32, 64) if f <= max(2, cpus // 2)]
    return {
        "fronts": fronts,
        "workers": max(fronts[-1], cpus // 2),
        "connections": max(bench.SMALL_CONNECTIONS, 8 * fronts[-1]),
        "wrk_threads": max(1, min(4, cpus // 4)),
    }


def main() -> int:
    cpus = os.cpu_count() or 1
    default = defaults(cpus)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--fronts",
        type=_fronts,
        default=default["fronts"],
        help=f"front counts to measure, e.g. 1,2,4,8 (default here: "
        f"{','.join(map(str, default['fronts']))})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default["workers"],
        help=f"workers in all, split over the fronts (default here: {default['workers']})",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=default["connections"],
        help=f"wrk's keep-alive connections (default here: {default['connections']})",
    )
    parser.add_argument(
        "--wrk-threads",
        type=int,
        default=default["wrk_threads"],
        help=f"wrk's threads (default here: {default['wrk_threads']})",
    )
    parser.add_argument("--seconds", type=int, default=4, help="seconds per run (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="seconds of warm-up per server (default 1; 0: none)"
    )
    parser.add_argument(
        "--no-ceiling",
        dest="ceiling",
        action="store_false",
        help="skip the bare aiohttp app in F processes",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("error: this benchmark needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    if min(args.workers, args.connections, args.wrk_threads, args.seconds, args.rounds) < 1:
        parser.error("--workers, --connections, --wrk-threads, --seconds, --rounds: at least 1")
    if args.connections < args.wrk_threads:
        parser.error("--connections must be at least --wrk-threads (wrk's rule)")
    over = [f for f in args.fronts if f > args.workers]
    print(
        f"modelpool {modelpool.__version__}, Python {sys.version.split()[0]}, numpy "
        f"{np.__version__}, {cpus} CPUs, load average {os.getloadavg()[0]:.1f}; "
        f"F = {', '.join(map(str, args.fronts))}; {args.workers} workers in all, split over "
        f"the fronts; {args.rounds} round(s) of {args.seconds} s per contender"
    )
    if over:
        print(
            f"note: F = {', '.join(map(str, over))} exceed(s) --workers {args.workers}: each "
            "front runs one worker, so those servers have more workers in all"
        )
    print(
        f"load: wrk, {args.wrk_threads} thread(s), {args.connections} keep-alive connections, "
        "on the same CPUs as the servers;\nratios are medians of within-round ratios "
        "(p25-p75 in brackets); req/s, p50, p99 are medians over rounds"
    )
    servers = make_servers(args.fronts, args.workers, args.ceiling)
    samples = bench.measured(servers, lambda: measure(servers, args))
    if samples is None:
        return 1
    summary = summarize(samples, args.fronts)
    report(summary, args)
    print(f"\n(load average at the end: {os.getloadavg()[0]:.1f})")
    if args.json:
        results = {
            "machine": {
                "cpus": cpus,
                "python": sys.version.split()[0],
                "modelpool": modelpool.__version__,
                "numpy": np.__version__,
            },
            "settings": {
                "fronts": args.fronts,
                "workers": args.workers,
                "workers_in_use": {str(f): workers_in_use(args.workers, f) for f in args.fronts},
                "connections": args.connections,
                "wrk_threads": args.wrk_threads,
                "seconds": args.seconds,
                "rounds": args.rounds,
                "warmup": args.warmup,
            },
            "results": summary,
        }
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
