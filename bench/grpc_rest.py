"""gRPC against REST on the same server and model: requests/s and p50/p99 latency.

    python bench/grpc_rest.py              # 5 rounds of 4 s per protocol and scenario
    python bench/grpc_rest.py --quick      # one short round (CI)
    python bench/grpc_rest.py --json grpc.json

One ``modelpool serve`` (2 workers, batching off) serves both ports. The load comes from one
client process per run, the same for both protocols: asyncio (uvloop when installed) with a
fixed number of requests in flight, each request's bytes built once beforehand. REST goes over
keep-alive HTTP/1.1 connections (one per request in flight, the body in Triton's binary
format); gRPC over one HTTP/2 channel (the request serialized once, sent as bytes through
``grpc.aio``). Scenarios: the small MLP (1 row of 64 floats), 32 in flight; a 4 MiB FP32
tensor through the identity model, 4 in flight. Rounds alternate the order; ratios are the
median of per-round ratios (p25-p75). The client's CPU per request is printed: Python's gRPC
client and the HTTP client here do not cost the same, and on a small machine the client shares
the CPUs with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import modelpool
import server as bench  # bench/server.py: server processes, ratios
from modelpool._grpc_schema import SERVICE, messages
from modelpool._protocol import encode_infer_request

SCENARIOS = {
    "mlp": ("Small MLP, 1 row of 64 FP32", "mlp", 32, (1, 64)),
    "big": ("Identity, 4 MiB FP32 in and out", "identity", 4, (1, 1 << 20)),
}
PROTOCOLS = ("REST", "gRPC")


def _bodies(model: str, shape: tuple[int, ...]) -> tuple[bytes, bytes]:
    """The REST request (head and binary body) and the gRPC ModelInferRequest's bytes."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    name = "x" if model == "mlp" else "INPUT0"
    body, length = encode_infer_request({name: x}, binary=True)
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: bench\r\n"
        f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {length}"
        f"\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    request = messages().ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype="FP32", shape=shape)
    request.raw_input_contents.append(x.tobytes())
    return head + body, request.SerializeToString()


# ----------------------------------------------------------------------------- the client


async def _rest(port: int, data: bytes, in_flight: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < end:
                start = time.perf_counter()
                writer.write(data)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"REST answered {head[:40]!r}")
                (length,) = (
                    int(line[15:])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                )
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(in_flight)))
    return latencies


async def _grpc(port: int, data: bytes, in_flight: int, seconds: float) -> list[float]:
    import grpc

    latencies: list[float] = []
    end = time.perf_counter() + seconds
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        infer = channel.unary_unary(f"/{SERVICE}/ModelInfer")  # bytes in, bytes out

        async def caller() -> None:
            while time.perf_counter() < end:
                start = time.perf_counter()
                await infer(data, timeout=30)
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(caller() for _ in range(in_flight)))
    return latencies


def client_main(protocol: str, port: int, scenario: str, seconds: float) -> None:
    _, model, in_flight, shape = SCENARIOS[scenario]
    rest, grpc_bytes = _bodies(model, shape)
    run = _rest(port, rest, in_flight, seconds) if protocol == "REST" else None
    if run is None:
        run = _grpc(port, grpc_bytes, in_flight, seconds)
    try:
        import uvloop

        latencies = uvloop.run(run)
    except ImportError:
        latencies = asyncio.run(run)
    latencies.sort()
    n = len(latencies)
    p50, p99 = (latencies[min(n - 1, int(n * q))] if n else 0.0 for q in (0.5, 0.99))
    print(json.dumps({"n": n, "p50": p50, "p99": p99}), flush=True)


# ----------------------------------------------------------------------------- the runs


def _measure(server: bench.ServerProcess, grpc_port: int, protocol: str, scenario: str,
             seconds: float) -> dict[str, float]:  # fmt: skip
    port = server.port if protocol == "REST" else grpc_port
    me = [sys.executable, os.path.abspath(__file__), "--client", protocol, "--port", str(port)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before, _ = server.cpu_seconds()
    started = time.perf_counter()
    done = subprocess.run(
        [*me, "--scenario", scenario, "--seconds", str(seconds)],
        capture_output=True, text=True, timeout=seconds + 120,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    server_after, _ = server.cpu_seconds()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise bench.BenchError(f"{protocol} client failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.splitlines()[-1])
    n = result["n"]
    if not n:
        raise bench.BenchError(f"{protocol}: no request answered")
    client = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "req_per_s": n / seconds,
        "p50_ms": result["p50"] * 1e3,
        "p99_ms": result["p99"] * 1e3,
        "server_cpu_us": (server_after - server_before) / n * 1e6,
        "client_cpu_us": client / n * 1e6,
        "wall_s": elapsed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (CI)")
    parser.add_argument("--rounds", type=int, help="rounds (default 5; 1 with --quick)")
    parser.add_argument("--seconds", type=float, help="seconds per run (default 4; 2 quick)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--client", choices=PROTOCOLS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--scenario", choices=list(SCENARIOS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args.client, args.port, args.scenario, args.seconds)
        return 0
    rounds = args.rounds or (1 if args.quick else 5)
    seconds = args.seconds or (2.0 if args.quick else 4.0)
    grpc_port = bench.free_port()
    config = os.path.join(tempfile.mkdtemp(prefix="bench-grpc-"), "modelpool.yaml")
    with open(config, "w") as f:
        json.dump(
            {
                "server": {"grpc_port": grpc_port, "max_body_size": "16MiB"},
                "models": {
                    "mlp": {"model": "common:MLP", "workers": bench.WORKERS},
                    "identity": {"model": "common:Identity", "workers": bench.WORKERS},
                },
            },
            f,
        )
    argv = [sys.executable, "-m", "modelpool.cli", "serve", config]
    server = bench.ServerProcess("modelpool (REST + gRPC)", argv)
    print(
        f"modelpool {modelpool.__version__}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; one server, "
        f"{bench.WORKERS} workers per model, batching off; {rounds} round(s) of {seconds:g} s"
    )

    def run() -> dict[str, Any]:
        server.start()
        server.wait_ready(time.monotonic() + 120)
        samples: dict[str, dict[str, list[dict[str, float]]]] = {}
        for scenario in SCENARIOS:
            samples[scenario] = {p: [] for p in PROTOCOLS}
            for p in PROTOCOLS:  # warm-up
                _measure(server, grpc_port, p, scenario, 1.0)
            for r in range(rounds):
                order = PROTOCOLS if r % 2 == 0 else PROTOCOLS[::-1]
                for p in order:
                    samples[scenario][p].append(_measure(server, grpc_port, p, scenario, seconds))
        return samples

    samples = bench.measured({"server": server}, run)
    if samples is None:
        return 1
    results: dict[str, Any] = {}
    for scenario, (title, _, in_flight, _) in SCENARIOS.items():
        runs = samples[scenario]
        ratio = bench.spread(bench.within_rounds(runs["gRPC"], runs["REST"]))
        print(f"\n{title}, {in_flight} in flight:")
        print(f"  {'':6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'server CPU/req':>15} "
              f"{'client CPU/req':>15}")  # fmt: skip
        table = {}
        for p in PROTOCOLS:
            med = {k: statistics.median(s[k] for s in runs[p]) for k in runs[p][0]}
            table[p] = med
            print(
                f"  {p:6} {med['req_per_s']:8.0f} {med['p50_ms']:8.2f} {med['p99_ms']:8.2f} "
                f"{med['server_cpu_us']:12.0f} us {med['client_cpu_us']:12.0f} us"
            )
        print(
            f"  gRPC over REST: {ratio['median']:.2f}x req/s ({ratio['p25']:.2f}-"
            f"{ratio['p75']:.2f}), median of per-round ratios"
        )
        results[scenario] = {"title": title, **table, "grpc_over_rest": ratio}
    print(f"\n(load average at the end: {os.getloadavg()[0]:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
