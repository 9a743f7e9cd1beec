"""Streaming: time to first piece against the model's own, pieces per second, and a slow reader.

    python bench/streaming.py              # 3 rounds
    python bench/streaming.py --quick      # one short round (CI)
    python bench/streaming.py --json streaming.json

The model (``common:Ticker``) works ``first_ms`` (20 ms) before its first yield and reports,
in that piece, how long it took by its own clock (from the call to the yield). Three ways in:

* ``Pool.stream`` in this process (one worker);
* HTTP: ``modelpool serve``'s ``generate_stream`` (Server-Sent Events), read with
  ``modelpool.Client.stream`` (a new connection per stream, as it makes them);
* gRPC: ``ModelStreamInfer``, one call per stream over one channel (``grpc`` itself).

Time to first piece: from the call to the first piece in hand, against the model's own time to
its first yield; the difference is what the path costs. Pieces per second: one stream of 2,000
small pieces, no work between them. Slow reader (HTTP): a stream of 1 MiB pieces whose reader
takes the first and then stops reading for a while; the model's own count of pieces yielded,
and the server's memory (front and worker RSS), are sampled meanwhile. Without back-pressure
the model would run to the end (``SLOW_PIECES`` MiB) while nobody reads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import modelpool
import server as bench  # bench/server.py: server processes
from modelpool._grpc_schema import SERVICE, messages

FIRST_MS = 20.0
RATE_PIECES = 2000
SLOW_PIECES = 300
SLOW_SIZE = 1 << 20

Stream = Callable[[int, int, float, str], Iterator[dict[str, Any]]]


def _inputs(n: int, size: int, first_ms: float, log: str) -> dict[str, Any]:
    return {
        "n": np.array([n]),
        "size": np.array([size]),
        "first_ms": np.array([first_ms]),
        "log": np.array([log.encode()], dtype=object),
    }


# ----------------------------------------------------------------------------- the three ways


def _pool_stream(pool: modelpool.Pool) -> Stream:
    def stream(n: int, size: int, first_ms: float, log: str) -> Iterator[dict[str, Any]]:
        with pool.stream(_inputs(n, size, first_ms, log)) as pieces:
            for piece in pieces:
                yield {"i": int(piece["i"][0]), "took": float(piece["took"][0])}

    return stream


def _http_stream(client: modelpool.Client) -> Stream:
    def stream(n: int, size: int, first_ms: float, log: str) -> Iterator[dict[str, Any]]:
        doc = {"n": n, "size": size, "first_ms": first_ms, "log": log}
        for piece in client.stream("ticker", doc):
            yield {"i": piece["i"], "took": piece["took"]}

    return stream


def _grpc_stream(channel: Any) -> Stream:
    m = messages()
    call = channel.stream_stream(f"/{SERVICE}/ModelStreamInfer")

    def stream(n: int, size: int, first_ms: float, log: str) -> Iterator[dict[str, Any]]:
        request = m.ModelInferRequest(model_name="ticker")
        for name, value in _inputs(n, size, first_ms, log).items():
            datatype = {"n": "INT64", "size": "INT64", "first_ms": "FP64"}.get(name, "BYTES")
            request.inputs.add(name=name, datatype=datatype, shape=[1])
            raw = value.tobytes() if datatype != "BYTES" else _bytes_tensor(value[0])
            request.raw_input_contents.append(raw)
        answers = call(iter([request.SerializeToString()]))
        try:
            for data in answers:
                answer = m.ModelStreamInferResponse.FromString(data)
                if answer.error_message:
                    raise bench.BenchError(f"gRPC stream failed: {answer.error_message}")
                response = answer.infer_response
                names = [o.name for o in response.outputs]
                raws = dict(zip(names, response.raw_output_contents, strict=True))
                i = int(np.frombuffer(raws["i"], np.int64)[0])
                took = float(np.frombuffer(raws["took"], np.float64)[0])
                yield {"i": i, "took": took}
                if i == n - 1:
                    return
        finally:
            answers.cancel()

    return stream


def _bytes_tensor(value: bytes) -> bytes:
    return len(value).to_bytes(4, "little") + value


# ----------------------------------------------------------------------------- the measures


def first_piece(stream: Stream, times: int) -> dict[str, float]:
    """Medians over ``times`` streams of one piece: time to it, the model's own, the cost."""
    total, own = [], []
    for _ in range(times):
        started = time.perf_counter()
        pieces = stream(1, 0, FIRST_MS, "")
        piece = next(pieces)
        total.append(time.perf_counter() - started)
        own.append(piece["took"])
        if sum(1 for _ in pieces):
            raise bench.BenchError("more than one piece")
    cost = [t - o for t, o in zip(total, own, strict=True)]
    return {
        "first_piece_ms": statistics.median(total) * 1e3,
        "model_first_yield_ms": statistics.median(own) * 1e3,
        "cost_ms": statistics.median(cost) * 1e3,
        "cost_p90_ms": sorted(cost)[int(0.9 * (len(cost) - 1))] * 1e3,
    }


def rate(stream: Stream) -> dict[str, float]:
    started = time.perf_counter()
    count = sum(1 for _ in stream(RATE_PIECES, 0, 0.0, ""))
    elapsed = time.perf_counter() - started
    if count != RATE_PIECES:
        raise bench.BenchError(f"{count} pieces of {RATE_PIECES}")
    return {"pieces_per_s": count / elapsed, "us_per_piece": elapsed / count * 1e6}


def _rss_mib(server: bench.ServerProcess) -> dict[str, float]:
    """RSS of the server's front (the process we started) and of the rest (its workers)."""
    front = rest = 0
    assert server.proc is not None
    for fields in server.session():
        try:
            with open(f"/proc/{fields[0]}/status") as f:
                kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        if int(fields[0]) == server.proc.pid:
            front += kb
        else:
            rest += kb
    return {"front": front / 1024, "workers": rest / 1024}


def slow_reader(
    client: modelpool.Client, server: bench.ServerProcess, stall: float
) -> dict[str, Any]:
    """One stream of ``SLOW_PIECES`` pieces of 1 MiB: read one, stall, read the rest."""
    log = os.path.join(tempfile.mkdtemp(prefix="bench-stream-"), "yielded")
    doc = {"n": SLOW_PIECES, "size": SLOW_SIZE, "first_ms": 0.0, "log": log}
    before = _rss_mib(server)
    pieces = client.stream("ticker", doc)
    next(pieces)
    samples = []
    end = time.monotonic() + stall
    while time.monotonic() < end:
        time.sleep(0.25)
        with open(log) as f:
            yielded = int(f.read() or 0)
        samples.append({"yielded": yielded, **_rss_mib(server)})
    read = 1 + sum(1 for _ in pieces)
    return {
        "pieces": SLOW_PIECES,
        "read": read,
        "stall_s": stall,
        "yielded_during_stall_max": max(s["yielded"] for s in samples),
        "front_rss_growth_mib": max(s["front"] for s in samples) - before["front"],
        "worker_rss_growth_mib": max(s["workers"] for s in samples) - before["workers"],
        "unread_if_unbounded_mib": (SLOW_PIECES - 1) * SLOW_SIZE / (1 << 20),
    }


# ----------------------------------------------------------------------------- the run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (CI)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; 1 with --quick)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    import grpc

    rounds = args.rounds or (1 if args.quick else 3)
    times = 10 if args.quick else 40
    stall = 1.5 if args.quick else 4.0
    grpc_port = bench.free_port()
    config = os.path.join(tempfile.mkdtemp(prefix="bench-stream-"), "modelpool.yaml")
    with open(config, "w") as f:
        json.dump(
            {
                "server": {"grpc_port": grpc_port},
                "models": {"ticker": {"model": "common:Ticker", "workers": 1}},
            },
            f,
        )
    server = bench.ServerProcess(
        "modelpool", [sys.executable, "-m", "modelpool.cli", "serve", config]
    )
    print(
        f"modelpool {modelpool.__version__}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; one worker; "
        f"{rounds} round(s); the model works {FIRST_MS:g} ms before its first piece"
    )

    def run() -> dict[str, Any]:
        server.start()
        server.wait_ready(time.monotonic() + 120)
        samples: dict[str, list[dict[str, float]]] = {"Pool.stream": [], "HTTP SSE": [], "gRPC": []}
        with (
            modelpool.Pool("common:Ticker", workers=1) as pool,
            modelpool.Client(server.url) as client,
            grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
        ):
            ways = {
                "Pool.stream": _pool_stream(pool),
                "HTTP SSE": _http_stream(client),
                "gRPC": _grpc_stream(channel),
            }
            for stream in ways.values():  # warm-up
                first_piece(stream, 2)
            for r in range(rounds):
                for name in list(ways) if r % 2 == 0 else list(ways)[::-1]:
                    samples[name].append({**first_piece(ways[name], times), **rate(ways[name])})
            slow = slow_reader(client, server, stall)
        return {"ways": samples, "slow_reader": slow}

    result = bench.measured({"server": server}, run)
    if result is None:
        return 1
    print(f"\n{'':12} {'first piece':>12} {'model own':>10} {'cost':>8} {'cost p90':>9} "
          f"{'pieces/s':>9} {'us/piece':>9}")  # fmt: skip
    table = {}
    for name, runs in result["ways"].items():
        med = {k: statistics.median(s[k] for s in runs) for k in runs[0]}
        table[name] = med
        print(
            f"{name:12} {med['first_piece_ms']:9.2f} ms {med['model_first_yield_ms']:7.2f} ms "
            f"{med['cost_ms']:5.2f} ms {med['cost_p90_ms']:6.2f} ms {med['pieces_per_s']:9.0f} "
            f"{med['us_per_piece']:9.1f}"
        )
    slow = result["slow_reader"]
    print(
        f"\nslow reader (HTTP, {slow['pieces']} pieces of 1 MiB; one read, then "
        f"{slow['stall_s']:g} s without reading): the model yielded at most "
        f"{slow['yielded_during_stall_max']} meanwhile; front RSS "
        f"+{slow['front_rss_growth_mib']:.1f} MiB, worker RSS "
        f"+{slow['worker_rss_growth_mib']:.1f} MiB (unbounded, "
        f"{slow['unread_if_unbounded_mib']:.0f} MiB would wait); then all {slow['read']} read"
    )
    if slow["read"] != slow["pieces"]:
        print("error: the slow reader did not get every piece", file=sys.stderr)
        return 1
    print(f"\n(load average at the end: {os.getloadavg()[0]:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ways": table, "slow_reader": slow}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
