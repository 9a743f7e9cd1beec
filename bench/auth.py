"""What authentication costs a served model: the same server with auth off and on.

Two ``modelpool serve`` processes of the small MLP (bench/common.py, 2 workers), one without
authentication and one with it (``--auth``, a SQLite database made for the run in a
temporary data directory), loaded by ``wrk`` (32 connections, keep-alive) in alternating
rounds; the second sends ``Authorization: Bearer <key>`` with every request. Batching off
(the front's cost per request shows most) and batching on. Ratios are medians of the
within-round ratios of req/s, auth on over auth off. Issue 13's target: at least 0.95x (at most
5 % of throughput), docs/benchmarks.md.

    python bench/auth.py            # 5 rounds of 4 s per contender (~2 min)
    python bench/auth.py --quick    # one short round (CI)
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import modelpool
import server as bench  # bench/server.py: the servers, wrk and the tables

TARGET = 0.95
PATH = "/v2/models/mlp/infer"
CONNECTIONS = bench.SMALL_CONNECTIONS


async def _make_key(data_dir: str) -> str:
    from modelpool.auth._db import Database
    from modelpool.auth._store import Store

    db = Database("sqlite:///" + os.path.join(data_dir, "modelpool.db"))
    try:
        await db.open()
        store = Store(db)
        await store.add_user("bench", "a password for the benchmark")
        key, _ = await store.create_key("bench")
        return key
    finally:
        await db.close()


def main() -> int:
    options = bench.short_bench_options(__doc__.split("\n")[0], full=(5, 4), quick=(1, 2))
    if options is None:
        return 2
    rounds, seconds, quick = options
    print(
        f"modelpool {modelpool.__version__}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; small MLP, {bench.WORKERS} workers, {CONNECTIONS} "
        f"connections; {rounds} round(s) of {seconds} s per contender"
    )
    with tempfile.TemporaryDirectory(prefix="modelpool-bench-auth-") as tmp:
        data_dir = os.path.join(tmp, "data")
        key = asyncio.run(_make_key(data_dir))
        bearer = f"Bearer {key}"
        # batches of 32 rows, the setting its figures in docs/benchmarks.md were measured with
        batching = bench.batching_args(bench.WIDE_BATCH_SIZE)
        mlp = bench.modelpool_server("common:MLP", "mlp")
        env = {"MODELPOOL_DATA_DIR": data_dir}
        makers = {
            "off": lambda: bench.ServerProcess("auth off", mlp),
            "on": lambda: bench.ServerProcess("auth on", [*mlp, "--auth"], env=env),
            "off-batch": lambda: bench.ServerProcess("auth off, batching", [*mlp, *batching]),
            "on-batch": lambda: bench.ServerProcess(
                "auth on, batching", [*mlp, *batching, "--auth"], env=env
            ),
        }
        servers: dict[str, bench.ServerProcess] = {}
        pairs = [
            ("batching off", "off", "on"),
            (
                f"batching {bench.WIDE_BATCH_SIZE} / {bench.BATCH_DELAY * 1e3:g} ms",
                "off-batch",
                "on-batch",
            ),
        ]
        plan = []
        for title, off, on in pairs:
            scenario = bench.Scenario(
                f"Small MLP, {title}",
                "mlp",
                CONNECTIONS,
                [bench.Contender("auth off", off, PATH), bench.Contender("auth on", on, PATH)],
            )
            scenario.samples = {"auth off": [], "auth on": []}
            plan.append(scenario)
        bodies, _ = bench.make_bodies()
        load = bench.Load(tmp, bodies)
        try:
            for i in range(rounds):
                # fresh server processes every round: one process's luck (where its memory
                # and CPUs fall) moves req/s by several percent, more than what is measured
                servers = {key: make() for key, make in makers.items()}
                for server in servers.values():
                    server.start()
                deadline = time.monotonic() + 120
                for server in servers.values():
                    server.wait_ready(deadline)
                for name, server in servers.items():  # each answers; "on" needs the key
                    auth = bearer if name.startswith("on") else ""
                    bench.post(server, PATH, bodies["mlp"], auth)
                for scenario in plan:
                    order = scenario.contenders if i % 2 == 0 else scenario.contenders[::-1]
                    for c in order:
                        auth = bearer if c.label == "auth on" else ""
                        server = servers[c.server]
                        run = load.run(server, PATH, "mlp", CONNECTIONS, seconds, auth)
                        scenario.samples[c.label].append(run)
                for server in servers.values():
                    server.stop()
        except bench.BenchError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            return 1
        finally:
            for server in servers.values():
                server.stop()
    worst = None
    for scenario in plan:
        summary = bench.summarize(scenario)
        bench.report(scenario, summary)
        ratio = summary["auth on"]
        worst = ratio["x_base"] if worst is None else min(worst, ratio["x_base"])
        print(
            f"  auth on / auth off: {ratio['x_base']:.3f}x "
            f"({ratio['x_base_p25']:.3f}-{ratio['x_base_p75']:.3f}); front CPU "
            f"{summary['auth on']['front_cpu_us'] - summary['auth off']['front_cpu_us']:+.1f} "
            "us per request"
        )
    assert worst is not None
    verdict = "met" if worst >= TARGET else "missed"
    print(f"\ntarget: auth on >= {TARGET}x auth off's req/s: {verdict} ({worst:.3f}x, worst row)")
    if quick:
        print("(--quick: one short round checks that the bench runs; judge from a full run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
