"""Models that come and go on a server with several fronts (``server.fronts`` > 1,
``server._cluster``): a load, an unload, a switch of versions, ``SIGHUP`` and ``--reload``
change every front, the answer comes once they all have, and no request fails meanwhile."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from _serving import ServerProcess, infer_body, post_json, request

from _waiting import wait_for

BODY = infer_body("INPUT0", "FP32", [1], [1.0])
FRONTS = 2


def _tagged(*tags: int, default: str | None = None) -> dict[str, Any]:
    versions = {str(t): {"options": {"tag": float(t)}} for t in tags}
    settings: dict[str, Any] = {"model": "_server_models:Tagged", "versions": versions}
    return settings | ({"default_version": default} if default else {})


def _config(**models: Any) -> dict[str, Any]:
    return {"server": {"fronts": FRONTS}, "models": models}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    config = _config(
        ident={"model": "_server_models:Identity", "workers": 2},
        tagged=_tagged(1, 2, default="1"),
    )
    with ServerProcess(config=config, tmp=tmp_path) as served:
        wait_for(lambda: "all 2 fronts serving" in served.output, 120, "both fronts")
        yield served


def _fronts(server: ServerProcess) -> list[psutil.Process]:
    children = psutil.Process(server.proc.pid).children()
    return [p for p in children if "modelpool.server._fronts" in " ".join(p.cmdline())]


def _on_every_front(server: ServerProcess, ask: Callable[[], Any], tries: int = 40) -> set[Any]:
    """What ``ask`` answers over ``tries`` new connections (the kernel spreads them over the
    fronts), as a set."""
    return {ask() for _ in range(tries)}


def _tag(server: ServerProcess, version: str | None = None) -> Any:
    path = "/v2/models/tagged" + (f"/versions/{version}" if version else "") + "/infer"
    status, _, answer = request(server, "POST", path, BODY)
    if status != 200:
        return status
    outputs = {o["name"]: o["data"] for o in json.loads(answer)["outputs"]}
    return float(outputs["TAG"][0])


def _worker_pids(server: ServerProcess, name: str) -> set[int]:
    for model in json.loads(request(server, "GET", "/status.json")[2])["models"]:
        if model["name"] == name:
            return {w["pid"] for w in model["workers"]}
    return set()


class Load:
    """Clients sending requests to ``ident`` over new connections (both fronts) while a
    change runs: the statuses they got."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.statuses: list[int] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client) for _ in range(3)]

    def _client(self) -> None:
        while not self.stop.is_set():
            path = "/v2/models/ident/infer"
            self.statuses.append(request(self.server, "POST", path, BODY)[0])

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        wait_for(lambda: len(self.statuses) >= 20, 60, "requests flowing")
        return self

    def __exit__(self, *exc: object) -> None:
        count = len(self.statuses)
        wait_for(lambda: len(self.statuses) >= count + 20 or self.stop.is_set(), 60, "more")
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def test_a_reload_with_new_settings_changes_every_front_under_load(
    server: ServerProcess,
) -> None:
    before = _worker_pids(server, "ident")
    assert len(before) == 2  # one worker on each front
    with Load(server) as load:
        doc = {"parameters": {"config": {"model": "_server_models:Identity", "workers": 4}}}
        assert post_json(server, "/v2/repository/models/ident/load", doc) == (200, {})
        after = _worker_pids(server, "ident")  # (the answer came once every front had it)
    assert set(load.statuses) == {200}, {s: load.statuses.count(s) for s in set(load.statuses)}
    assert len(after) == 4
    assert not after & before
    fronts = {w["front"] for m in json.loads(request(server, "GET", "/status.json")[2])["models"]
              if m["name"] == "ident" for w in m["workers"]}  # fmt: skip
    assert fronts == {0, 1}


def test_unload_and_load_change_every_front(server: ServerProcess) -> None:
    assert post_json(server, "/v2/repository/models/ident/unload") == (200, {})
    statuses = _on_every_front(
        server, lambda: request(server, "POST", "/v2/models/ident/infer", BODY)[0]
    )
    assert statuses == {404}
    entries = {e["name"]: e for e in post_json(server, "/v2/repository/index")[1]}
    assert entries["ident"]["state"] == "UNAVAILABLE"
    assert post_json(server, "/v2/repository/models/ident/load") == (200, {})
    statuses = _on_every_front(
        server, lambda: request(server, "POST", "/v2/models/ident/infer", BODY)[0]
    )
    assert statuses == {200}


def test_versions_switch_on_every_front(server: ServerProcess) -> None:
    assert _on_every_front(server, lambda: _tag(server)) == {1.0}
    doc = {"parameters": {"default_version": "2"}}
    assert post_json(server, "/v2/repository/models/tagged/load", doc) == (200, {})
    assert _on_every_front(server, lambda: _tag(server)) == {2.0}
    doc = {"parameters": {"version": "1"}}
    assert post_json(server, "/v2/repository/models/tagged/unload", doc) == (200, {})
    assert _on_every_front(server, lambda: _tag(server, "1")) == {404}
    assert _on_every_front(server, lambda: _tag(server, "2")) == {2.0}


def test_the_status_page_shows_every_version_over_both_fronts(server: ServerProcess) -> None:
    """Each version's workers on the status page are those of every front, whichever front
    answers the page."""
    for _ in range(10):
        model = next(
            m
            for m in json.loads(request(server, "GET", "/status.json")[2])["models"]
            if m["name"] == "tagged"
        )
        (other,) = model["other_versions"]
        assert (model["version"], other["version"]) == ("1", "2")
        assert {w["front"] for w in model["workers"]} == {0, 1}
        assert {w["front"] for w in other["workers"]} == {0, 1}
        assert not {w["pid"] for w in model["workers"]} & {w["pid"] for w in other["workers"]}


def test_a_load_that_fails_leaves_every_front_as_it_was(server: ServerProcess) -> None:
    before = _worker_pids(server, "ident")
    bad = {"model": "_models:FailSlot", "options": {"bad_index": 0}, "workers": 2}
    status, answer = post_json(
        server, "/v2/repository/models/ident/load", {"parameters": {"config": bad}}
    )
    assert status == 400
    assert "could not be loaded" in answer["error"]
    assert "(front " in answer["error"]  # which front said so
    assert _worker_pids(server, "ident") == before
    statuses = _on_every_front(
        server, lambda: request(server, "POST", "/v2/models/ident/infer", BODY)[0]
    )
    assert statuses == {200}


def test_a_front_started_after_a_change_serves_the_changed_models(server: ServerProcess) -> None:
    doc = {"parameters": {"config": {"model": "_server_models:Identity", "workers": 4}}}
    assert post_json(server, "/v2/repository/models/ident/load", doc) == (200, {})
    doc = {"parameters": {"default_version": "2"}}
    assert post_json(server, "/v2/repository/models/tagged/load", doc) == (200, {})
    victim = _fronts(server)[1]
    victim.kill()
    victim.wait(30)
    wait_for(lambda: "starting a new one" in server.output, 60, "the manager's restart")
    wait_for(lambda: len(_worker_pids(server, "ident")) == 4, 120, "the new front's workers")
    assert _on_every_front(server, lambda: _tag(server)) == {2.0}


def test_sighup_to_the_manager_reloads_every_front(tmp_path: Path) -> None:
    models: dict[str, Any] = {
        "ident": {"model": "_server_models:Identity", "workers": 2},
        "gone": {"model": "_server_models:Identity", "workers": 2},
    }
    path = tmp_path / "modelpool.yaml"
    with ServerProcess(config=_config(**models), tmp=tmp_path) as server:
        wait_for(lambda: "all 2 fronts serving" in server.output, 120, "both fronts")
        with Load(server) as load:
            models["ident"]["workers"] = 4
            del models["gone"]
            models["fresh"] = {"model": "_server_models:Identity", "workers": 2}
            path.write_text(
                yaml.safe_dump({**_config(**models), "server": {"port": 0, "fronts": 2}})
            )
            server.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "configuration reloaded" in server.output, 120, "the reload")
        assert set(load.statuses) == {200}
        assert "fresh loaded; ident loaded; gone unloaded (0 unchanged)" in server.output
        assert len(_worker_pids(server, "ident")) == 4
        statuses = _on_every_front(
            server, lambda: request(server, "POST", "/v2/models/gone/infer", BODY)[0]
        )
        assert statuses == {404}
        statuses = _on_every_front(
            server, lambda: request(server, "POST", "/v2/models/fresh/infer", BODY)[0]
        )
        assert statuses == {200}
        path.write_text("models: [")
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "was not reloaded" in server.output, 60, "the refusal")
        assert server.stop() == 0


_MODEL = """
import numpy as np
import modelpool


class Version(modelpool.Model):
    def predict(self, inputs):
        return {{"V": np.array([{v}.0])}}
"""


def test_reload_flag_with_fronts_reloads_edited_code_on_every_front(tmp_path: Path) -> None:
    source = tmp_path / "fronts_reloadable.py"
    source.write_text(_MODEL.format(v=1))
    config = _config(v={"model": "fronts_reloadable:Version", "workers": 2})
    with ServerProcess(
        "--reload", config=config, tmp=tmp_path, pythonpath=(str(tmp_path),)
    ) as server:
        wait_for(lambda: "all 2 fronts serving" in server.output, 120, "both fronts")

        def version() -> Any:
            status, _, answer = request(server, "POST", "/v2/models/v/infer", BODY)
            return float(json.loads(answer)["outputs"][0]["data"][0]) if status == 200 else status

        assert _on_every_front(server, version) == {1.0}
        source.write_text(_MODEL.format(v=2) + "\n# edited\n")
        wait_for(
            lambda: _on_every_front(server, version, 10) == {2.0}, 120, "the new code everywhere"
        )
        assert server.stop() == 0


def test_one_change_at_a_time_across_the_fronts(server: ServerProcess) -> None:
    """While a load runs (whichever front took it), a change asked of any front is refused
    with 409, saying what runs."""
    slow = {"model": "_models:SlowSetup", "options": {"seconds": 5.0}, "workers": 2}
    outcome: list[tuple[int, Any]] = []
    loader = threading.Thread(
        target=lambda: outcome.append(
            post_json(server, "/v2/repository/models/slow/load", {"parameters": {"config": slow}})
        )
    )
    loader.start()
    try:
        loading = {"name": "slow", "version": "1", "state": "LOADING"}
        wait_for(  # (a front shows LOADING only once the change holds the repository)
            lambda: loading in post_json(server, "/v2/repository/index")[1], 60, "the load"
        )
        refusals = set()
        for _ in range(10):  # new connections: both fronts are asked
            status, answer = post_json(server, "/v2/repository/models/ident/unload")
            assert status == 409, answer
            refusals.add(answer["error"])
        assert refusals == {"the repository is busy loading 'slow'; retry when that has finished"}
    finally:
        loader.join(120)
    assert outcome == [(200, {})]
    (slow_model,) = [
        m for m in json.loads(request(server, "GET", "/status.json")[2])["models"]
        if m["name"] == "slow"
    ]  # fmt: skip
    assert sorted(w["front"] for w in slow_model["workers"]) == [0, 1]
