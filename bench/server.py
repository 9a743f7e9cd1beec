"""The HTTP server: requests/s and p50/p99 latency at fixed concurrency, against bare aiohttp
handlers measured in the same run.

    python bench/server.py                 # full run (~5 min on 2 cores)
    python bench/server.py --quick         # one short round (< 60 s), for CI
    python bench/server.py --json results.json
    python bench/server.py --target-only --also-src ../patched/src   # A/B a patch, same rounds
    python bench/server.py --target-only --peers   # + LitServe and MLServer (bench/peers.py)

Every server runs as its own subprocess (2 workers where there are workers) on a free port;
the load comes from ``wrk`` (one thread, keep-alive connections, a Lua script for the POST
body and the percentiles). Rounds alternate the contenders (order reversed every other round)
so that drift on a shared machine hits them alike; figures are medians over rounds. A ratio
(x base: req/s over the table's first row's; the context line's ratios to the
ProcessPoolExecutor app) is taken within each round, from two runs of that round, and printed
as the median of the per-round ratios with their p25-p75; never as a quotient of medians.
Any non-2xx answer or socket error is a failure (exit 1); a missed target is only reported
(exit 0).

Scenarios:

* the demo model (iris, small JSON) and an identity model (small JSON tensors; 4 MiB FP32 in
  and out with Triton's binary extension) against a bare aiohttp handler that reads the body
  and answers a fixed small JSON (or echoes the binary body): the server's overhead as a ratio;
* a small NumPy MLP (64 -> 256 -> 10, 1 row per request), 32 connections, 2 workers, batching
  off and on (batches of 16 rows: the connections over the workers; 2 ms delay), against a
  bare aiohttp handler computing the MLP inline (issue 12's targets, in
  docs/benchmarks.md: batching off >= 0.6x its req/s with a p99 <= 1.5x its p99 and a front
  CPU per request <= 1.5x its CPU per request; batching on >= 1.0x with a p99 <= its p99).
  For context, in the same rounds: a hand-written aiohttp + ProcessPoolExecutor app (2
  workers, model loaded by the initializer); batches of 32 rows (every connection's request);
  modelpool on asyncio's own loop instead of the default (uvloop when installed); ``--fronts
  2`` (two front processes sharing the port, one worker each); modelpool's HTTP app with the
  MLP run inline instead of in a pool (the HTTP layer's cost alone), and the same in 2
  processes sharing the port;
* the same MLP over one connection: modelpool's p50 latency against the bare handler's
  (target: within 250 us).

On a 2-core machine the client shares the CPU with the server; it is kept cheap (wrk, one
thread) and identical for every contender, and its CPU time per request is printed, as is the
server's (all its processes) and its front end's (the process serving HTTP, or the front
processes with ``--fronts``; not the workers). ``python bench/server.py --app KIND --port P``
runs one of the comparison apps (internal).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import http.client
import json
import math
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import orjson

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MLP

import modelpool
from modelpool import _infer
from modelpool._protocol import CodecError, decode_infer_response, encode_infer_request

HERE = os.path.dirname(os.path.abspath(__file__))
T = TypeVar("T")
WORKERS = 2
SMALL_CONNECTIONS = 32
BIG_CONNECTIONS = 8
BIG_BYTES = 4 * 2**20
#: rows per batch: the connections over the workers, so that while one worker runs a batch the
#: front reads the next one (docs/guide.md, "Choosing the batch size and delay")
BATCH_SIZE = SMALL_CONNECTIONS // WORKERS
#: for context: a batch as wide as every connection, which the front fills while the workers
#: wait, and the workers run while the front waits (the setting of the 2026-12 tables)
WIDE_BATCH_SIZE = SMALL_CONNECTIONS
BATCH_DELAY = 0.002
TARGET_RATIO = 0.6
TARGET_P99_MS = 20.0
#: the single-threaded BLAS that modelpool's workers set for themselves, for every process
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
HEADER_LENGTH = "Inference-Header-Content-Length"
BARE_MLP_LABEL = "bare aiohttp, MLP inline"
OFF_LABEL = "modelpool, batching off"
ON_LABEL = f"modelpool, batching {BATCH_SIZE} / {BATCH_DELAY * 1e3:g} ms"
WIDE_LABEL = f"modelpool, batching {WIDE_BATCH_SIZE} / {BATCH_DELAY * 1e3:g} ms"
PPE_LABEL = "aiohttp + ProcessPoolExecutor"
INLINE_LABEL = "modelpool's HTTP app, MLP inline, no pool"
PREFORK_LABEL = f"same, {WORKERS} processes sharing the port"
ASYNCIO_LABEL = "modelpool, batching off, asyncio loop"
FRONTS_LABEL = f"modelpool, batching off, --fronts {WORKERS} (1 worker each)"
#: issue 12's targets (docs/benchmarks.md): ratios to the bare handler computing the MLP inline
TARGET_ON_RATIO = 1.0
TARGET_P99_FACTOR = 1.5
TARGET_FRONT_CPU_FACTOR = 1.5
TARGET_ONE_CONN_US = 250
TARGET_BIG_RATIO = 0.9

WRK_SCRIPT = """\
local f = assert(io.open(os.getenv("WRK_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE")
local authorization = os.getenv("WRK_AUTHORIZATION")
if authorization ~= nil and authorization ~= "" then
  wrk.headers["Authorization"] = authorization
end
local header_length = os.getenv("WRK_HEADER_LENGTH")
if header_length ~= nil and header_length ~= "" then
  wrk.headers["Inference-Header-Content-Length"] = header_length
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non2xx": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "timeout": %d, "p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


class BenchError(Exception):
    """The benchmark could not measure (a server failed, an answer was not 200)."""


# ----------------------------------------------------------------------------- baseline apps


def _mlp() -> MLP:
    model = MLP()
    model.setup()
    return model


def _decode_x(body: bytes) -> np.ndarray:
    tensor = orjson.loads(body)["inputs"][0]
    return np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])


def _encode_y(y: np.ndarray) -> bytes:
    out = {"name": "y", "datatype": "FP32", "shape": list(y.shape), "data": y.reshape(-1)}
    return orjson.dumps({"model_name": "mlp", "outputs": [out]}, option=orjson.OPT_SERIALIZE_NUMPY)


_PPE_MODEL: MLP | None = None


def _ppe_init() -> None:
    global _PPE_MODEL
    _PPE_MODEL = _mlp()


def _ppe_predict(x: np.ndarray) -> np.ndarray:
    assert _PPE_MODEL is not None
    y: np.ndarray = _PPE_MODEL.predict({"x": x})["y"]
    return y


class InlinePool:
    """What modelpool's server needs of a pool, with the MLP run inline (no workers): the
    server with it isolates the cost of the HTTP layer (aiohttp, codec, metrics) from the
    pool's."""

    model_class = MLP

    def __init__(self) -> None:
        self.model = _mlp()

    def start_predict(
        self, inputs: Any, timeout: float | None = None, *, request_id: str | None = None
    ) -> Any:
        """What the server calls: the answer, already in a future (no worker ran it)."""
        outputs = self.model.predict(inputs)

        async def wait() -> Any:
            return outputs

        return types.SimpleNamespace(wait=wait, worker_pid=None)

    def start_infer(self, body: bytes, header_length: int | None = None, **kwargs: Any) -> Any:
        """What the server calls without batching: the worker's whole job (decode, predict,
        encode), done here."""
        payload = _infer.request_payload(
            "mlp", kwargs.get("version"), body, header_length, kwargs.get("request_id"), True
        )
        answer = _infer.handle(self.model, payload)

        async def wait() -> Any:
            return answer

        return types.SimpleNamespace(wait=wait, worker_pid=None)

    def attach_loop(self, loop: Any) -> None:
        """Nothing to attach: no worker answers to read."""

    def detach_loop(self) -> None:
        """Nothing attached."""

    def stats(self) -> dict[str, Any]:
        worker = types.SimpleNamespace(state="idle", served=0, pid=None)
        return {"workers": [worker], "queued": 0, "in_flight": 0, "exit_reasons": {}}

    def probe(self) -> cf.Future[bool]:
        """The readiness probe: the model is loaded."""
        future: cf.Future[bool] = cf.Future()
        future.set_result(True)
        return future


def _baseline_app(kind: str, workers: int) -> tuple[Any, cf.ProcessPoolExecutor | None]:
    """The baselines: ``bare`` (a no-op handler, an echo, the MLP inline) and ``ppe`` (the
    MLP in a ProcessPoolExecutor, as one would write it by hand)."""
    from aiohttp import web

    fixed = orjson.dumps(
        {
            "model_name": "noop",
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [1], "data": [0.0]}],
        }
    )
    json_headers = {"Content-Type": "application/json"}
    routes = web.RouteTableDef()
    pool: cf.ProcessPoolExecutor | None = None

    if kind == "bare":
        model = _mlp()

        @routes.post("/v2/models/noop/infer")
        async def noop(request: web.Request) -> web.Response:
            body = await request.read()
            length = request.headers.get(HEADER_LENGTH)
            if length is None:
                return web.Response(body=fixed, headers=json_headers)
            headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: length}
            return web.Response(body=body, headers=headers)

        @routes.post("/v2/models/mlp/infer")
        async def mlp(request: web.Request) -> web.Response:
            x = _decode_x(await request.read())
            return web.Response(body=_encode_y(model.predict({"x": x})["y"]), headers=json_headers)

    else:
        # forked (the default on Linux) before the event loop runs; both workers start at once
        pool = cf.ProcessPoolExecutor(workers, initializer=_ppe_init)
        for f in [pool.submit(_ppe_predict, np.zeros((1, 64), np.float32)) for _ in range(4)]:
            f.result()

        @routes.post("/v2/models/mlp/infer")
        async def ppe(request: web.Request) -> web.Response:
            x = _decode_x(await request.read())
            y = await asyncio.get_running_loop().run_in_executor(pool, _ppe_predict, x)
            return web.Response(body=_encode_y(y), headers=json_headers)

    app = web.Application(client_max_size=64 * 2**20)
    app.add_routes(routes)
    return app, pool


async def _serve_app(kind: str, port: int, workers: int, processes: int, copy: bool) -> None:
    """Run a baseline app, or modelpool's HTTP app over ``InlinePool`` (``inline``). With
    ``processes`` > 1, that many copies share the port (SO_REUSEPORT): this one starts the
    others and stops them on SIGTERM."""
    from aiohttp import web

    pool: cf.ProcessPoolExecutor | None = None
    if kind == "inline":  # configured as modelpool.server._main configures it
        from modelpool.config import Config
        from modelpool.server import ServedModel, Server

        config = Config.from_mapping(
            {"models": {"mlp": {"model": "common:MLP", "workers": workers}}}
        )
        inline = InlinePool()
        served = ServedModel("mlp", config.models["mlp"], pool=inline)  # type: ignore[arg-type]
        server = Server(config, {"mlp": served})
        runner = web.AppRunner(
            server.app(), handle_signals=False, access_log=None, handler_cancellation=True
        )
    else:
        app, pool = _baseline_app(kind, workers)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    shared = copy or processes > 1
    site: web.BaseSite
    # as modelpool serve listens: infer requests take the fast path (when the modelpool
    # imported has one: --also-src may name an older checkout)
    if kind == "inline" and hasattr(server, "fast_paths"):
        from modelpool.server._fastpath import FastSite

        site = FastSite(
            runner, server.fast_paths, "127.0.0.1", port, backlog=1024, reuse_port=shared
        )
    else:
        site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024, reuse_port=shared or None)
    await site.start()
    argv = [sys.executable, __file__, "--app", kind, "--port", str(port), "--copy"]
    argv += ["--workers", str(workers)]
    # each copy says "ready" on its stdout; what else it has to say goes to our stderr
    copies = [subprocess.Popen(argv, stdout=subprocess.PIPE) for _ in range(processes - 1)]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        for c in copies:
            assert c.stdout is not None
            if not c.stdout.readline().startswith(b"ready:"):
                raise SystemExit(f"a copy of the {kind} app did not start")
        print(f"ready: {kind} on port {port}", flush=True)
        await stop.wait()
    finally:
        for c in copies:
            c.terminate()
        for c in copies:
            try:
                c.wait(30)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()
        await runner.cleanup()
        if pool is not None:
            pool.shutdown()


# ----------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ServerProcess:
    """A server subprocess in its own session: started, awaited until it prints ``ready:``,
    stopped with SIGTERM and reaped; anything left in its session is reported and killed."""

    def __init__(
        self,
        label: str,
        argv: list[str],
        src: str | None = None,
        ready: str = "ready:",
        launcher: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.label = label
        self.env = env or {}  # added to the environment it starts with
        self.launcher = launcher  # a peer's launcher (bench/peers.py): its front is not known
        self.ready_line = ready  # what it prints once it serves
        self.src = src  # a source tree to import modelpool from, ahead of the installed one
        self.port = free_port()
        self.argv = [*argv, "--port", str(self.port)]
        self.lines: collections.deque[str] = collections.deque(maxlen=40)
        self.ready = threading.Event()
        self.proc: subprocess.Popen[str] | None = None
        self.leaked = 0

    def start(self) -> None:
        env = {**os.environ, **THREAD_ENV, **self.env}
        path = [HERE, self.src, env.get("PYTHONPATH")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line.rstrip())
            if line.startswith(self.ready_line):
                self.ready.set()

    def wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        while not self.ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = "exited" if self.proc.poll() is not None else "was not ready in time"
                raise BenchError(f"{self.label} {why}; its output:\n" + self.tail())

    def tail(self) -> str:
        return "\n".join("    " + line for line in self.lines)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def session(self) -> list[list[str]]:
        """/proc/PID/stat fields (from the state on) of the live processes in its session."""
        assert self.proc is not None
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == self.proc.pid and fields[0] not in "ZX":  # session id, state
                found.append([entry, *fields])
        return found

    def cpu_seconds(self) -> tuple[float, float]:
        """User + system CPU seconds of every live process in the server's session, and of
        its front end alone: the process we started and the front processes it started
        (``--fronts``), not the workers or helpers under them."""
        assert self.proc is not None
        total = front = 0
        for f in self.session():  # fields from the state on: ppid is [1], utime/stime [12:14]
            ticks = int(f[12]) + int(f[13])
            total += ticks
            if int(f[0]) == self.proc.pid or (int(f[2]) == self.proc.pid and _is_front(int(f[0]))):
                front += ticks
        tick = os.sysconf("SC_CLK_TCK")
        if self.launcher:  # a peer's HTTP processes are not told apart from its workers here
            return total / tick, math.nan
        return total / tick, front / tick

    def pause(self, paused: bool) -> None:
        """Stop (SIGSTOP) or continue every process of a launched peer: a peer idle between
        its own runs still polls its queues, and must not take CPU from the others'."""
        if not self.launcher:
            return
        for f in self.session():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(f[0]), signal.SIGSTOP if paused else signal.SIGCONT)

    def stop(self) -> None:
        proc = self.proc
        self.pause(False)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                self.lines.append("(did not stop within 30 s of SIGTERM: killed)")
                proc.kill()
                proc.wait()
        deadline = time.monotonic() + 3  # a forkserver exits once it sees its parent gone
        while (left := self.session()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if left:  # anything still running in its session is a leak
            self.leaked = len(left)
            self.lines.append(f"left behind: pids {', '.join(f[0] for f in left)} (killed)")
            for f in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(f[0]), signal.SIGKILL)


def _is_front(pid: int) -> bool:
    """A process that serves HTTP: a modelpool front, or a copy of a comparison app."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"modelpool.server._fronts" in argv or b"--copy" in argv


def modelpool_server(model: str | None, name: str | None, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "modelpool.cli", "serve"]
    if model is not None:
        argv += [model, "--name", str(name)]
    return [*argv, "--workers", str(WORKERS), *extra]


def batching_args(rows: int = BATCH_SIZE) -> list[str]:
    """``modelpool serve``'s options for batches of ``rows`` rows and ``BATCH_DELAY``."""
    return ["--max-batch-size", str(rows), "--max-batch-delay", str(BATCH_DELAY)]


def short_bench_options(
    description: str, full: tuple[int, int], quick: tuple[int, int]
) -> tuple[int, int, bool] | None:
    """A small benchmark's command line (``--quick``, ``--rounds``, ``--seconds``): its rounds,
    seconds per run and whether it is quick; None (having said why) when wrk is missing."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="one short round (CI)")
    parser.add_argument("--rounds", type=int, help=f"rounds (default {full[0]}; 1 with --quick)")
    parser.add_argument(
        "--seconds",
        type=int,
        help=f"seconds per run (default {full[1]}; {quick[1]} with --quick)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("error: this benchmark needs wrk (apt-get install wrk)", file=sys.stderr)
        return None
    rounds, seconds = quick if args.quick else full
    return args.rounds or rounds, args.seconds or seconds, args.quick


def make_servers(
    target_only: bool, also_src: str | None, peers: bool = False
) -> dict[str, ServerProcess]:
    me = [sys.executable, os.path.abspath(__file__)]
    batching = batching_args(BATCH_SIZE)
    servers = {
        "bare": ServerProcess("bare aiohttp", [*me, "--app", "bare"]),
        "ppe": ServerProcess("aiohttp + PPE", [*me, "--app", "ppe", "--workers", str(WORKERS)]),
        "inline": ServerProcess("modelpool server app, MLP inline", [*me, "--app", "inline"]),
        "inline-2": ServerProcess(
            "modelpool server app, MLP inline, 2 processes",
            [*me, "--app", "inline", "--processes", str(WORKERS)],
        ),
        "mlp": ServerProcess("modelpool serve (mlp)", modelpool_server("common:MLP", "mlp")),
        "mlp-asyncio": ServerProcess(
            "modelpool serve (mlp, asyncio)",
            modelpool_server("common:MLP", "mlp", "--loop", "asyncio"),
        ),
        "mlp-fronts": ServerProcess(
            f"modelpool serve (mlp, --fronts {WORKERS})",
            modelpool_server("common:MLP", "mlp", "--fronts", str(WORKERS)),
            ready=f"all {WORKERS} fronts serving",
        ),
        "mlp-batch": ServerProcess(
            "modelpool serve (mlp, batching)", modelpool_server("common:MLP", "mlp", *batching)
        ),
        "mlp-wide": ServerProcess(
            f"modelpool serve (mlp, batches of {WIDE_BATCH_SIZE})",
            modelpool_server("common:MLP", "mlp", *batching_args(WIDE_BATCH_SIZE)),
        ),
    }
    if peers:
        launch = [sys.executable, os.path.join(HERE, "peers.py"), "run"]
        for kind, name in (("litserve", "LitServe"), ("mlserver", "MLServer")):
            servers[kind] = ServerProcess(name, [*launch, kind], launcher=True)
            servers[f"{kind}-batch"] = ServerProcess(
                f"{name}, batching",
                [*launch, kind, "--batch", str(BATCH_SIZE), "--delay", str(BATCH_DELAY)],
                launcher=True,
            )
    if not target_only:
        servers["iris"] = ServerProcess("modelpool serve (iris)", modelpool_server(None, None))
        servers["identity"] = ServerProcess(
            "modelpool serve (identity)", modelpool_server("common:Identity", "identity")
        )
    if also_src:
        servers["alt-inline"] = ServerProcess(
            f"modelpool server app, MLP inline, from {also_src}", [*me, "--app", "inline"], also_src
        )
        servers["alt-mlp"] = ServerProcess(
            f"modelpool serve (mlp) from {also_src}",
            modelpool_server("common:MLP", "mlp"),
            also_src,
        )
        servers["alt-mlp-batch"] = ServerProcess(
            f"modelpool serve (mlp, batching) from {also_src}",
            modelpool_server("common:MLP", "mlp", *batching),
            also_src,
        )
    return servers


# ----------------------------------------------------------------------------- load


@dataclasses.dataclass(frozen=True)
class Body:
    data: bytes
    content_type: str = "application/json"
    header_length: int | None = None


@dataclasses.dataclass(frozen=True)
class Contender:
    label: str
    server: str
    path: str


@dataclasses.dataclass
class Scenario:
    title: str
    body: str
    connections: int
    contenders: list[Contender]  # the first is the baseline for ratios
    samples: dict[str, list[dict[str, float]]] = dataclasses.field(default_factory=dict)


class Load:
    """Runs wrk against one URL with one body; returns req/s, percentiles and CPU costs."""

    def __init__(self, tmp: str, bodies: dict[str, Body], threads: int = 1) -> None:
        self.threads = threads  # wrk's threads (one here; bench/fronts.py uses more)
        self.script = os.path.join(tmp, "post.lua")
        with open(self.script, "w") as f:
            f.write(WRK_SCRIPT)
        self.files = {}
        for key, body in bodies.items():
            path = os.path.join(tmp, f"{key}.body")
            with open(path, "wb") as f:
                f.write(body.data)
            self.files[key] = path
        self.bodies = bodies

    def run(
        self,
        server: ServerProcess,
        path: str,
        body: str,
        connections: int,
        seconds: int,
        authorization: str = "",
    ) -> dict[str, float]:
        spec = self.bodies[body]
        env = {
            **os.environ,
            "WRK_AUTHORIZATION": authorization,
            "WRK_BODY": self.files[body],
            "WRK_CONTENT_TYPE": spec.content_type,
            "WRK_HEADER_LENGTH": "" if spec.header_length is None else str(spec.header_length),
        }
        argv = ["wrk", f"-t{self.threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s"]
        argv += ["-s", self.script, server.url + path]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        server_before, front_before = server.cpu_seconds()
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60)
        server_after, front_after = server.cpu_seconds()
        server_cpu, front_cpu = server_after - server_before, front_after - front_before
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith('{"requests"')]
        if done.returncode != 0 or not lines:
            raise BenchError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
        r = json.loads(lines[-1])
        errors = {k: r[k] for k in ("non2xx", "connect", "read", "write", "timeout") if r[k]}
        if errors or not r["requests"]:
            raise BenchError(
                f"{server.label} {path}: {r['requests']} requests, errors {errors}; "
                f"server output:\n{server.tail()}"
            )
        n = r["requests"]
        return {
            "req_per_s": n / (r["duration_us"] / 1e6),
            "p50_ms": r["p50_us"] / 1e3,
            "p99_ms": r["p99_us"] / 1e3,
            "server_cpu_us": server_cpu / n * 1e6,
            "front_cpu_us": front_cpu / n * 1e6,
            "client_cpu_us": client_cpu / n * 1e6,
        }


def post(
    server: ServerProcess, path: str, body: Body, authorization: str = ""
) -> tuple[bytes, str | None]:
    """One request outside the measurement: the answer must be a 200."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        headers = {"Content-Type": body.content_type}
        if authorization:
            headers["Authorization"] = authorization
        if body.header_length is not None:
            headers[HEADER_LENGTH] = str(body.header_length)
        conn.request("POST", path, body=body.data, headers=headers)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise BenchError(f"{server.label} {path}: HTTP {response.status}: {data[:300]!r}")
        return data, response.getheader(HEADER_LENGTH)
    finally:
        conn.close()


def check_answers(
    servers: dict[str, ServerProcess], bodies: dict[str, Body], x_mlp: np.ndarray
) -> None:
    """Every contender answers correctly before it is timed."""
    want = _mlp().predict({"x": x_mlp})["y"]
    mlp_path = "/v2/models/mlp/infer"
    for key in sorted(servers.keys() - {"iris", "identity"}):  # every other one serves it
        y = decode_infer_response(post(servers[key], mlp_path, bodies["mlp"])[0])["y"]
        if not np.allclose(y, want, rtol=1e-4, atol=1e-5):
            raise BenchError(f"{servers[key].label}: wrong MLP answer {y} (expected {want})")
    if "iris" in servers:
        data = post(servers["iris"], "/v2/models/iris/infer", bodies["iris"])[0]
        iris = decode_infer_response(data)
        if int(iris["LABEL"][0]) != 0:
            raise BenchError(f"iris: expected setosa (0), got {iris}")
    if "identity" in servers:
        path = "/v2/models/identity/infer"
        small = decode_infer_response(post(servers["identity"], path, bodies["small"])[0])
        if small["x"].shape != (1, 16):
            raise BenchError(f"identity: wrong answer {small}")
        big = bodies["big"]
        sent = np.frombuffer(big.data, np.float32, offset=big.header_length or 0)
        data, length = post(servers["identity"], path, big)
        if not np.array_equal(decode_infer_response(bytearray(data), length)["x"], sent):
            raise BenchError("identity: the 4 MiB answer differs from the request")
        data, _ = post(servers["bare"], "/v2/models/noop/infer", big)
        if data != big.data:
            raise BenchError("bare: the echo differs from the request")


def make_bodies() -> tuple[dict[str, Body], np.ndarray]:
    rng = np.random.default_rng(0)
    x_mlp = np.round(rng.standard_normal((1, 64)), 4).astype(np.float32)

    def json_body(name: str, x: np.ndarray) -> Body:
        tensor = {"name": name, "datatype": "FP32", "shape": list(x.shape), "data": x.ravel()}
        data = orjson.dumps({"inputs": [tensor]}, option=orjson.OPT_SERIALIZE_NUMPY)
        return Body(data)

    big, length = encode_infer_request(
        {"x": rng.random(BIG_BYTES // 4, dtype=np.float32)}, binary=True
    )
    bodies = {
        "iris": json_body("INPUT0", np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)),
        "small": json_body("x", np.round(rng.standard_normal((1, 16)), 4).astype(np.float32)),
        "big": Body(big, "application/octet-stream", length),
        "mlp": json_body("x", x_mlp),
    }
    return bodies, x_mlp


def scenarios(servers: dict[str, ServerProcess]) -> list[Scenario]:
    noop, mlp = "/v2/models/noop/infer", "/v2/models/mlp/infer"
    bare_noop = Contender("bare aiohttp, no inference", "bare", noop)
    identity = Contender("modelpool, identity model", "identity", "/v2/models/identity/infer")
    target = Scenario(
        "Small MLP (64->256->10, 1 row/request)",
        "mlp",
        SMALL_CONNECTIONS,
        [
            Contender(BARE_MLP_LABEL, "bare", mlp),
            Contender(OFF_LABEL, "mlp", mlp),
            Contender(ON_LABEL, "mlp-batch", mlp),
            Contender(PPE_LABEL, "ppe", mlp),
            Contender(WIDE_LABEL, "mlp-wide", mlp),
            Contender(ASYNCIO_LABEL, "mlp-asyncio", mlp),
            Contender(FRONTS_LABEL, "mlp-fronts", mlp),
            Contender(INLINE_LABEL, "inline", mlp),
            Contender(PREFORK_LABEL, "inline-2", mlp),
        ],
    )
    if "litserve" in servers:
        for kind, name in (("litserve", "LitServe"), ("mlserver", "MLServer")):
            target.contenders += [
                Contender(f"{name}, batching off", kind, mlp),
                Contender(
                    f"{name}, batching {BATCH_SIZE} / {BATCH_DELAY * 1e3:g} ms",
                    f"{kind}-batch",
                    mlp,
                ),
            ]
    one = Scenario(
        "Small MLP, one connection (latency)",
        "mlp",
        1,
        [Contender(BARE_MLP_LABEL, "bare", mlp), Contender(OFF_LABEL, "mlp", mlp)],
    )
    if "alt-mlp" in servers:
        target.contenders += [
            Contender(f"{INLINE_LABEL} (--also-src)", "alt-inline", mlp),
            Contender(f"{OFF_LABEL} (--also-src)", "alt-mlp", mlp),
            Contender(f"{ON_LABEL} (--also-src)", "alt-mlp-batch", mlp),
        ]
    if "iris" not in servers:
        return [target, one]
    return [
        Scenario(
            "Demo model (iris), small JSON request",
            "iris",
            SMALL_CONNECTIONS,
            [bare_noop, Contender("modelpool serve (iris)", "iris", "/v2/models/iris/infer")],
        ),
        Scenario(
            "Identity model, small JSON tensors", "small", SMALL_CONNECTIONS, [bare_noop, identity]
        ),
        Scenario(
            "Identity model, 4 MiB FP32 in and out (binary extension)",
            "big",
            BIG_CONNECTIONS,
            [Contender("bare aiohttp, echoes the body", "bare", noop), identity],
        ),
        target,
        one,
    ]


def measure(
    servers: dict[str, ServerProcess],
    rounds: int,
    seconds: int,
    warmup: int,
    plan_for: Callable[[dict[str, ServerProcess]], list[Scenario]] | None = None,
) -> list[Scenario]:
    """Start every server, check its answers, then time the scenarios (``plan_for(servers)``,
    by default this script's) in alternating rounds."""
    with tempfile.TemporaryDirectory(prefix="modelpool-bench-") as tmp:
        for server in servers.values():
            server.start()
        deadline = time.monotonic() + 120
        for server in servers.values():
            server.wait_ready(deadline)
        bodies, x_mlp = make_bodies()
        try:
            check_answers(servers, bodies, x_mlp)
        except CodecError as exc:
            raise BenchError(f"an answer could not be decoded: {exc}") from None
        load = Load(tmp, bodies)
        plan = (plan_for or scenarios)(servers)
        for server in servers.values():
            server.pause(True)

        def run(c: Contender, s: Scenario, duration: int) -> dict[str, float]:
            server = servers[c.server]
            server.pause(False)
            try:
                return load.run(server, c.path, s.body, s.connections, duration)
            finally:
                server.pause(True)

        for s in plan:
            s.samples = {c.label: [] for c in s.contenders}
            for c in s.contenders if warmup else ():
                run(c, s, warmup)
        for i in range(rounds):
            for s in plan:
                for c in s.contenders if i % 2 == 0 else s.contenders[::-1]:
                    s.samples[c.label].append(run(c, s, seconds))
    return plan


def measured(servers: dict[str, ServerProcess], run: Callable[[], T]) -> T | None:
    """``run()``, then every server stopped; None (having said why) when it failed or a
    server left processes behind after SIGTERM."""
    try:
        result = run()
    except BenchError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return None
    finally:
        for server in servers.values():
            server.stop()
    leaked = [s for s in servers.values() if s.leaked]
    for server in leaked:
        print(f"\nerror: {server.label} left processes behind after SIGTERM:\n{server.tail()}")
    return None if leaked else result


def within_rounds(num: list[dict[str, float]], den: list[dict[str, float]]) -> list[float]:
    """One req/s ratio per round, ``num[i] / den[i]``, both measured in round ``i``."""
    return [a["req_per_s"] / b["req_per_s"] for a, b in zip(num, den, strict=True)]


def spread(values: list[float]) -> dict[str, float]:
    """Median and p25-p75 of per-round values, and how many rounds."""
    if len(values) > 1:
        p25, _, p75 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        p25 = p75 = values[0]
    return {"median": statistics.median(values), "p25": p25, "p75": p75, "rounds": len(values)}


def summarize(scenario: Scenario) -> dict[str, dict[str, float]]:
    """Medians over rounds of each contender's figures; ``x_base`` (with ``x_base_p25``,
    ``x_base_p75``) is the median of its req/s over the first contender's in the same round."""
    base = scenario.samples[scenario.contenders[0].label]
    out = {}
    for c in scenario.contenders:
        runs = scenario.samples[c.label]
        out[c.label] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        x = spread(within_rounds(runs, base))
        out[c.label] |= {"x_base": x["median"], "x_base_p25": x["p25"], "x_base_p75": x["p75"]}
        out[c.label]["rounds"] = x["rounds"]
    return out


def compare_also_src(scenario: Scenario) -> dict[str, dict[str, float]]:
    """(``--also-src``) Each installed server's req/s over the same server from the other
    source tree, one ratio per round: the A/B figure, printed and returned."""
    print(f"\ninstalled over --also-src, req/s, median of per-round ratios ({scenario.title}):")
    out = {}
    for c in scenario.contenders:
        alt = f"{c.label} (--also-src)"
        if alt not in scenario.samples:
            continue
        x = spread(within_rounds(scenario.samples[c.label], scenario.samples[alt]))
        out[c.label] = x
        print(f"  {c.label}: {x['median']:.2f}x ({x['p25']:.2f}-{x['p75']:.2f})")
    return out


def report(scenario: Scenario, summary: dict[str, dict[str, float]]) -> None:
    width = max(len(c.label) for c in scenario.contenders)
    rounds = int(next(iter(summary.values()))["rounds"])
    print(f"\n{scenario.title}, {scenario.connections} connections ({rounds} round(s)):")
    print(
        f"  {'':<{width}} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'x base (p25-p75)':>19}"
        f" {'server CPU/req':>15} {'front CPU/req':>14} {'wrk CPU/req':>12}"
    )
    for label, m in summary.items():
        x = f"{m['x_base']:.2f}x ({m['x_base_p25']:.2f}-{m['x_base_p75']:.2f})"
        print(
            f"  {label:<{width}} {m['req_per_s']:8.0f} {m['p50_ms']:8.2f} {m['p99_ms']:8.2f}"
            f" {x:>19} {m['server_cpu_us']:12.0f} us {_us(m['front_cpu_us']):>14}"
            f" {m['client_cpu_us']:9.0f} us"
        )


def _us(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.0f} us"


def targets(plan: list[Scenario], results: dict[str, Any]) -> dict[str, bool]:
    """Issue 12's targets, checked (only reported: a miss does not fail the run)."""
    by_title = {s.title: s for s in plan}
    target = next(s for s in plan if s.body == "mlp" and s.connections == SMALL_CONNECTIONS)
    mlp = results[target.title]
    bare, off, on, ppe = mlp[BARE_MLP_LABEL], mlp[OFF_LABEL], mlp[ON_LABEL], mlp[PPE_LABEL]
    rounds = int(off["rounds"])

    def ratio(m: dict[str, float]) -> str:
        return (
            f"{m['x_base']:.2f}x, median of {rounds} per-round ratio(s), p25-p75 "
            f"{m['x_base_p25']:.2f}-{m['x_base_p75']:.2f}"
        )

    checks = {
        f"MLP, batching off: req/s >= {TARGET_RATIO}x bare aiohttp inline ({ratio(off)})": (
            off["x_base"] >= TARGET_RATIO
        ),
        f"MLP, batching off: p99 <= {TARGET_P99_FACTOR}x the bare handler's ({off['p99_ms']:.1f}"
        f" ms vs {bare['p99_ms']:.1f} ms)": off["p99_ms"] <= TARGET_P99_FACTOR * bare["p99_ms"],
        f"MLP, batching off: front CPU/request <= {TARGET_FRONT_CPU_FACTOR}x the bare handler's"
        f" ({off['front_cpu_us']:.0f} us vs {bare['front_cpu_us']:.0f} us)": (
            off["front_cpu_us"] <= TARGET_FRONT_CPU_FACTOR * bare["front_cpu_us"]
        ),
        f"MLP, batching on: req/s >= {TARGET_ON_RATIO}x bare aiohttp inline ({ratio(on)})": (
            on["x_base"] >= TARGET_ON_RATIO
        ),
        f"MLP, batching on: p99 <= the bare handler's ({on['p99_ms']:.1f} ms vs "
        f"{bare['p99_ms']:.1f} ms)": on["p99_ms"] <= bare["p99_ms"],
    }
    one = next((s for s in plan if s.connections == 1), None)
    if one is not None:
        single = results[one.title]
        gap = (single[OFF_LABEL]["p50_ms"] - single[BARE_MLP_LABEL]["p50_ms"]) * 1e3
        checks[
            f"MLP, 1 connection, batching off: p50 within {TARGET_ONE_CONN_US} us of bare "
            f"aiohttp inline ({gap:+.0f} us)"
        ] = gap <= TARGET_ONE_CONN_US
    big = by_title.get("Identity model, 4 MiB FP32 in and out (binary extension)")
    if big is not None:
        x = results[big.title]["modelpool, identity model"]
        checks[f"4 MiB binary in and out: >= {TARGET_BIG_RATIO}x bare echo ({ratio(x)})"] = (
            x["x_base"] >= TARGET_BIG_RATIO
        )
    print("\nTargets:")
    for name, ok in checks.items():
        print(f"  {'met   ' if ok else 'MISSED'} {name}")
    samples = target.samples
    vs_ppe = {
        label: spread(within_rounds(samples[label], samples[PPE_LABEL]))
        for label in (OFF_LABEL, ON_LABEL)
    }
    fronts = spread(within_rounds(samples[FRONTS_LABEL], samples[OFF_LABEL]))
    loop = spread(within_rounds(samples[OFF_LABEL], samples[ASYNCIO_LABEL]))
    off_x, on_x = vs_ppe[OFF_LABEL], vs_ppe[ON_LABEL]
    print(
        f"  context: req/s over the hand-written aiohttp + ProcessPoolExecutor app's, median of "
        f"per-round ratios (p25-p75): batching off {off_x['median']:.2f}x "
        f"({off_x['p25']:.2f}-{off_x['p75']:.2f}), batching on {on_x['median']:.2f}x "
        f"({on_x['p25']:.2f}-{on_x['p75']:.2f}); p99 {on['p99_ms']:.1f} ms vs "
        f"{ppe['p99_ms']:.1f} ms (medians over rounds)\n"
        f"  context: --fronts {WORKERS} over one front {fronts['median']:.2f}x "
        f"({fronts['p25']:.2f}-{fronts['p75']:.2f}) on {os.cpu_count()} CPUs; the default loop "
        f"over asyncio's {loop['median']:.2f}x ({loop['p25']:.2f}-{loop['p75']:.2f})"
    )
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (CI, < 60 s)")
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also LitServe and MLServer, batching off and on (bench/peers.py builds their venvs)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--rounds", type=int, help="rounds (default: 5; 1 with --quick)")
    parser.add_argument("--seconds", type=int, help="seconds per run (default: 4; 2 with --quick)")
    parser.add_argument(
        "--target-only", action="store_true", help="only the MLP scenario (the target row)"
    )
    parser.add_argument(
        "--also-src",
        metavar="DIR",
        help="also time the MLP servers importing modelpool from DIR (e.g. a patched "
        "checkout's src/), alternated with the installed one in the same rounds",
    )
    parser.add_argument("--app", choices=["bare", "ppe", "inline"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--copy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.app:
        asyncio.run(_serve_app(args.app, args.port, args.workers, args.processes, args.copy))
        return 0
    if shutil.which("wrk") is None:
        print("error: this benchmark needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    # wrk takes whole seconds; --quick skips the warm-up runs (check_answers warms a little)
    rounds, seconds, warmup = (1, 2, 0) if args.quick else (5, 4, 2)
    rounds, seconds = args.rounds or rounds, args.seconds or seconds
    also_src = os.path.abspath(args.also_src) if args.also_src else None

    print(
        f"modelpool {modelpool.__version__}, Python {sys.version.split()[0]}, numpy "
        f"{np.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
        f"{WORKERS} workers per server; {rounds} round(s) of {seconds} s per contender"
    )
    print(
        "load: wrk, 1 thread, keep-alive, on the same CPUs as the servers (its CPU per request "
        "is shown);\nratios (x base) are medians of within-round ratios to each table's first row\n"
        "(one ratio per round, p25-p75 in brackets); req/s, p50, p99 are medians over rounds"
    )
    if args.peers:
        import peers  # builds the peers' venvs on first use (pip)

        for kind in peers.PACKAGES:
            peers.build(kind)
    servers = make_servers(args.target_only, also_src, args.peers)
    plan = measured(servers, lambda: measure(servers, rounds, seconds, warmup))
    if plan is None:
        return 1

    results: dict[str, Any] = {}
    for s in plan:
        results[s.title] = summarize(s)
        report(s, results[s.title])
    print(f"\n(load average at the end: {os.getloadavg()[0]:.1f})")
    if also_src:
        results["also_src"] = compare_also_src(plan[0])
    results["targets"] = targets(plan, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
