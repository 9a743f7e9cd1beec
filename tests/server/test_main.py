"""Running ``modelpool serve`` (``server/_main``): starting (the demo, one model from an import
string, a model that cannot load, a bad configuration), stopping on SIGTERM and Ctrl+C with
every accepted request answered, and no child left behind, not even once the output's
reader went away (``modelpool serve 2>&1 | head -4``, issue #10): its workers,
multiprocessing's fork server and resource tracker are all reaped before it exits."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from _serving import ServerProcess, infer_body, model_status, slow_body
from _serving import request as _request

from _cli import modelpool_command
from _reaping import adopted, descendants, left_behind, orphans_adopted
from _waiting import wait_for
from modelpool.config import ConfigError
from modelpool.server._main import loop_factory

IRIS_ROW = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [5.1] * 4}]}


def _http(url: str, body: dict[str, object] | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(url, data=data, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_ready(url: str, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    def ready() -> bool:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        with contextlib.suppress(OSError):
            return _http(url + "/v2/health/ready")[0] == 200
        return False

    wait_for(ready, timeout, "the server to become ready", interval=0.05)


def _worker_pids(server: ServerProcess) -> list[int]:
    status = json.loads(_request(server, "GET", "/status.json")[2])
    return [w["pid"] for m in status["models"] for w in m["workers"] if w["pid"]]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead but not yet reaped
        return f.read().split()[2] != "Z"


# ---------------------------------------------------------------- starting


def test_demo_with_no_arguments_prints_how_to_call_it() -> None:
    with ServerProcess() as server:
        assert "curl" in server.output
        assert "/v2/models/iris/infer" in server.output
        body = infer_body("INPUT0", "FP32", [1, 4], [6.9, 3.1, 5.8, 2.2])
        status, _, answer = _request(server, "POST", "/v2/models/iris/infer", body)
        assert status == 200
        outputs = {o["name"]: o for o in json.loads(answer)["outputs"]}
        assert outputs["LABEL"]["data"] == [2]
        assert outputs["PROBABILITIES"]["shape"] == [1, 3]


def test_one_model_from_an_import_string_with_flags() -> None:
    with ServerProcess("_server_models:Identity", "--name", "ident", "--workers", "2") as server:
        status, _, body = _request(
            server, "POST", "/v2/models/ident/infer", infer_body("INPUT0", "INT32", [2], [4, 5])
        )
        assert status == 200
        assert json.loads(body)["outputs"][0]["data"] == [4, 5]
        status, _, body = _request(server, "GET", "/status.json")
        assert len(json.loads(body)["models"][0]["workers"]) == 2


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_event_loop_is_chosen_and_named(loop: str) -> None:
    with ServerProcess("_server_models:Identity", "--loop", loop) as server:
        assert f"({loop}; ready once models load)" in server.output
        body = infer_body("INPUT0", "INT32", [2], [4, 5])
        status, _, answer = _request(server, "POST", "/v2/models/Identity/infer", body)
        assert status == 200, answer
        assert json.loads(answer)["outputs"][0]["data"] == [4, 5]


def test_uvloop_asked_for_but_missing_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert loop_factory("auto") is None  # auto falls back to asyncio's loop
    assert loop_factory("asyncio") is None
    with pytest.raises(ConfigError, match=r"pip install 'modelpool\[fast\]'"):
        loop_factory("uvloop")
    monkeypatch.delitem(sys.modules, "uvloop")
    import uvloop

    assert loop_factory("auto") is uvloop.new_event_loop


def test_a_model_that_cannot_load_stops_the_server_with_its_error(tmp_path: Path) -> None:
    config = {"models": {"broken": {"model": "_server_models:Broken"}}}
    server = ServerProcess(config=config, tmp=tmp_path)
    code = server.proc.wait(60)
    server.stop()
    assert code == 1
    assert "weights file /models/missing.pt not found" in server.output
    assert "model 'broken' could not be loaded" in server.output


def test_config_errors_name_file_and_field(tmp_path: Path) -> None:
    config = {"models": {"m": {"model": "_server_models:Identity", "wrkers": 2}}}
    server = ServerProcess(config=config, tmp=tmp_path)
    code = server.proc.wait(30)
    server.stop()
    assert code == 2  # a usage error: nothing was started
    assert "modelpool.yaml" in server.output
    assert "models.m.wrkers: unknown field" in server.output
    assert "workers" in server.output  # what is allowed
    assert "listening" not in server.output


def test_a_failed_model_does_not_wait_for_the_others_to_load(tmp_path: Path) -> None:
    config = {
        "models": {
            "broken": {"model": "_server_models:Broken"},
            "slow": {"model": "_models:SlowSetup", "options": {"seconds": 120}},
        }
    }
    started = time.monotonic()
    server = ServerProcess(config=config, tmp=tmp_path)
    try:
        code = server.proc.wait(90)
    finally:
        server.stop()
    assert code == 1
    assert time.monotonic() - started < 60  # far below the 120 s the other model loads for
    assert "model 'broken' could not be loaded" in server.output


# ---------------------------------------------------------------- stopping


def test_sigterm_under_load_answers_every_accepted_request(tmp_path: Path) -> None:
    config = {  # no readiness probe: only the twelve requests below reach the pool
        "server": {"ready_probe_interval": 600},
        "models": {"sleepy": {"model": "_server_models:Sleepy", "workers": 2}},
    }
    server = ServerProcess(config=config, tmp=tmp_path).wait_ready()
    workers = _worker_pids(server)
    results: list[int] = []
    lock = threading.Lock()

    def call() -> None:
        status, _, _ = _request(server, "POST", "/v2/models/sleepy/infer", slow_body(0.3))
        with lock:
            results.append(status)

    callers = [threading.Thread(target=call) for _ in range(12)]
    for t in callers:
        t.start()

    def accepted() -> int:  # waiting, running, or answered: the pool has them all
        model = model_status(server, "sleepy")
        return model["queued"] + model["in_flight"] + model["latency_ms"]["count"]

    wait_for(lambda: accepted() == 12, 60, "all twelve requests to be accepted")
    code = server.stop(signal.SIGTERM)
    for t in callers:
        t.join(60)
    assert code == 0, server.output
    assert results == [200] * 12, (results, server.output)
    assert "stopped" in server.output
    assert not [p for p in workers if _alive(p)]


def test_second_ctrl_c_stops_at_once_and_reaps_workers(tmp_path: Path) -> None:
    config = {  # no readiness probe: only the two requests below reach the pool
        "server": {"ready_probe_interval": 600},
        "models": {"sleepy": {"model": "_server_models:Sleepy", "workers": 2}},
    }
    server = ServerProcess(config=config, tmp=tmp_path).wait_ready()
    workers = _worker_pids(server)
    failures: list[BaseException] = []

    def call() -> None:
        try:
            _request(server, "POST", "/v2/models/sleepy/infer", slow_body(60))
        except (ConnectionError, http.client.HTTPException) as exc:  # the server is gone
            failures.append(exc)

    callers = [threading.Thread(target=call) for _ in range(2)]
    for t in callers:
        t.start()
    wait_for(lambda: model_status(server, "sleepy")["in_flight"] == 2, 60, "both requests to run")
    server.proc.send_signal(signal.SIGINT)
    wait_for(lambda: "answering requests in flight" in server.output, 60, "the first Ctrl+C to act")
    started = time.monotonic()
    code = server.stop(signal.SIGINT)
    # "at once": well under the 60 s requests (and the 30 s drain) it would otherwise wait for
    assert time.monotonic() - started < 15
    assert code == 130, server.output
    assert not [p for p in workers if _alive(p)]
    for t in callers:
        t.join(60)
    assert len(failures) == 2  # their connections were closed, not left hanging


def test_stop_while_loading_is_a_clean_exit(tmp_path: Path) -> None:
    config = {"models": {"slow": {"model": "_models:SlowSetup", "options": {"seconds": 30}}}}
    server = ServerProcess(config=config, tmp=tmp_path)
    wait_for(lambda: "loading" in server.output, 60, "the server to report it is loading")
    code = server.stop(signal.SIGTERM)
    assert code == 0, server.output
    assert "Traceback" not in server.output


# ---------------------------------------------------------------- a reader that goes away


@pytest.mark.parametrize(
    ("sig", "keep_reading"),
    [
        (signal.SIGTERM, "Press Ctrl+C"),  # `| head -12`: gone once the banner is out
        (signal.SIGINT, "Press Ctrl+C"),
        (signal.SIGTERM, "listening on"),  # `| head -1`: gone while the models load
    ],
)
def test_stops_cleanly_after_its_output_reader_went_away(
    sig: signal.Signals, keep_reading: str
) -> None:
    watched: set[int] = set()
    with orphans_adopted(watched):
        proc = modelpool_command("serve", "--port", "0", "--workers", "2")
        try:
            assert proc.stdout is not None
            lines = []
            while not lines or keep_reading not in lines[-1]:
                line = proc.stdout.readline()
                assert line, "".join(lines)
                lines.append(line)
            url = next(w for w in lines[0].split() if w.startswith("http://"))
            proc.stdout.close()  # the reader exits, as `head` does
            _wait_ready(url, proc)
            for _ in range(20):  # serving goes on with nobody reading the output
                status, body = _http(url + "/v2/models/iris/infer", IRIS_ROW)
                assert status == 200, body
            watched |= descendants(proc.pid)
            assert len(watched) >= 4, watched  # two workers, fork server, resource tracker
            proc.send_signal(sig)
            code = proc.wait(60)  # before the fix: SIGTERM and SIGINT were ignored
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert code == 0
        # every child was reaped by the server itself, before it exited: none was left to
        # init (or, here, to the test, the subreaper), not even as a zombie
        assert not [p for p in watched if adopted(p)], left_behind(watched)
        assert not left_behind(watched)


def test_a_model_that_prints_keeps_serving_after_the_reader_went_away() -> None:
    """Workers share the server's output: a model's print() must not fail its request."""
    proc = modelpool_command("serve", "_server_models:Printer", "--name", "p", "--port", "0")
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline()]
        url = next(w for w in lines[0].split() if w.startswith("http://"))
        _wait_ready(url, proc)
        status, body = _http(url + "/v2/models/p/infer", IRIS_ROW)
        assert status == 200, body  # printed while someone reads
        proc.stdout.close()  # the reader exits
        for _ in range(10):
            status, body = _http(url + "/v2/models/p/infer", IRIS_ROW)
            assert status == 200, body  # before: BrokenPipeError raised in predict (500)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
