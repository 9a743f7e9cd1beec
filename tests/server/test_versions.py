"""Several versions of one model served at once (``versions:``), a default version for
unversioned requests, and a switch of the default, or a new version, without a failed
request: over HTTP, tritonclient's gRPC calls and ``modelpool models``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from _serving import ServerProcess, infer_body, post_json, request

from _deps import need_module
from _waiting import wait_for

BODY = infer_body("X", "FP32", [1], [0.0])


def _tagged(*tags: int, default: str | None = None) -> dict[str, Any]:
    versions = {str(t): {"options": {"tag": float(t)}} for t in tags}
    settings: dict[str, Any] = {"model": "_server_models:Tagged", "versions": versions}
    return settings | ({"default_version": default} if default else {})


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = {"server": {"grpc_port": 0}, "models": {"tagged": _tagged(1, 2, default="1")}}
    with ServerProcess(config=config, tmp=tmp_path_factory.mktemp("versions")) as served:
        yield served


def _tag(server: ServerProcess, version: str | None = None) -> float:
    """Which version answered (its tag); fails on anything but 200."""
    path = "/v2/models/tagged" + (f"/versions/{version}" if version else "") + "/infer"
    status, _, answer = request(server, "POST", path, BODY)
    assert status == 200, answer
    outputs = {o["name"]: o["data"] for o in json.loads(answer)["outputs"]}
    return float(outputs["TAG"][0])


def _index(server: ServerProcess) -> list[tuple[str, str, str]]:
    entries = post_json(server, "/v2/repository/index")[1]
    return sorted((e["name"], e["version"], e["state"]) for e in entries)


def test_every_version_answers_and_the_default_takes_unversioned_requests(
    server: ServerProcess,
) -> None:
    assert _tag(server) == 1.0
    assert _tag(server, "1") == 1.0
    assert _tag(server, "2") == 2.0
    status, _, answer = request(server, "POST", "/v2/models/tagged/versions/3/infer", BODY)
    assert status == 404
    assert json.loads(answer)["error"] == "model 'tagged' has no version '3'; it has '1', '2'"
    status, _, answer = request(server, "GET", "/v2/models/tagged")
    assert json.loads(answer)["versions"] == ["1", "2"]
    assert request(server, "GET", "/v2/models/tagged/versions/2/ready")[0] == 200
    assert _index(server) == [("tagged", "1", "READY"), ("tagged", "2", "READY")]
    (model,) = json.loads(request(server, "GET", "/status.json")[2])["models"]
    assert (model["version"], model["versions"]) == ("1", ["1", "2"])


def _status_model(server: ServerProcess) -> dict[str, Any]:
    (model,) = json.loads(request(server, "GET", "/status.json")[2])["models"]
    return model  # type: ignore[no-any-return]


def test_the_status_page_shows_every_version_with_its_workers(server: ServerProcess) -> None:
    """The versions beside the default one are on the status page too: their readiness,
    queue, latency and workers, under their model's ``other_versions``."""
    _tag(server, "2")
    model = _status_model(server)
    assert model["version"] == "1"
    (other,) = model["other_versions"]
    assert (other["version"], other["model"], other["ready"]) == (
        "2",
        "_server_models:Tagged",
        True,
    )
    assert other["latency_ms"]["count"] >= 1
    mine, its = {w["pid"] for w in model["workers"]}, {w["pid"] for w in other["workers"]}
    assert mine
    assert its
    assert not mine & its
    # the PIDs the versions answer with are their own workers'
    status, _, answer = request(server, "POST", "/v2/models/tagged/versions/2/infer", BODY)
    assert status == 200, answer
    pid = {o["name"]: o["data"] for o in json.loads(answer)["outputs"]}["PID"][0]
    assert pid in its
    # a switch of the default swaps them
    switch = {"parameters": {"default_version": "2"}}
    assert post_json(server, "/v2/repository/models/tagged/load", switch) == (200, {})
    model = _status_model(server)
    assert (model["version"], [o["version"] for o in model["other_versions"]]) == ("2", ["1"])
    assert {w["pid"] for w in model["workers"]} == its
    # one version left: nothing beside it
    one = {"parameters": {"version": "1"}}
    assert post_json(server, "/v2/repository/models/tagged/unload", one) == (200, {})
    assert _status_model(server)["other_versions"] == []


def _under_load(server: ServerProcess, change: Any) -> tuple[list[float], list[Any]]:
    """Run ``change()`` while three clients send unversioned requests; (tags answered in
    order, failures)."""
    tags: list[float] = []
    failures: list[Any] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                tags.append(_tag(server))
            except AssertionError as exc:  # (a non-200 answer)
                failures.append(exc)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(tags) >= 20, 60, "requests flowing")
        change()
        count = len(tags)
        wait_for(lambda: len(tags) >= count + 30, 60, "requests after the change")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    return tags, failures


def test_switching_the_default_under_load_fails_no_request_and_restarts_nothing(
    server: ServerProcess,
) -> None:
    pids = _pids(server)

    def switch() -> None:
        doc = {"parameters": {"default_version": "2"}}
        assert post_json(server, "/v2/repository/models/tagged/load", doc) == (200, {})

    tags, failures = _under_load(server, switch)
    assert failures == []
    assert tags[0] == 1.0
    assert tags[-1] == 2.0
    assert _pids(server) == pids  # no worker of either version restarted
    status, body = post_json(
        server, "/v2/repository/models/tagged/load", {"parameters": {"default_version": "9"}}
    )
    assert status == 404
    assert "no version '9' loaded" in body["error"]


def _pids(server: ServerProcess) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for version in ("1", "2", "3"):
        path = f"/v2/models/tagged/versions/{version}/infer"
        status, _, answer = request(server, "POST", path, BODY)
        if status == 200:
            outputs = {o["name"]: o["data"] for o in json.loads(answer)["outputs"]}
            out[version] = set(outputs["PID"])
    return out


def test_a_new_version_loads_beside_then_the_old_one_goes(server: ServerProcess) -> None:
    """A load whose config adds version 3 (the new default) and drops version 1: version 2
    keeps its workers, unversioned requests move to 3 once it is ready, version 1 drains."""
    before = _pids(server)

    def roll() -> None:
        doc = {"parameters": {"config": json.dumps(_tagged(2, 3))}}
        assert post_json(server, "/v2/repository/models/tagged/load", doc) == (200, {})

    tags, failures = _under_load(server, roll)
    assert failures == []
    assert tags[0] == 1.0
    assert tags[-1] == 3.0
    after = _pids(server)
    assert set(after) == {"2", "3"}
    assert after["2"] == before["2"]
    status, _, answer = request(server, "POST", "/v2/models/tagged/versions/1/infer", BODY)
    assert status == 404
    assert "it has '2', '3'" in json.loads(answer)["error"]
    assert _index(server) == [("tagged", "2", "READY"), ("tagged", "3", "READY")]


def test_unloading_one_version(server: ServerProcess) -> None:
    status, body = post_json(
        server, "/v2/repository/models/tagged/unload", {"parameters": {"version": "1"}}
    )
    assert status == 409  # the default: switch first
    assert "switch them to another version first" in body["error"]
    doc = {"parameters": {"version": "2"}}
    assert post_json(server, "/v2/repository/models/tagged/unload", doc) == (200, {})
    assert _index(server) == [("tagged", "1", "READY")]
    assert request(server, "POST", "/v2/models/tagged/versions/2/infer", BODY)[0] == 404
    assert _tag(server) == 1.0
    # a plain load brings the model back as it is configured now (version 1 alone)
    assert post_json(server, "/v2/repository/models/tagged/load") == (200, {})
    assert _index(server) == [("tagged", "1", "READY")]


def test_a_version_that_fails_to_load_changes_nothing(server: ServerProcess) -> None:
    settings = _tagged(1, 2, default="1")
    settings["versions"]["3"] = {"model": "_server_models:Broken"}
    doc = {"parameters": {"config": json.dumps(settings)}}
    status, body = post_json(server, "/v2/repository/models/tagged/load", doc)
    assert status == 400
    assert "version '3' of model 'tagged' could not be loaded" in body["error"]
    assert "keeps serving" in body["error"]
    assert _index(server) == [("tagged", "1", "READY"), ("tagged", "2", "READY")]
    assert _tag(server) == 1.0


def test_tritonclient_grpc_and_the_models_command_switch_versions(server: ServerProcess) -> None:
    """Versions through tritonclient's gRPC repository calls (parameters as Triton sends
    them) and ``modelpool models load --default-version`` / ``unload --version``."""
    grpcclient = need_module("tritonclient.grpc")
    assert server.grpc_target, server.output
    client = grpcclient.InferenceServerClient(server.grpc_target)
    try:
        index = client.get_model_repository_index(as_json=True)["models"]
        assert sorted(e["version"] for e in index) == ["1", "2"]
        assert client.get_model_metadata("tagged", "2", as_json=True)["versions"] == ["1", "2"]
        client.load_model("tagged", config=json.dumps(_tagged(1, 2, default="2")))
        assert _tag(server) == 2.0
    finally:
        client.close()
    cli = [sys.executable, "-m", "modelpool.cli", "models"]
    url = ["--url", server.url]
    run = subprocess.run(
        [*cli, "load", "tagged", "--default-version", "1", *url], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert _tag(server) == 1.0
    run = subprocess.run(
        [*cli, "unload", "tagged", "--version", "2", *url], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    listed = subprocess.run([*cli, "list", *url], capture_output=True, text=True, check=True)
    assert listed.stdout.split("\n")[1].split() == ["tagged", "1", "READY"]
    assert _index(server) == [("tagged", "1", "READY")]


def test_sighup_switches_the_default_and_adds_a_version(tmp_path: Path) -> None:
    """The file names another default version: requests move, no worker restarts; then a
    third version: it starts beside, the two others keep their workers."""
    models: dict[str, Any] = {"tagged": _tagged(1, 2, default="1")}
    path = tmp_path / "modelpool.yaml"
    with ServerProcess(config={"models": models}, tmp=tmp_path) as server:
        pids = _pids(server)

        def rewrite(settings: dict[str, Any]) -> None:
            path.write_text(yaml.safe_dump({"server": {"port": 0}, "models": {"tagged": settings}}))
            done = server.output.count("configuration reloaded")
            server.proc.send_signal(signal.SIGHUP)
            wait_for(
                lambda: server.output.count("configuration reloaded") > done, 120, "the reload"
            )

        tags, failures = _under_load(server, lambda: rewrite(_tagged(1, 2, default="2")))
        assert failures == []
        assert tags[-1] == 2.0
        assert _pids(server) == pids
        rewrite(_tagged(1, 2, 3, default="2"))
        after = _pids(server)
        assert (after["1"], after["2"]) == (pids["1"], pids["2"])
        assert _tag(server, "3") == 3.0
        assert _tag(server) == 2.0
        assert server.stop() == 0
