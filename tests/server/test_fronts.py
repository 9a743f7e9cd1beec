"""Several front processes on one port (``--fronts N``): real processes, real signals. The
whole server answers metrics, readiness, the repository index and the status page; a front
that dies is replaced while the others keep serving; SIGTERM drains them all."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from _serving import ServerProcess, infer_body, request

from _waiting import wait_for
from modelpool.config import Config, share
from modelpool.server._metrics import Metrics
from modelpool.server._shared import FrontShare

BODY = infer_body("INPUT0", "INT32", [2], [4, 5])
INFER = "/v2/models/ident/infer"


def _status(server: ServerProcess) -> dict[str, Any]:
    (model,) = json.loads(request(server, "GET", "/status.json")[2])["models"]
    return model  # type: ignore[no-any-return]


def _requests_total(server: ServerProcess) -> int:
    text = request(server, "GET", "/metrics")[2].decode()
    found = re.search(r'modelpool_requests_total\{model="ident",code="200"\} (\d+)', text)
    return int(found.group(1)) if found else 0


def _fronts(server: ServerProcess) -> list[psutil.Process]:
    """The front processes (the manager's other children, if any, are not fronts)."""
    return [
        p
        for p in psutil.Process(server.proc.pid).children()
        if "modelpool.server._fronts" in " ".join(p.cmdline())
    ]


def test_two_fronts_serve_one_port_and_answer_for_the_whole_server() -> None:
    args = ("_server_models:Identity", "--name", "ident", "--workers", "3", "--fronts", "2")
    with ServerProcess(*args) as server:
        wait_for(lambda: len(_status(server)["workers"]) == 3, 60, "both fronts to publish")
        fronts = _fronts(server)
        assert len(fronts) == 2
        model = _status(server)
        assert sorted(w["front"] for w in model["workers"]) == [0, 0, 1]  # 3 workers split 2+1
        for _ in range(40):  # a new connection each: the kernel spreads them over the fronts
            status, _, answer = request(server, "POST", INFER, BODY)
            assert status == 200, answer

        def served() -> dict[int, int]:
            out = {0: 0, 1: 0}
            for w in _status(server)["workers"]:
                out[w["front"]] += w["served"]
            return out

        # each front publishes twice a second: wait for both to show their share
        def all_counted() -> dict[int, int] | None:
            counts = served()  # one snapshot: a second call may come from the other front
            return counts if sum(counts.values()) == 40 else None

        counts = wait_for(all_counted, 30, "every answer counted")
        assert all(n > 0 for n in counts.values()), counts  # both fronts took requests
        # every front counts every front's requests (published twice a second)
        wait_for(lambda: _requests_total(server) == 40, 30, "the counters of both fronts")
        assert request(server, "GET", "/v2/health/ready")[0] == 200
        index = json.loads(request(server, "POST", "/v2/repository/index")[2])
        assert index == [{"name": "ident", "version": "1", "state": "READY"}]
        # a front's snapshot may catch a worker between its answer and being marked idle
        idle = 'modelpool_workers{model="ident",state="idle"} 3'
        wait_for(
            lambda: idle in request(server, "GET", "/metrics")[2].decode(),
            30,
            "every worker idle in /metrics",
        )
        assert "all 2 fronts serving" in server.output
        code = server.stop()
        assert code == 0
        assert not any(p.is_running() and p.status() != "zombie" for p in fronts)
        assert server.output.count("stopped") >= 1


def test_a_front_killed_under_load_is_replaced_while_the_other_serves(tmp_path: Path) -> None:
    args = ("_server_models:Identity", "--name", "ident", "--workers", "2", "--fronts", "2")
    with ServerProcess(*args) as server:
        wait_for(lambda: len(_status(server)["workers"]) == 2, 60, "both fronts to publish")
        victim, survivor = _fronts(server)
        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    statuses.append(request(server, "POST", INFER, BODY)[0])
                except OSError:  # a connection the killed front had accepted
                    statuses.append(-1)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: len(statuses) >= 50, 60, "traffic on both fronts")
        before = _requests_total(server)
        # (a front that dies before the manager has seen them all serve is a failed start)
        wait_for(lambda: "all 2 fronts serving" in server.output, 60, "both fronts announced")
        victim.send_signal(signal.SIGKILL)
        wait_for(
            lambda: (
                "front 0 was killed by SIGKILL" in server.output
                or "front 1 was killed by SIGKILL" in server.output
            ),
            30,
            "the manager to see the front die",
        )
        mark = len(statuses)
        wait_for(lambda: len(statuses) >= mark + 100, 60, "traffic after the kill")
        assert survivor.is_running()
        # a replacement takes the dead one's place and serves again
        wait_for(
            lambda: (
                len([p for p in _fronts(server) if p.pid != survivor.pid]) == 1
                and len(_status(server)["workers"]) == 2
            ),
            90,
            "the replacement front",
        )
        stop.set()
        for t in threads:
            t.join(60)
        after = statuses[mark:]
        assert after.count(200) >= 100
        assert set(after) <= {200, -1}  # never an error answer, at most a reset connection
        assert after.count(-1) <= 4  # only connections the dead front held
        assert _requests_total(server) >= before  # counters never go down
        wait_for(lambda: request(server, "GET", "/v2/health/ready")[0] == 200, 60, "ready")
        assert server.stop() == 0


def test_sigterm_drains_every_front_and_leaves_no_process(tmp_path: Path) -> None:
    args = ("_server_models:Sleepy", "--name", "sleepy", "--workers", "2", "--fronts", "2")
    with ServerProcess(*args) as server:
        wait_for(lambda: "all 2 fronts serving" in server.output, 60, "both fronts")
        tree = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(True)]
        body = infer_body("SECONDS", "FP64", [1], [1.0])
        results: list[int] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(
                    request(server, "POST", "/v2/models/sleepy/infer", body)[0]
                )
            )
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        wait_for(
            lambda: (m := _sleepy(server))["in_flight"] >= 1 and m["in_flight"] + m["queued"] == 4,
            30,
            "every request accepted",
        )
        assert server.stop(signal.SIGTERM) == 0
        for t in threads:
            t.join(30)
        assert results == [200] * 4  # every accepted request was answered

        def alive() -> list[psutil.Process]:
            return [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

        wait_for(lambda: not alive(), 30, "every front and worker to exit")


def _taken(server: ServerProcess) -> int:
    """Requests running or queued in the whole server (the other front's share is up to half
    a second old)."""
    model = _status(server)
    return int(model["in_flight"]) + int(model["queued"])


def _sleepy(server: ServerProcess) -> dict[str, Any]:
    (model,) = json.loads(request(server, "GET", "/status.json")[2])["models"]
    return model  # type: ignore[no-any-return]


def test_a_model_that_cannot_load_stops_every_front_with_its_error(tmp_path: Path) -> None:
    server = ServerProcess("_server_models:Broken", "--fronts", "2")
    code = server.proc.wait(60)
    server.stop()
    assert code == 1
    assert "could not be loaded" in server.output


def test_failures_through_fronts_cost_one_request_each(tmp_path: Path) -> None:
    """A crash, a hung predict and a bug in the model, through two fronts: each request gets
    its JSON error, the workers are replaced, and every front counts every error."""
    config = {
        "server": {"fronts": 2, "ready_probe_interval": 60},
        "models": {
            "abort": {"model": "_server_models:Abort", "workers": 2},
            "timed": {"model": "_server_models:Sleepy", "workers": 2, "timeout": 0.5},
            "buggy": {"model": "_server_models:Buggy", "workers": 2},
        },
    }
    with ServerProcess(config=config, tmp=tmp_path) as server:
        wait_for(lambda: "all 2 fronts serving" in server.output, 60, "both fronts")
        body = infer_body("x", "FP32", [1], [1.0])
        for _ in range(4):  # new connections: both fronts answer some
            status, _, answer = request(server, "POST", "/v2/models/abort/infer", body)
            assert status == 503, answer
            assert "SIGABRT" in json.loads(answer)["error"]
            status, _, answer = request(
                server, "POST", "/v2/models/timed/infer", infer_body("SECONDS", "FP64", [1], [5])
            )
            assert status == 504, answer
            assert "timed out" in json.loads(answer)["error"]
            status, _, answer = request(server, "POST", "/v2/models/buggy/infer", body)
            assert status == 500, answer
            assert "KeyError" in json.loads(answer)["error"]

        def errors_counted() -> bool:
            text = request(server, "GET", "/metrics")[2].decode()
            return all(
                f'modelpool_requests_total{{model="{m}",code="{c}"}} 4' in text
                for m, c in (("abort", 503), ("timed", 504), ("buggy", 500))
            )

        wait_for(errors_counted, 30, "every front's errors in /metrics")
        # the crashed and the timed-out workers were replaced: the models serve again
        fast = infer_body("SECONDS", "FP64", [1], [0])
        wait_for(
            lambda: request(server, "POST", "/v2/models/timed/infer", fast)[0] == 200,
            60,
            "a replaced worker to answer",
        )
        assert server.stop() == 0


def test_a_client_that_goes_away_through_fronts_takes_its_queued_request_with_it(
    tmp_path: Path,
) -> None:
    """Two fronts, one gated worker each: with both workers held, a request whose client
    hangs up while it waits in its front's queue leaves it, and never runs."""
    gate, record = tmp_path / "gate", tmp_path / "ran"
    options = {"path": str(gate), "record": str(record)}
    config = {
        "server": {"fronts": 2, "ready_probe_interval": 60},
        "models": {"gated": {"model": "_models:Gate", "workers": 2, "options": options}},
    }
    infer = "/v2/models/gated/infer"

    def ran() -> list[tuple[int, float]]:
        lines = record.read_text().split() if record.exists() else []
        return [(int(pid), float(x)) for pid, x in zip(lines[::2], lines[1::2], strict=True)]

    def post(x: float) -> int:
        return request(server, "POST", infer, infer_body("x", "FP32", [1], [x]))[0]

    with ServerProcess(config=config, tmp=tmp_path) as server:
        wait_for(lambda: "all 2 fronts serving" in server.output, 60, "both fronts")
        held: list[int] = []
        holders: list[threading.Thread] = []
        try:
            # hold requests until both workers run one (a connection lands on either front;
            # one landing on a busy front waits in its queue)
            while len({pid for pid, x in ran() if x == -1.0}) < 2:
                assert len(holders) < 40, ran()
                holder = threading.Thread(target=lambda: held.append(post(-1.0)))
                holder.start()
                holders.append(holder)
                wait_for(lambda: _taken(server) >= len(holders), 60, "the holder to arrive")
            queued = len(holders) - 2
            body = infer_body("x", "FP32", [1], [7.0])
            host, port = server.host_port.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(
                    f"POST {infer} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}"
                    "\r\n\r\n".encode()
                    + body
                )
                wait_for(lambda: _status(server)["queued"] > queued, 60, "it to queue")
            # its front counts it (code 499) once the hang-up has reached the pool
            gone = 'modelpool_requests_total{model="gated",code="499"} 1'
            wait_for(
                lambda: gone in request(server, "GET", "/metrics")[2].decode(),
                60,
                "the hang-up to be counted",
            )
        finally:
            gate.touch()
            for holder in holders:
                holder.join(60)
        assert held == [200] * len(holders)
        # Each front's queue is first in, first out: once a later request has run in both
        # workers (one per front), the abandoned one would have run before it, had it stayed.
        while len({pid for pid, x in ran() if x == 3.0}) < 2:
            assert len([x for _, x in ran() if x == 3.0]) < 200, ran()
            assert post(3.0) == 200
        assert 7.0 not in [x for _, x in ran()]
        assert server.stop() == 0


# ------------------------------------------------------------------ the parts, alone


def test_workers_are_shared_out_at_least_one_per_front() -> None:
    assert [share(5, i, 2) for i in range(2)] == [3, 2]
    assert [share(2, i, 4) for i in range(4)] == [1, 1, 1, 1]  # every front needs one
    config = Config.from_mapping(
        {
            "server": {"fronts": 2},
            "models": {"m": {"model": "a:B", "workers": 5, "min_ready_workers": 4}},
        }
    )
    front = config.for_front(1, 2).models["m"]
    assert front.workers == 2
    assert front.min_ready_workers == 1  # the whole server's 4 is checked across fronts


def _snapshot(
    index: int,
    *,
    listening: bool = True,
    ready: bool = True,
    age: float = 0.0,
    pid: int | None = None,
    alive: int = 1,
) -> dict[str, Any]:
    return {
        "index": index,
        "pid": pid or os.getpid(),
        "time": time.time() - age,
        "accepting": True,
        "listening": listening,
        "metrics": {"requests": [["m", 200, 5]], "latency": {}},
        "models": {
            "m": {
                "ready": ready,
                "why": "model 'm': 0 of 1 required workers alive" if not ready else "",
                "alive": alive,
                "queued": 1,
                "in_flight": 0,
                "exit_reasons": {"SIGKILL": 1},
                "batch_sizes": {},
                "workers": [],
                "recent": [0.001],
            }
        },
    }


class _Served:
    name, version, inputs, outputs = "m", "1", (), ()
    settings: Any = None
    recent = [0.002]

    class pool:
        @staticmethod
        def stats() -> dict[str, Any]:
            return {"workers": [], "queued": 2, "in_flight": 1, "exit_reasons": {}}

    def alive(self, stats: Any = None) -> int:
        return 1

    def readiness(self, window: float, stats: Any = None) -> tuple[bool, str]:
        return True, ""


def _write(tmp_path: Path, snapshot: dict[str, Any]) -> None:
    (tmp_path / f"front-{snapshot['index']}.json").write_text(json.dumps(snapshot))


@pytest.mark.parametrize(
    ("other", "ready", "why"),
    [
        ({}, True, ""),
        ({"ready": False}, False, "front 1: model 'm': 0 of 1 required workers alive"),
        ({"ready": False, "listening": False}, True, ""),  # loading: takes no connections
        ({"ready": False, "age": 60.0}, True, ""),  # stale: a front that stopped answering
        ({"ready": False, "pid": 2**22 + 7}, True, ""),  # its process is gone
    ],
)
def test_readiness_merges_the_fronts_that_take_connections(
    tmp_path: Path, other: dict[str, Any], ready: bool, why: str
) -> None:
    _write(tmp_path, _snapshot(1, **other))
    front = FrontShare(str(tmp_path), 0, 2, {"m": 1})
    live, every = front.others()
    merged = front.merged_models({"m": _Served()}, live)["m"]  # type: ignore[dict-item]
    assert merged.readiness(10.0) == (ready, why)
    counted = front.merged_metrics(Metrics(), every)
    assert counted.requests["m", 200] == 5  # counters of every slot, live or not


def test_the_whole_server_keeps_min_ready_workers_across_fronts(tmp_path: Path) -> None:
    _write(tmp_path, _snapshot(1, alive=1))
    front = FrontShare(str(tmp_path), 0, 2, {"m": 3})
    merged = front.merged_models({"m": _Served()}, front.others()[0])["m"]  # type: ignore[dict-item]
    assert merged.readiness(10.0) == (False, "model 'm': 2 of 3 required workers alive")
    stats = merged.pool.stats()
    assert (stats["queued"], stats["in_flight"], stats["exit_reasons"]) == (3, 1, {"SIGKILL": 1})
    assert sorted(merged.recent) == [0.001, 0.002]


def test_metrics_travel_between_fronts_whole() -> None:
    mine = Metrics()
    mine.observe("m", 200, 0.003)
    mine.observe("m", 503, 0.2)
    copy = Metrics.from_json(json.loads(json.dumps(mine.to_json())))
    copy.add_json(mine.to_json())
    assert copy.requests == {("m", 200): 2, ("m", 503): 2}
    assert copy.latency["m"].counts == [2 * n for n in mine.latency["m"].counts]
    assert copy.latency["m"].sum == pytest.approx(2 * mine.latency["m"].sum)
