"""The model repository while the server runs (``server._repository``): load, unload and
reload over Triton's repository API (with tritonclient's own calls), without a failed request,
and from the ``modelpool models`` command."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from _serving import ServerProcess, infer_body, post_json, request

from _deps import need_module
from _waiting import wait_for
from modelpool import demo

IRIS = infer_body("INPUT0", "FP32", [1, 4], [5.1, 3.5, 1.4, 0.2])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = {
        "models": {
            "iris": {"model": demo.MODEL},
            "ident": {"model": "_server_models:Identity", "workers": 2},
            "sleepy": {"model": "_server_models:Sleepy"},
        }
    }
    with ServerProcess(config=config, tmp=tmp_path_factory.mktemp("repository")) as served:
        yield served


def _index(server: ServerProcess) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in post_json(server, "/v2/repository/index")[1]}


def _ident(server: ServerProcess, x: float) -> tuple[int, bytes]:
    body = infer_body("INPUT0", "FP32", [1], [x])
    status, _, answer = request(server, "POST", "/v2/models/ident/infer", body)
    return status, answer


def test_unload_then_load_a_configured_model(server: ServerProcess) -> None:
    assert post_json(server, "/v2/repository/models/iris/unload") == (200, {})
    status, _, body = request(server, "POST", "/v2/models/iris/infer", IRIS)
    assert status == 404
    error = json.loads(body)["error"]
    assert "model 'iris' is not loaded" in error
    assert "POST /v2/repository/models/iris/load" in error
    entry = _index(server)["iris"]
    assert entry["state"] == "UNAVAILABLE"
    assert "unload" in entry["reason"]
    assert post_json(server, "/v2/repository/models/iris/unload")[0] == 404  # (not loaded)
    assert post_json(server, "/v2/repository/models/iris/load") == (200, {})
    assert request(server, "POST", "/v2/models/iris/infer", IRIS)[0] == 200
    assert _index(server)["iris"]["state"] == "READY"


def test_tritonclients_repository_calls_load_a_new_model(server: ServerProcess) -> None:
    """tritonclient's ``load_model`` with a config (its JSON string), ``unload_model`` and
    ``get_model_repository_index``."""
    httpclient = need_module("tritonclient.http")
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        config = json.dumps({"model": "_server_models:Identity", "workers": 1})
        client.load_model("fresh", config=config)
        assert client.is_model_ready("fresh")
        x = httpclient.InferInput("INPUT0", [2], "FP32")
        x.set_data_from_numpy(np.array([1.5, 2.5], np.float32))
        assert client.infer("fresh", [x]).as_numpy("OUTPUT0").tolist() == [1.5, 2.5]
        index = {e["name"]: e for e in client.get_model_repository_index()}
        assert index["fresh"]["state"] == "READY"
        client.unload_model("fresh")
        assert not client.is_model_ready("fresh")
        index = {e["name"]: e for e in client.get_model_repository_index()}
        assert index["fresh"]["state"] == "UNAVAILABLE"
    finally:
        client.close()


def test_a_load_that_fails_says_why_and_keeps_the_old_model(server: ServerProcess) -> None:
    failing = {"model": "_models:FailSlot", "options": {"bad_index": 0}, "workers": 1}
    status, answer = post_json(
        server, "/v2/repository/models/ident/load", {"parameters": {"config": failing}}
    )
    assert status == 400
    assert "could not be loaded (the model already loaded keeps serving)" in answer["error"]
    assert "slot 0 cannot load" in answer["error"]
    assert _ident(server, 3.0)[0] == 200
    entry = _index(server)["ident"]
    assert entry["state"] == "READY"
    assert "its last load failed" in entry["reason"]
    status_doc = json.loads(request(server, "GET", "/status.json")[2])
    (model,) = [m for m in status_doc["models"] if m["name"] == "ident"]
    assert "slot 0 cannot load" in model["last_load_error"]
    status, answer = post_json(
        server, "/v2/repository/models/other/load", {"parameters": {"config": {"workers": 0}}}
    )
    assert status == 400
    assert "model" in answer["error"]  # (the settings' own message: no model, workers >= 1)
    assert post_json(server, "/v2/repository/models/nothing/load")[0] == 404


def test_a_reload_under_load_fails_no_request(server: ServerProcess) -> None:
    """Requests keep flowing while the model is reloaded twice: every one is answered 200,
    and the new workers serve afterwards."""
    results: list[int] = []
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            status, body = _ident(server, float(i))
            results.append(status)
            if status == 200:
                assert json.loads(body)["outputs"][0]["data"] == [float(i)]
            i += 1

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(results) >= 20, 60, "requests flowing")
        for _ in range(2):
            assert post_json(server, "/v2/repository/models/ident/load") == (200, {})
        count = len(results)
        wait_for(lambda: len(results) >= count + 20, 60, "requests to the reloaded model")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert set(results) == {200}, {s: results.count(s) for s in set(results)}


def test_unload_lets_a_request_in_flight_finish(server: ServerProcess) -> None:
    answered: list[int] = []
    body = infer_body("SECONDS", "FP64", [1], [1.0])
    slow = threading.Thread(
        target=lambda: answered.append(request(server, "POST", "/v2/models/sleepy/infer", body)[0])
    )
    slow.start()
    wait_for(
        lambda: any(
            m["name"] == "sleepy" and m["in_flight"]
            for m in json.loads(request(server, "GET", "/status.json")[2])["models"]
        ),
        60,
        "the request in flight",
    )
    assert post_json(server, "/v2/repository/models/sleepy/unload") == (200, {})
    slow.join(60)
    assert answered == [200]
    assert request(server, "POST", "/v2/models/sleepy/infer", body)[0] == 404
    assert post_json(server, "/v2/repository/models/sleepy/load") == (200, {})


def test_one_change_at_a_time(server: ServerProcess) -> None:
    """A load while another runs is refused with 409, saying what runs."""
    slow = {"model": "_models:SlowSetup", "options": {"seconds": 2.0}, "workers": 1}
    outcome: list[tuple[int, Any]] = []
    loader = threading.Thread(
        target=lambda: outcome.append(
            post_json(server, "/v2/repository/models/slow/load", {"parameters": {"config": slow}})
        )
    )
    loader.start()
    wait_for(lambda: _index(server).get("slow", {}).get("state") == "LOADING", 60, "LOADING")
    status, answer = post_json(server, "/v2/repository/models/iris/unload")
    assert status == 409
    assert "busy loading 'slow'" in answer["error"]
    loader.join(60)
    assert outcome == [(200, {})]
    assert post_json(server, "/v2/repository/models/slow/unload") == (200, {})


def test_the_models_command(server: ServerProcess) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "modelpool.cli", "models", *args, "--url", server.url],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    done = cli("list")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split() == ["MODEL", "VERSION", "STATE", "REASON"]
    assert any(line.split()[:3] == ["iris", "1", "READY"] for line in done.stdout.splitlines())
    done = cli("load", "cli_model", "--model", "_server_models:Identity")
    assert (done.returncode, done.stdout.strip()) == (0, "model 'cli_model' loaded"), done.stderr
    assert _index(server)["cli_model"]["state"] == "READY"
    done = cli("unload", "cli_model")
    assert done.returncode == 0, done.stderr
    assert json.loads(cli("list", "--json").stdout)[-1]["state"] == "UNAVAILABLE"
    done = cli("unload", "cli_model")
    assert done.returncode == 1
    assert "HTTP 404: model 'cli_model' is not loaded" in done.stderr


# ----------------------------------------------------------------------------- SIGHUP


def _pids(server: ServerProcess, name: str) -> list[int]:
    status = json.loads(request(server, "GET", "/status.json")[2])
    (model,) = [m for m in status["models"] if m["name"] == name]
    return sorted(w["pid"] for w in model["workers"])


def test_sighup_reloads_the_changed_models_under_load(tmp_path: Path) -> None:
    """The file is read again: a changed model is reloaded beside the old one (no request
    fails meanwhile), a new one loaded, a removed one unloaded, an unchanged one untouched;
    a file that does not parse changes nothing and the log says why."""
    models: dict[str, Any] = {
        "ident": {"model": "_server_models:Identity", "workers": 1},
        "iris": {"model": demo.MODEL, "workers": 1},
        "gone": {"model": "_server_models:Identity", "workers": 1},
    }
    path = tmp_path / "modelpool.yaml"
    with ServerProcess(config={"models": models}, tmp=tmp_path) as server:
        iris = _pids(server, "iris")
        results: list[int] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                results.append(_ident(server, 1.0)[0])

        thread = threading.Thread(target=load)
        thread.start()
        try:
            wait_for(lambda: len(results) >= 10, 60, "requests flowing")
            models["ident"]["workers"] = 2
            del models["gone"]
            models["fresh"] = {"model": "_server_models:Identity", "workers": 1}
            path.write_text(yaml.safe_dump({"server": {"port": 0}, "models": models}))
            server.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "configuration reloaded" in server.output, 120, "the reload")
            count = len(results)
            wait_for(lambda: len(results) >= count + 10, 60, "requests after the reload")
        finally:
            stop.set()
            thread.join(60)
        assert set(results) == {200}, {s: results.count(s) for s in set(results)}
        assert "fresh loaded; ident loaded; gone unloaded (1 unchanged)" in server.output
        index = _index(server)
        assert [index[n]["state"] for n in ("ident", "iris", "fresh")] == ["READY"] * 3
        assert index["gone"]["state"] == "UNAVAILABLE"
        assert len(_pids(server, "ident")) == 2
        assert _pids(server, "iris") == iris  # not touched

        path.write_text("models: [")
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "was not reloaded" in server.output, 60, "the refusal")
        assert _index(server)["fresh"]["state"] == "READY"
        assert server.stop() == 0


def test_sighup_without_a_file_says_so() -> None:
    with ServerProcess("_server_models:Identity", "--workers", "1") as server:
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "nothing to read again" in server.output, 60, "the message")
        assert _ident_named(server, "Identity") == 200
        assert server.stop() == 0


def _ident_named(server: ServerProcess, name: str) -> int:
    body = infer_body("INPUT0", "FP32", [1], [1.0])
    return request(server, "POST", f"/v2/models/{name}/infer", body)[0]


def test_a_load_past_setup_timeout_is_abandoned_cleanly(server: ServerProcess) -> None:
    """A model whose setup outlasts its ``setup_timeout``: the load fails saying so, its
    workers are gone, and the index says why."""
    slow = {
        "model": "_models:SlowSetup",
        "options": {"seconds": 120},
        "setup_timeout": 0.5,
        "workers": 1,
    }
    before = _children(server)
    status, answer = post_json(
        server, "/v2/repository/models/stuck/load", {"parameters": {"config": slow}}
    )
    assert status == 400
    assert "model 'stuck' could not be loaded" in answer["error"]
    assert "setup_timeout" in answer["error"] or "0.5 s" in answer["error"], answer
    entry = _index(server)["stuck"]
    assert entry["state"] == "UNAVAILABLE"
    assert "its last load failed" in entry["reason"]
    status_doc = json.loads(request(server, "GET", "/status.json")[2])
    assert "stuck" not in [m["name"] for m in status_doc["models"]]
    wait_for(lambda: _children(server) == before, 30, "no process left of the failed load")


def _children(server: ServerProcess) -> set[int]:
    psutil = need_module("psutil")
    return {p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)}


# ----------------------------------------------------------------------------- --reload

_VERSION = """
import numpy as np
import modelpool


class Version(modelpool.Model):
    def predict(self, inputs):
        return {{"V": np.array([{v}.0])}}  # {pad}
"""


def _version(server: ServerProcess) -> float:
    status, _, body = request(server, "POST", "/v2/models/v/infer", IRIS)
    assert status == 200, body
    return float(json.loads(body)["outputs"][0]["data"][0])


def test_reload_flag_reloads_changed_model_code_and_configuration(tmp_path: Path) -> None:
    """``serve --reload``: an edited model file is served by new workers with the new code; a
    file that does not import leaves the old code serving, and says why; an edited
    configuration is reloaded."""
    source = tmp_path / "reloadable_model.py"
    source.write_text(_VERSION.format(v=1, pad=""))
    models = {"v": {"model": "reloadable_model:Version", "workers": 1}}
    config = {"models": models}
    with ServerProcess(
        "--reload", config=config, tmp=tmp_path, pythonpath=(str(tmp_path),)
    ) as server:
        assert _version(server) == 1.0
        wait_for(lambda: "--reload: watching 2 file(s)" in server.output, 60, "the watcher")
        source.write_text(_VERSION.format(v=2, pad="edited"))
        wait_for(lambda: _version(server) == 2.0, 60, "the new code served")
        source.write_text("this is not python\n")
        wait_for(lambda: "does not import" in server.output, 60, "the import error")
        assert _version(server) == 2.0
        source.write_text(_VERSION.format(v=3, pad="fixed"))
        wait_for(lambda: _version(server) == 3.0, 60, "the fixed code served")
        models["v"]["workers"] = 2
        (tmp_path / "modelpool.yaml").write_text(
            yaml.safe_dump({"server": {"port": 0}, "models": models})
        )
        wait_for(lambda: len(_pids(server, "v")) == 2, 60, "the reloaded configuration")
        assert server.stop() == 0
