"""The server's logs, read as an operator would: the access log (on, off, sampled), JSON lines,
request ids end to end (header, body, generated; into the worker), the one log record a crash,
a model exception or a bad return value gets, probes not counted as served requests, and error
texts worded for an HTTP caller. Every wait is for a line or an answer, never a sleep."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _serving import ServerProcess
from _serving import request as _request

from modelpool import demo

BODY = json.dumps(
    {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
).encode()


def _wait_line(server: ServerProcess, predicate: Callable[[str], bool], what: str) -> str:
    """The first output line that satisfies ``predicate``, waiting for it to be written (the
    deadline only bounds a failure)."""
    deadline = time.monotonic() + 60
    while True:
        for line in list(server.lines):
            if predicate(line):
                return line
        if time.monotonic() > deadline or server.proc.poll() is not None:
            raise AssertionError(f"no {what} in the output:\n{server.output[-6000:]}")
        time.sleep(0.02)


def _records(server: ServerProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in list(server.lines)]


def _wait_record(server: ServerProcess, what: str, **match: Any) -> dict[str, Any]:
    def fits(line: str) -> bool:
        record = json.loads(line)
        return all(record.get(k) == v for k, v in match.items())

    return json.loads(_wait_line(server, fits, what))


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------- JSON, access log on


@pytest.fixture(scope="module")
def jsonlog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = {
        "server": {
            "access_log": "on",
            "log_format": "json",
            "log_level": "debug",
            "ready_probe_interval": 0.2,
        },
        "models": {
            "iris": {"model": demo.MODEL},
            "abort": {"model": "_server_models:Abort"},
            "bad": {"model": "_server_models:BadReturn"},
            "buggy": {"model": "_server_models:Buggy"},
            "talker": {"model": "_server_models:Talker"},
            "quiet": {"model": "_server_models:Identity"},
        },
    }
    with ServerProcess(config=config, tmp=tmp_path_factory.mktemp("jsonlog")) as server:
        yield server


def _after_access(server: ServerProcess, rid: str) -> list[dict[str, Any]]:
    """Every record about request ``rid``, once its access line (written last) is out."""
    _wait_record(server, f"access line of {rid}", logger="modelpool.access", request_id=rid)
    return [r for r in _records(server) if r.get("request_id") == rid]


def test_request_id_from_the_header_is_answered_and_logged(jsonlog: ServerProcess) -> None:
    rid = _new_id("hdr")
    status, headers, body = _request(
        jsonlog, "POST", "/v2/models/iris/infer", BODY, **{"X-Request-ID": rid}
    )
    assert status == 200
    assert headers["X-Request-ID"] == rid
    assert json.loads(body)["id"] == rid
    access = _wait_record(jsonlog, "access line", logger="modelpool.access", request_id=rid)
    assert access["status"] == 200
    assert access["method"] == "POST"
    assert access["path"] == "/v2/models/iris/infer"
    assert access["model"] == "iris"
    assert access["duration_ms"] >= 0
    assert access["bytes"] == len(body)


def test_request_id_from_the_body(jsonlog: ServerProcess) -> None:
    rid = _new_id("body")
    doc = json.loads(BODY) | {"id": rid}
    status, headers, body = _request(
        jsonlog, "POST", "/v2/models/iris/infer", json.dumps(doc).encode()
    )
    assert status == 200
    assert headers["X-Request-ID"] == rid
    assert json.loads(body)["id"] == rid
    _wait_record(jsonlog, "access line", logger="modelpool.access", request_id=rid)


def test_a_request_id_is_made_when_none_is_given(jsonlog: ServerProcess) -> None:
    status, headers, body = _request(jsonlog, "POST", "/v2/models/iris/infer", BODY)
    assert status == 200
    rid = headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert json.loads(body)["id"] == rid
    status, headers, _ = _request(jsonlog, "GET", "/v2/health/live")
    assert headers["X-Request-ID"] not in ("", rid)  # every answer has its own
    _wait_record(jsonlog, "access line", logger="modelpool.access", request_id=rid)


def test_an_unusable_request_id_header_is_a_400(jsonlog: ServerProcess) -> None:
    status, headers, body = _request(
        jsonlog, "GET", "/v2/health/live", **{"X-Request-ID": "has spaces"}
    )
    assert status == 400
    assert "X-Request-ID" in json.loads(body)["error"]
    assert re.fullmatch(r"[0-9a-f]{32}", headers["X-Request-ID"])


def test_a_worker_crash_is_logged_once_with_pid_and_request_id(jsonlog: ServerProcess) -> None:
    rid = _new_id("crash")
    status, headers, body = _request(
        jsonlog, "POST", "/v2/models/abort/infer", BODY, **{"X-Request-ID": rid}
    )
    assert status == 503
    assert headers["X-Request-ID"] == rid
    message = json.loads(body)["error"]
    assert "SIGABRT" in message
    pid = int(re.search(r"pid (\d+)", message).group(1))  # type: ignore[union-attr]
    assert message.count("model ") == 1, message  # no doubled prefix
    errors = [r for r in _after_access(jsonlog, rid) if r["level"] == "ERROR"]
    assert len(errors) == 1, errors
    (error,) = errors
    assert error["logger"] == "modelpool.server"
    assert error["model"] == "abort"
    assert error["worker_pid"] == pid
    assert "SIGABRT" in error["message"]


def test_a_model_exception_is_logged_once_with_its_traceback(jsonlog: ServerProcess) -> None:
    rid = _new_id("raise")
    status, _, body = _request(
        jsonlog, "POST", "/v2/models/buggy/infer", BODY, **{"X-Request-ID": rid}
    )
    assert status == 500
    assert "KeyError" in json.loads(body)["error"]
    errors = [r for r in _after_access(jsonlog, rid) if r["level"] == "ERROR"]
    assert len(errors) == 1, errors
    (error,) = errors
    assert error["model"] == "buggy"
    assert isinstance(error["worker_pid"], int)
    assert "KeyError" in error["message"]
    assert "Traceback (most recent call last)" in error["traceback"]
    assert "no such feature" in error["traceback"]


def test_a_bad_return_value_is_logged_once(jsonlog: ServerProcess) -> None:
    rid = _new_id("bad")
    status, _, body = _request(
        jsonlog, "POST", "/v2/models/bad/infer", BODY, **{"X-Request-ID": rid}
    )
    assert status == 500
    assert "returned bad outputs" in json.loads(body)["error"]
    errors = [r for r in _after_access(jsonlog, rid) if r["level"] == "ERROR"]
    assert len(errors) == 1, errors
    assert errors[0]["model"] == "bad"
    assert isinstance(errors[0]["worker_pid"], int)
    assert "list" in errors[0]["message"]


def test_the_worker_knows_the_request_id_and_its_log_lines_carry_it(
    jsonlog: ServerProcess,
) -> None:
    rid = _new_id("talk")
    status, _, body = _request(
        jsonlog, "POST", "/v2/models/talker/infer", BODY, **{"X-Request-ID": rid}
    )
    assert status == 200
    assert json.loads(body)["outputs"][0]["data"] == [rid]  # modelpool.request_id()
    record = _wait_record(jsonlog, "the model's log line", logger="talker", request_id=rid)
    assert record["message"] == "talking about this request"
    assert record["model"] == "talker"
    assert isinstance(record["worker_pid"], int)


def _probes(server: ServerProcess, model: str) -> int:
    text = f"readiness probe of {model!r} answered"
    return sum(1 for r in _records(server) if r["message"] == text)


def _wait_probes(server: ServerProcess, model: str, count: int) -> None:
    deadline = time.monotonic() + 60
    while _probes(server, model) < count:
        if time.monotonic() > deadline or server.proc.poll() is not None:
            raise AssertionError(
                f"fewer than {count} probes of {model!r}:\n{server.output[-6000:]}"
            )
        time.sleep(0.02)


def _served(server: ServerProcess, model: str) -> tuple[int, str]:
    status = json.loads(_request(server, "GET", "/status.json")[2])
    (entry,) = [m for m in status["models"] if m["name"] == model]
    served = sum(w["served"] for w in entry["workers"])
    metrics = _request(server, "GET", "/metrics")[2].decode()
    lines = [
        line
        for line in metrics.splitlines()
        if line.startswith(f'modelpool_worker_requests_total{{model="{model}"')
    ]
    return served, "\n".join(lines)


def test_readiness_probes_are_not_counted_as_served_requests(jsonlog: ServerProcess) -> None:
    _wait_probes(jsonlog, "quiet", _probes(jsonlog, "quiet") + 3)
    served, metrics = _served(jsonlog, "quiet")
    assert served == 0
    assert metrics.endswith(" 0"), metrics
    body = BODY.replace(b'"FP32"', b'"FP64"')  # Identity takes anything
    for _ in range(2):
        assert _request(jsonlog, "POST", "/v2/models/quiet/infer", body)[0] == 200
    _wait_probes(jsonlog, "quiet", _probes(jsonlog, "quiet") + 3)
    served, metrics = _served(jsonlog, "quiet")
    assert served == 2
    assert metrics.endswith(" 2"), metrics


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        (
            {"name": "INPUT0", "datatype": "FP64", "shape": [1, 4], "data": [1, 2, 3, 4]},
            "model 'iris': input 'INPUT0': expected datatype FP32, got FP64",
        ),
        (
            {"name": "INPUT0", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
            "model 'iris': input 'INPUT0': expected shape [-1, 4] (-1 = any), got [1, 3]",
        ),
        (
            {"name": "WRONG", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]},
            "model 'iris': no input named 'WRONG'; its inputs are INPUT0",
        ),
    ],
    ids=["datatype", "shape", "name"],
)
def test_input_errors_read_right_over_http(
    jsonlog: ServerProcess, tensor: dict[str, Any], expected: str
) -> None:
    body = json.dumps({"inputs": [tensor]}).encode()
    status, _, answer = _request(jsonlog, "POST", "/v2/models/iris/infer", body)
    assert status == 400
    message = json.loads(answer)["error"]
    assert message == expected
    assert "IrisClassifier" not in message  # the class name is not the URL's
    assert "np." not in message
    assert "astype" not in message


def test_every_line_is_one_json_object(jsonlog: ServerProcess) -> None:
    _request(jsonlog, "GET", "/nope")  # a 404, logged as well
    lines = list(jsonlog.lines)
    assert any("listening on" in json.loads(line)["message"] for line in lines)
    for line in lines:
        record = json.loads(line)  # the banner too: every line is JSON
        assert {"time", "level", "logger", "message"} <= record.keys(), record


# ---------------------------------------------------------------- text, sampled and off


def test_access_log_sampled_from_the_command_line() -> None:
    server = ServerProcess(
        "_server_models:Identity", "--access-log", "0.5", "--log-level", "warning"
    )
    with server:
        for i in range(200):
            assert (
                _request(server, "GET", "/v2/health/live", **{"X-Request-ID": f"s-{i}"})[0] == 200
            )
        marker = _new_id("marker")
        assert _request(server, "GET", "/nope", **{"X-Request-ID": marker})[0] == 404
        # errors are always logged: once it is out, every sampled line before it is too
        line = _wait_line(server, lambda line: f"request_id={marker}]" in line, "404 line")
        assert "modelpool.access" in line
        assert '"GET /nope HTTP/1.1" 404' in line
        sampled = [ln for ln in server.lines if "modelpool.access" in ln and "request_id=s-" in ln]
        assert 40 <= len(sampled) <= 160, len(sampled)  # 100 expected; 8 standard deviations
        # a percent-encoded line break in the path cannot forge a second log line
        forged = _new_id("forged")
        path = "/x%0A2026-01-01 00:00:00 INFO modelpool.access: forged".replace(" ", "%20")
        assert _request(server, "GET", path, **{"X-Request-ID": forged})[0] == 404
        line = _wait_line(server, lambda line: f"request_id={forged}]" in line, "forged 404")
        assert "/x%0A2026" in line
        assert not [ln for ln in server.lines if ln.startswith("2026-01-01")]


def test_access_log_off_by_default_and_text_failures_carry_the_request_id(
    tmp_path: Path,
) -> None:
    config = {
        "models": {
            "identity": {"model": "_server_models:Identity"},
            "buggy": {"model": "_server_models:Buggy"},
        }
    }
    with ServerProcess(config=config, tmp=tmp_path) as server:
        for _ in range(5):
            assert _request(server, "POST", "/v2/models/identity/infer", BODY)[0] == 200
        rid = _new_id("text")
        status, headers, _ = _request(
            server, "POST", "/v2/models/buggy/infer", BODY, **{"X-Request-ID": rid}
        )
        assert status == 500
        assert headers["X-Request-ID"] == rid
        line = _wait_line(server, lambda line: f"request_id={rid}]" in line, "the error line")
        assert " ERROR modelpool.server: model 'buggy' raised KeyError" in line
        assert "model=buggy worker_pid=" in line
        _wait_line(server, lambda line: line.startswith("KeyError: "), "the traceback's end")
        assert "modelpool.access" not in server.output
        assert sum(1 for ln in server.lines if rid in ln) == 1
