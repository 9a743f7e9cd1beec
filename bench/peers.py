"""Peers for ``bench/server.py --peers``: LitServe and MLServer serving the same small MLP,
each from its own virtual environment (they pin their own FastAPI, uvicorn, pydantic...).

    python bench/peers.py build                 # the venvs, once (pip, from the registry)
    python bench/peers.py run KIND --port P [--batch N --delay S]    # (internal)

``run`` starts one peer (``litserve``: ``peer_litserve.py``; ``mlserver``: ``peer_mlserver.py``)
with 2 workers, waits until it answers an inference, prints ``ready:`` (what bench/server.py
waits for) and stops it on SIGTERM.
The venvs live in ``$MODELPOOL_BENCH_CACHE`` (default ``~/.cache/modelpool-bench``).
Nothing here imports modelpool: the peers run without it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.environ.get(
    "MODELPOOL_BENCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "modelpool-bench")
)
#: what each peer's venv gets (pinned, so that figures compare like with like)
PACKAGES = {
    "litserve": ["litserve==0.2.19", "numpy", "orjson"],
    # (mlserver 1.7.1's workers call asyncio.get_event_loop(), which uvloop 0.22 refuses)
    "mlserver": ["mlserver==1.7.1", "numpy", "uvloop<0.22"],
}
WORKERS = 2
PATH = "/v2/models/mlp/infer"


def venv_python(kind: str) -> str:
    return os.path.join(CACHE, kind, "bin", "python")


def build(kind: str) -> str:
    """The peer's venv (created and filled on first use); its python."""
    python = venv_python(kind)
    if not os.path.exists(python):
        print(f"building the {kind} venv in {os.path.dirname(os.path.dirname(python))} ...")
        subprocess.run([sys.executable, "-m", "venv", os.path.join(CACHE, kind)], check=True)
        pip = [python, "-m", "pip", "install", "-q", *PACKAGES[kind]]
        subprocess.run(pip, check=True)
    return python


# ----------------------------------------------------------------------------- the peers' apps


def _mlserver_dir(port: int, batch: int, delay: float) -> str:
    root = tempfile.mkdtemp(prefix="modelpool-bench-mlserver-")
    settings = {
        "http_port": port,
        "grpc_port": port + 1,
        "metrics_port": port + 2,
        "host": "127.0.0.1",
        "parallel_workers": WORKERS,
        "debug": False,
    }
    model: dict[str, object] = {"name": "mlp", "implementation": "peer_mlserver.MLPModel"}
    if batch > 1:
        model |= {"max_batch_size": batch, "max_batch_time": delay}
    for name, data in (("settings.json", settings), ("model-settings.json", model)):
        with open(os.path.join(root, name), "w") as f:
            json.dump(data, f)
    return root


def run(kind: str, port: int, batch: int, delay: float) -> int:
    python = build(kind)
    env = {**os.environ, "PYTHONPATH": HERE}
    if kind == "litserve":
        argv = [python, os.path.join(HERE, "peer_litserve.py"), str(port), str(batch)]
        argv += [str(delay), str(WORKERS)]
        cwd = None
    else:
        cwd = _mlserver_dir(port, batch, delay)
        argv = [os.path.join(os.path.dirname(python), "mlserver"), "start", cwd]
    try:
        return _serve(kind, port, argv, env, cwd)
    finally:
        if cwd is not None:  # MLServer's settings directory
            shutil.rmtree(cwd, ignore_errors=True)


def _serve(kind: str, port: int, argv: list[str], env: dict[str, str], cwd: str | None) -> int:
    child = subprocess.Popen(
        argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        process_group=0,  # (same session: bench/server.py counts its CPU and its leftovers)
    )  # fmt: skip
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}
    ).encode()
    deadline = time.monotonic() + 180
    while not stop:
        if child.poll() is not None:
            assert child.stderr is not None
            sys.stderr.write(child.stderr.read().decode(errors="replace")[-3000:])
            return 1
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}{PATH}", data=body)
            request.add_header("Content-Type", "application/json")
            with urllib.request.urlopen(request, timeout=5) as answer:
                if answer.status == 200:
                    break
        except OSError:
            if time.monotonic() > deadline:
                sys.stderr.write(f"{kind} did not answer within 180 s\n")
                os.killpg(child.pid, signal.SIGKILL)
                return 1
            time.sleep(0.2)
    print(f"ready: {kind} on port {port}", flush=True)
    while not stop and child.poll() is None:
        time.sleep(0.1)
    for sig in (signal.SIGTERM, signal.SIGKILL):  # the whole group: its workers too
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            break
        try:
            child.wait(10)
            break
        except subprocess.TimeoutExpired:
            continue
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build")
    one = sub.add_parser("run")
    one.add_argument("kind", choices=sorted(PACKAGES))
    one.add_argument("--port", type=int, required=True)
    one.add_argument("--batch", type=int, default=1)
    one.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    if args.command == "build":
        for kind in PACKAGES:
            build(kind)
        return 0
    return run(args.kind, args.port, args.batch, args.delay)


if __name__ == "__main__":
    sys.exit(main())
