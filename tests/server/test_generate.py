"""Triton's generate extension over HTTP: ``/generate`` (JSON) and ``/generate_stream``
(Server-Sent Events, read live by ``curl -N``), for models that answer once."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest
from _serving import ServerProcess, request

from _deps import need_program
from modelpool import demo


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = {
        "models": {
            "iris": {"model": demo.MODEL},
            "upper": {"model": "_server_models:Upper"},
            "identity": {"model": "_server_models:Identity"},
        }
    }
    with ServerProcess(config=config, tmp=tmp_path_factory.mktemp("generate")) as served:
        yield served


def _post(server: ServerProcess, path: str, doc: object) -> tuple[int, dict[str, str], bytes]:
    return request(server, "POST", path, json.dumps(doc).encode())


def test_generate_answers_flat_json(server: ServerProcess) -> None:
    status, headers, body = _post(
        server, "/v2/models/upper/generate", {"id": "g1", "text_input": "hello", "max_tokens": 3}
    )
    assert status == 200, body
    assert headers["X-Request-ID"] == "g1"
    assert json.loads(body) == {
        "model_name": "upper",
        "model_version": "1",
        "id": "g1",
        "text_output": "HELLO",
    }
    status, _, body = _post(
        server, "/v2/models/iris/versions/1/generate", {"INPUT0": [5.1, 3.5, 1.4, 0.2]}
    )
    assert status == 200, body
    assert json.loads(body)["LABEL"] == 0


def test_generate_errors_are_the_usual_json_errors(server: ServerProcess) -> None:
    status, _, body = _post(server, "/v2/models/iris/generate", {"INPUT0": [1, 2, 3]})
    assert status == 400
    assert (
        "input 'INPUT0' has 3 values, which do not fill shape [-1, 4]" in json.loads(body)["error"]
    )
    status, _, body = _post(server, "/v2/models/identity/generate", {"INPUT0": [1]})
    assert status == 400
    assert "declares no inputs" in json.loads(body)["error"]
    status, _, body = _post(server, "/v2/models/nope/generate", {"x": 1})
    assert status == 404


def test_generate_stream_is_server_sent_events_read_live_by_curl(server: ServerProcess) -> None:
    curl = need_program("curl", "curl")
    done = subprocess.run(
        [
            curl, "-sN", "-i", f"{server.url}/v2/models/upper/generate_stream",
            "-d", json.dumps({"text_input": ["a", "b"], "id": "s1"}),
        ],
        capture_output=True, timeout=60,
    )  # fmt: skip
    head, _, events = done.stdout.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200"), done.stdout
    assert "Content-Type: text/event-stream; charset=utf-8" in head
    assert "Transfer-Encoding: chunked" in head
    assert events.startswith("data: "), events
    assert events.endswith("\n\n"), events
    (event,) = [e for e in events.split("\n\n") if e]
    assert json.loads(event.removeprefix("data: ")) == {
        "model_name": "upper",
        "model_version": "1",
        "id": "s1",
        "text_output": ["A", "B"],
    }
