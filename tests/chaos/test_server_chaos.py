"""The torture suite: a real server under steady load from concurrent clients while faults are
injected, for ``MODELPOOL_CHAOS_SECONDS`` (default 20; CI runs it short, the long run is
documented in docs/reliability.md). Run with ``pytest -m chaos -n 0 -s`` to see the figures.

Every request is accounted for: answered right, failed by design (the answer a fault should
give: 503 for a request whose worker was killed, 504 past its deadline, 503 over ``max_queue``,
404 while its model is unloaded), lost (no HTTP answer, or an answer no fault explains) or
wrong (an answer that is not its own). Lost and wrong must be 0, and the server's processes
and descriptors must be back where they started.

The faults, at random, about three a second: the model (two versions) reloaded (new pools
beside the old), reloaded with settings whose setup fails (the old pools serve on), its default
version switched, one version replaced with new settings (a rolling change), unloaded and
loaded again,
a worker SIGKILLed or SIGSEGVed, a predict that hangs past its deadline, a client that
disconnects mid-body, a client that sends its body slowly, a burst over ``max_queue``. At the
end, SIGTERM under load: every accepted request is answered, the exit status is 0 and no
process is left.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import random
import signal
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest
from _serving import ServerProcess, infer_body, request

from _waiting import wait_for

CHAOS_SECONDS = float(os.environ.get("MODELPOOL_CHAOS_SECONDS", "20"))
CLIENTS = 4

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(CHAOS_SECONDS + 300)]

CONFIG = {
    "models": {
        "ident": {
            "model": "_server_models:Identity",
            "workers": 1,
            "retries": 0,
            "versions": {"1": {}, "2": {}},  # the clients' requests go to the default one
        },
        "sleepy": {"model": "_server_models:Sleepy", "workers": 1, "timeout": 0.5},
        "queue": {"model": "_server_models:Sleepy", "workers": 1, "max_queue": 2},
    }
}


class Tally:
    """What happened to every request, by outcome and reason."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.lost: list[str] = []
        self.lock = threading.Lock()

    def add(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.counts[outcome] += 1
            if outcome in ("lost", "wrong") and len(self.lost) < 20:
                self.lost.append(detail)


def _by_design(status: int, error: str) -> str | None:
    """The fault a non-200 answer is explained by, or None."""
    if status == 503 and ("exited" in error or "killed" in error or "was stopped" in error):
        return "failed: worker killed"
    if status == 404 and "is not loaded" in error:
        return "failed: model unloaded"
    if status == 503 and "is loading" in error:
        return "failed: model unloaded (loading again)"
    if status == 503 and "shutting down" in error:
        return "failed: server stopping"
    return None


def _client(
    server: ServerProcess,
    stop: threading.Event,
    tally: Tally,
    seed: int,
    stopping: threading.Event | None = None,
) -> None:
    """Identity requests, each with its own value, checked (``stopping``: the server has been
    sent SIGTERM, so a connection refused, or closed before any byte of the answer, is a
    request it did not accept)."""
    stopping = stopping or threading.Event()
    rng = random.Random(seed)
    host, port = server.host_port.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        while not stop.is_set():
            x = float(rng.randrange(1 << 20))
            body = infer_body("INPUT0", "FP64", [1], [x])
            answered = False
            try:
                conn.request("POST", "/v2/models/ident/infer", body)
                response = conn.getresponse()
                answered = True  # (a status line came: a break from here on loses it)
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if stopping.is_set() and not answered:
                    # its port closed, or the connection closed with no byte of an answer,
                    # which HTTP clients retry: the stopping server did not take it
                    tally.add("not accepted: server stopping")
                    time.sleep(0.01)
                else:
                    tally.add("lost", f"no answer: {type(exc).__name__}: {exc}")
                continue
            if response.status == 200:
                got = json.loads(data)["outputs"][0]["data"]
                tally.add("answered" if got == [x] else "wrong", f"sent {x}, got {got}")
                continue
            error = json.loads(data).get("error", "") if data else ""
            reason = _by_design(response.status, error)
            tally.add(reason or "lost", f"{response.status}: {error}")
            time.sleep(0.02)  # (as a client would back off; Retry-After says 1 s)
    finally:
        conn.close()


# ----------------------------------------------------------------------------- the faults


def _worker_pids(server: ServerProcess, model: str) -> list[int]:
    status = json.loads(request(server, "GET", "/status.json")[2])
    (entry,) = [m for m in status["models"] if m["name"] == model]
    return [w["pid"] for w in entry["workers"] if w["pid"] and w["state"] in ("idle", "busy")]


def _post(server: ServerProcess, path: str, body: bytes = b"") -> tuple[int, str]:
    status, _, answer = request(server, "POST", path, body)
    return status, answer.decode()


def _fault(server: ServerProcess, kind: str, rng: random.Random, faults: Tally) -> None:
    if kind == "reload":
        status, answer = _post(server, "/v2/repository/models/ident/load")
        assert status == 200, answer
    elif kind == "bad_reload":  # a new version whose setup fails: the old one serves on
        config = {"model": "_models:FailSlot", "options": {"bad_index": 0}, "workers": 1}
        body = json.dumps({"parameters": {"config": config}}).encode()
        status, answer = _post(server, "/v2/repository/models/ident/load", body)
        assert status == 400, answer
        assert "keeps serving" in answer, answer
    elif kind == "switch":  # the default version moves (no worker restarts)
        body = json.dumps({"parameters": {"default_version": rng.choice("12")}}).encode()
        status, answer = _post(server, "/v2/repository/models/ident/load", body)
        assert status == 200, answer
    elif kind == "roll":  # one version replaced (beside the old), the default maybe moved
        versions = {"1": {}, "2": {"timeout": rng.choice([30, 31])}}
        config = {"model": "_server_models:Identity", "workers": 1, "retries": 0}
        config |= {"versions": versions, "default_version": rng.choice("12")}
        body = json.dumps({"parameters": {"config": config}}).encode()
        status, answer = _post(server, "/v2/repository/models/ident/load", body)
        assert status == 200, answer
    elif kind == "unload":
        assert _post(server, "/v2/repository/models/ident/unload")[0] == 200
        assert _post(server, "/v2/repository/models/ident/load")[0] == 200
    elif kind in ("sigkill", "sigsegv"):
        pids = _worker_pids(server, "ident")
        if pids:
            sig = signal.SIGKILL if kind == "sigkill" else signal.SIGSEGV
            try:
                os.kill(rng.choice(pids), sig)
            except ProcessLookupError:
                pass  # (replaced meanwhile)
    elif kind == "hang":
        body = infer_body("SECONDS", "FP64", [1], [30.0])
        status, answer = _post(server, "/v2/models/sleepy/infer", body)
        assert status == 504, answer
    elif kind == "disconnect":
        with socket.create_connection(_address(server)) as sock:
            sock.sendall(
                b"POST /v2/models/ident/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                b"\r\n" + b'{"inputs": ['
            )
    elif kind == "slow":
        body = infer_body("INPUT0", "FP64", [1], [7.0])
        head = f"POST /v2/models/ident/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}"
        with socket.create_connection(_address(server), timeout=60) as sock:
            sock.sendall(head.encode() + b"\r\nConnection: close\r\n\r\n")
            for i in range(0, len(body), 16):
                sock.sendall(body[i : i + 16])
                time.sleep(0.02)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        status_line = answer.split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.1 200") or b" 503 " in status_line, answer[:300]
    elif kind == "burst":
        body = infer_body("SECONDS", "FP64", [1], [0.2])
        results: list[int] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(_post(server, "/v2/models/queue/infer", body)[0])
            )
            for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert set(results) <= {200, 503}, results
        with faults.lock:
            faults.counts["burst requests refused over max_queue (503)"] += results.count(503)
    faults.add(kind)


def _address(server: ServerProcess) -> tuple[str, int]:
    host, port = server.host_port.rsplit(":", 1)
    return host, int(port)


# ----------------------------------------------------------------------------- resources


def _resources(server: ServerProcess) -> dict[str, int]:
    top = psutil.Process(server.proc.pid)
    children = top.children(recursive=True)
    # the front, or with server.fronts > 1 the manager and its fronts
    fronts = [top] + [p for p in top.children() if "server._fronts" in " ".join(p.cmdline())]
    shm = len(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else 0
    return {
        "processes": len(children),
        "front fds": sum(p.num_fds() for p in fronts),
        "/dev/shm files": shm,
        "front RSS MiB": sum(p.memory_info().rss for p in fronts) >> 20,
    }


def _settled(server: ServerProcess, before: dict[str, int]) -> dict[str, int]:
    """The resources once every replacement has loaded and idle connections have closed."""
    now: dict[str, int] = {}

    def same() -> bool:
        now.update(_resources(server))
        return all(now[k] <= before[k] for k in ("processes", "front fds", "/dev/shm files"))

    try:
        wait_for(same, 60, "the server's processes and descriptors back to where they were")
    except AssertionError:
        pass  # (reported, and asserted, by the caller)
    return now


@pytest.mark.parametrize("fronts", [1, 2])
def test_a_server_under_load_and_faults_loses_nothing(tmp_path: Path, fronts: int) -> None:
    """With ``server.fronts: 2`` every change goes to both fronts, and a worker killed is one
    of either front's."""
    tally, faults = Tally(), Tally()
    rng = random.Random(int(os.environ.get("MODELPOOL_CHAOS_SEED", "1")))
    kinds = ["reload", "bad_reload", "switch", "roll", "unload", "sigkill", "sigsegv", "hang"]
    kinds += ["disconnect"]
    kinds += ["slow", "burst"]
    config = CONFIG | {"server": {"fronts": fronts}}
    with ServerProcess(config=config, tmp=tmp_path) as server:
        if fronts > 1:
            wait_for(lambda: f"all {fronts} fronts serving" in server.output, 120, "the fronts")
        before = _resources(server)
        stop = threading.Event()
        clients = [
            threading.Thread(target=_client, args=(server, stop, tally, i)) for i in range(CLIENTS)
        ]
        for client in clients:
            client.start()
        started = time.monotonic()
        order: list[str] = []
        try:
            while time.monotonic() - started < CHAOS_SECONDS:
                if not order:  # every kind once per round, in a random order
                    order = rng.sample(kinds, len(kinds))
                _fault(server, order.pop(), rng, faults)
                time.sleep(rng.random() * 0.6)
        finally:
            stop.set()
            for client in clients:
                client.join(120)
        busy = tally.counts["answered"]
        after = _settled(server, before)

        # SIGTERM under load: every accepted request answered, exit 0, nothing left
        stop_tally = Tally()
        stop, stopping = threading.Event(), threading.Event()
        clients = [
            threading.Thread(target=_client, args=(server, stop, stop_tally, 100 + i, stopping))
            for i in range(CLIENTS)
        ]
        for client in clients:
            client.start()
        wait_for(lambda: stop_tally.counts["answered"] >= 20, 60, "load before SIGTERM")
        tree = [server.proc.pid] + [p.pid for p in psutil.Process(server.proc.pid).children(True)]
        stopping.set()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(60)
        stop.set()
        for client in clients:
            client.join(120)
        left = [pid for pid in tree if psutil.pid_exists(pid) and _alive(pid)]

    report = {
        "seconds": CHAOS_SECONDS,
        "fronts": fronts,
        "requests": dict(tally.counts),
        "faults": dict(faults.counts),
        "at SIGTERM": dict(stop_tally.counts),
        "exit status": code,
        "resources before": before,
        "resources after": after,
        "processes left after exit": len(left),
        "lost or wrong (first 20)": tally.lost + stop_tally.lost,
    }
    print("\nchaos report: " + json.dumps(report, indent=2))
    assert busy > 0
    assert tally.counts["lost"] == tally.counts["wrong"] == 0, report
    assert stop_tally.counts["lost"] == stop_tally.counts["wrong"] == 0, report
    assert code == 0, server.output[-3000:]
    assert left == [], report
    for key in ("processes", "front fds", "/dev/shm files"):
        assert after[key] <= before[key], report


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
