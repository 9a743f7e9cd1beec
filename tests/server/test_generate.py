"""Triton's generate extension over HTTP: ``/generate`` (JSON) and ``/generate_stream``
(Server-Sent Events, read live by ``curl -N``), for models that answer once and for a model
that streams (``_server_models.Words``, a generator: one event per word, as it goes)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from _serving import ServerProcess, model_status, request

import modelpool
from _deps import need_program
from _waiting import wait_for
from modelpool import demo


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = {
        "models": {
            "iris": {"model": demo.MODEL},
            "upper": {"model": "_server_models:Upper"},
            "identity": {"model": "_server_models:Identity"},
            "words": {"model": "_server_models:Words"},
            "words_timed": {"model": "_server_models:Words", "timeout": 2},
            "demo_words": {"model": "modelpool.demo:Words", "options": {"pause": 0.01}},
            "words_queue": {"model": "_server_models:Words", "workers": 1, "max_queue": 1},
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


def _curl(server: ServerProcess, model: str, text: str) -> subprocess.Popen[bytes]:
    """``curl -N`` streaming ``model``'s answer to ``text`` (its stdout: the raw events)."""
    curl = need_program("curl", "curl")
    url = f"{server.url}/v2/models/{model}/generate_stream"
    body = json.dumps({"text_input": text, "id": "w"})
    return subprocess.Popen([curl, "-sN", url, "-d", body], stdout=subprocess.PIPE)


def _events(raw: str) -> list[tuple[str, dict[str, object]]]:
    """Server-Sent Events as (event name, the data's JSON)."""
    out = []
    for block in raw.split("\n\n"):
        if not block:
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((fields.get("event", "message"), json.loads(fields["data"])))
    return out


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_a_streaming_model_sends_each_piece_as_it_is_yielded(
    server: ServerProcess, tmp_path: Path
) -> None:
    """curl -N gets the first words while the model is still at work (its log says it has
    yielded them and not finished); when curl goes away the model's generator is closed
    (its ``finally`` runs) within a piece, long before its 200 words are done."""
    log = tmp_path / "words.log"
    curl = _curl(server, "words", f"log:{log} one two" + " slow" * 200)
    try:
        assert curl.stdout is not None
        first = [curl.stdout.readline() for _ in range(4)]  # two events, two lines each
        assert _events(b"".join(first).decode()) == [
            ("message", {"model_name": "words", "model_version": "1", "id": "w", "text_output": w})
            for w in ("one", "two")
        ]
        assert _lines(log)[:2] == ["yielded one", "yielded two"]
        assert "finally" not in _lines(log)
    finally:
        curl.kill()
        curl.communicate()
    wait_for(lambda: "finally" in _lines(log), 60, "the model's finally after curl left")
    assert len(_lines(log)) < 100, _lines(log)
    status, _, body = _post(server, "/v2/models/words/generate_stream", {"text_input": "ok"})
    assert status == 200
    assert _events(body.decode())[0][1]["text_output"] == "ok"


def test_a_whole_stream_read_by_curl_ends_cleanly(server: ServerProcess) -> None:
    curl = _curl(server, "words", "a b c d e f")
    out, _ = curl.communicate(timeout=60)
    assert [data["text_output"] for _, data in _events(out.decode())] == list("abcdef")


@pytest.mark.parametrize(
    ("model", "text", "message"),
    [
        ("words", "a b fail c", "the model failed at the word 'fail'"),
        ("words", "a b crash c", "worker"),
        ("words", "a b bad c", "must return a dict"),
        ("words_timed", "a b wait c", "timed out"),
    ],
)
def test_a_failure_mid_stream_ends_it_with_an_error_event(
    server: ServerProcess, model: str, text: str, message: str
) -> None:
    """Not a silent truncation: the pieces sent, then ``event: error`` with the message the
    same failure gets as a JSON error; the model is served afterwards."""
    status, _, body = _post(server, f"/v2/models/{model}/generate_stream", {"text_input": text})
    assert status == 200
    events = _events(body.decode())
    assert [data.get("text_output") for _, data in events[:2]] == ["a", "b"]
    assert len(events) == 3, events
    name, data = events[2]
    assert name == "error"
    assert message in str(data["error"]), data
    wait_for(  # (a worker stuck past its timeout is killed: its successor serves this)
        lambda: _post(server, f"/v2/models/{model}/generate_stream", {"text_input": "x"})[0] == 200,
        60,
        f"{model} to serve again",
    )


def test_a_streaming_model_on_the_one_answer_routes_says_where_to_go(
    server: ServerProcess,
) -> None:
    status, _, body = _post(server, "/v2/models/words/generate", {"text_input": "a b"})
    assert status == 400
    error = json.loads(body)["error"]
    assert "streams its answer" in error
    assert "/v2/models/words/generate_stream" in error
    body_json = {
        "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["a"]}]
    }
    status, _, body = _post(server, "/v2/models/words/infer", body_json)
    assert status == 400
    assert "ModelStreamInfer" in json.loads(body)["error"]


def test_an_error_before_the_first_piece_is_a_json_error(server: ServerProcess) -> None:
    status, headers, body = _post(server, "/v2/models/words/generate_stream", {"nope": 1})
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    assert "text_input" in json.loads(body)["error"]


# ----------------------------------------------------------------------------- modelpool.Client


def test_client_stream_yields_the_pieces_as_they_come(
    server: ServerProcess, tmp_path: Path
) -> None:
    log = tmp_path / "words.log"
    with modelpool.Client(server.url) as client:
        pieces = client.stream("words", {"text_input": "a b c"}, request_id="c1")
        assert list(pieces) == [{"text_output": w} for w in "abc"]
        assert list(client.stream("upper", {"text_input": ["x", "y"]})) == [
            {"text_output": ["X", "Y"]}
        ]
        # leaving the loop early stops the model's generator on the server
        for piece in client.stream("words", {"text_input": f"log:{log} one" + " slow" * 200}):
            assert piece == {"text_output": "one"}
            break
    wait_for(lambda: "finally" in _lines(log), 60, "the model's finally after the client left")
    assert len(_lines(log)) < 100


def test_client_stream_raises_the_error_after_the_pieces(server: ServerProcess) -> None:
    with modelpool.Client(server.url) as client:
        with pytest.raises(modelpool.ServerError, match="failed at the word 'fail'") as caught:
            list(client.stream("words", {"text_input": "a b fail"}))
        assert caught.value.status == 500
        pieces = client.stream("words", {"text_input": "a b fail"})
        assert [next(pieces), next(pieces)] == [{"text_output": "a"}, {"text_output": "b"}]
        with pytest.raises(modelpool.ServerError, match="failed at the word 'fail'"):
            next(pieces)
        with pytest.raises(modelpool.ServerTimeoutError, match="timed out"):
            list(client.stream("words_timed", {"text_input": "a wait"}))
        with pytest.raises(modelpool.ServerError, match="text_input") as caught:
            list(client.stream("words", {"nope": "x"}))
        assert caught.value.status == 400


def test_client_astream(server: ServerProcess) -> None:
    async def main() -> tuple[list[object], str]:
        async with modelpool.Client(server.url) as client:
            got = [piece async for piece in client.astream("words", {"text_input": "a b c"})]
            try:
                async for _ in client.astream("words", {"text_input": "a crash"}):
                    pass
            except modelpool.ServerError as exc:
                return got, exc.message
        return got, ""

    got, error = asyncio.run(main())
    assert got == [{"text_output": w} for w in "abc"]
    assert "exited" in error, error


def test_the_demo_model_that_streams(server: ServerProcess) -> None:
    with modelpool.Client(server.url) as client:
        pieces = list(client.stream("demo_words", {"text_input": "one two three"}))
    assert pieces == [{"text_output": w} for w in ("one", "two", "three")]


def test_a_stream_over_max_queue_is_a_503_json_error(server: ServerProcess) -> None:
    """The queue's limit holds for streams: one runs, one waits, the next is refused with the
    usual 503 (not an event stream)."""
    curl = _curl(server, "words_queue", "one" + " slow" * 200)
    waiting: list[int] = []
    try:
        assert curl.stdout is not None
        curl.stdout.readline()  # the first piece: the worker is busy with this stream
        second = threading.Thread(
            target=lambda: waiting.append(
                _post(server, "/v2/models/words_queue/generate_stream", {"text_input": "x"})[0]
            )
        )
        second.start()
        wait_for(lambda: model_status(server, "words_queue")["queued"] == 1, 60, "one queued")
        status, headers, body = _post(
            server, "/v2/models/words_queue/generate_stream", {"text_input": "y"}
        )
        assert status == 503
        assert headers["Content-Type"].startswith("application/json")
        assert "Retry-After" in headers
        assert "queue" in json.loads(body)["error"]
    finally:
        curl.kill()
        curl.communicate()
    second.join(60)
    assert waiting == [200]
