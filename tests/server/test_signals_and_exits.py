"""``modelpool serve`` and its signals, exit statuses and children (issue #10).

- ``modelpool serve 2>&1 | head -4``: once the reader is gone, the server still serves, and
  still stops on SIGTERM / Ctrl+C with status 0.
- One convention for exit statuses and messages (docs/server.md, "Exit status").
- A stopped server leaves no child behind: its workers, multiprocessing's fork server and
  resource tracker are all reaped before it exits (nothing for init to reap later).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from _reaping import adopted, descendants, left_behind, orphans_adopted
from modelpool._output import Output

TESTS = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS / "server")])}
IRIS_ROW = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [5.1] * 4}]}


def _modelpool(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "modelpool.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        cwd=str(TESTS),
        **kwargs,  # type: ignore[call-overload]
    )


def _run(*args: str, timeout: float = 60) -> tuple[int, str]:
    proc = _modelpool(*args)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _http(url: str, body: dict[str, object] | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(url, data=data, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_ready(url: str, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            if _http(url + "/v2/health/ready")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("the server did not become ready")


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
        proc = _modelpool("serve", "--port", "0", "--workers", "2")
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
    proc = _modelpool("serve", "_server_models:Printer", "--name", "p", "--port", "0")
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


def test_output_lost_mid_write_is_silenced_not_raised() -> None:
    r, w = os.pipe()
    stream = open(w, "w", buffering=1)  # noqa: SIM115 (closed below)
    try:
        os.close(r)  # the reader is gone: writes fail with EPIPE
        out = Output(stream)
        out.write("banner\n")
        out.flush()
        assert out.lost
        stream.write("a log line\n")  # the descriptor now points at /dev/null
        stream.flush()
    finally:
        stream.close()
    dead = io.StringIO()
    dead.close()
    out = Output(dead)
    out.write("x")  # a closed file: dropped as well
    assert out.lost
    assert not out.isatty()


# ---------------------------------------------------------------- exit statuses


def test_usage_errors_exit_2() -> None:
    code, out = _run("serve", "--wrkers", "2")
    assert code == 2
    assert "Error: No such option '--wrkers'" in out


def test_configuration_errors_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "modelpool.yaml"
    path.write_text(yaml.safe_dump({"models": {"m": {"model": "x:Y", "wrkers": 2}}}))
    code, out = _run("serve", str(path))
    assert code == 2
    assert out.startswith("Error: ")
    assert "models.m.wrkers: unknown field" in out
    code, out = _run("serve", "not-an-import-string")
    assert (code, out.split(":")[0]) == (2, "Error")
    code, out = _run("serve", "_server_models:Identity", "--option", "novalue")
    assert (code, out.split(":")[0]) == (2, "Error")


def test_import_errors_exit_2() -> None:
    code, out = _run("serve", "no_such_module_anywhere:Model", "--port", "0")
    assert code == 2
    assert "Error: cannot import module 'no_such_module_anywhere'" in out
    assert "listening" not in out


def test_a_port_in_use_exits_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out = _run("serve", "--port", str(port), "--workers", "1")
    assert code == 1
    assert f"Error: cannot listen on 127.0.0.1:{port}: the port is in use" in out


def test_a_model_that_cannot_load_exits_1(tmp_path: Path) -> None:
    code, out = _run("serve", "_server_models:Broken", "--port", "0")
    assert code == 1
    assert "Error: model 'Broken' could not be loaded" in out


def test_ctrl_c_in_the_demo_exits_130() -> None:
    proc = _modelpool("demo", "--workers", "1", "--requests", "100000000")
    try:
        assert proc.stdout is not None
        lines = []
        while not lines or not lines[-1].startswith("ready in"):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    assert "Interrupted." in out
    assert "Traceback" not in out
