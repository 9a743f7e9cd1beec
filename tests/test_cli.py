"""The ``modelpool`` command (``cli``): how ``serve`` builds a configuration from its
arguments, and one convention for exit statuses and messages (docs/server.md, "Exit
status"). Serving itself: tests/server/test_main.py."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest
import yaml

from _cli import modelpool_command
from modelpool import demo
from modelpool._importer import import_from_string
from modelpool.cli import _serve_config
from modelpool.config import ConfigError


def _run(*args: str, timeout: float = 60) -> tuple[int, str]:
    proc = modelpool_command(*args)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "modelpool.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- serve's arguments


def _flags(**given: object) -> dict[str, object]:
    names = [
        "name", "workers", "host", "port", "max_batch_size", "max_batch_delay", "timeout",
        "threads_per_worker", "start_method", "max_queue", "options",
    ]  # fmt: skip
    return {n: given.get(n, () if n == "options" else None) for n in names}


def test_serve_with_no_target_is_the_demo() -> None:
    config = _serve_config(None, _flags())
    (name,) = config.models
    assert name == "iris"
    assert config.models["iris"].model == demo.MODEL
    assert import_from_string(demo.MODEL) is demo.IrisClassifier
    assert config.server.port == 8000
    assert config.server.host == "127.0.0.1"


def test_serve_import_string_with_flags() -> None:
    config = _serve_config(
        "pkg.mod:Model",
        _flags(workers=3, port=9001, max_batch_size=8, options=("size=3", "name=big")),
    )
    assert list(config.models) == ["Model"]  # --name defaults to the class name
    settings = config.models["Model"]
    assert settings.workers == 3
    assert settings.max_batch_size == 8
    assert settings.options == {"size": 3, "name": "big"}
    assert config.server.port == 9001
    named = _serve_config("pkg.mod:Model", _flags(name="m"))
    assert list(named.models) == ["m"]


def test_serve_file_with_port_override_and_refused_model_flags(tmp_path: Path) -> None:
    path = _write(tmp_path, "models: {m: {model: a.b:C}}")
    assert _serve_config(str(path), _flags(port=1234)).server.port == 1234
    with pytest.raises(ConfigError, match="--workers"):
        _serve_config(str(path), _flags(workers=2))


def test_serve_target_that_is_neither_file_nor_import_string() -> None:
    with pytest.raises(ConfigError, match="neither a YAML file nor an import string"):
        _serve_config("model.yaml.missing", _flags())


def test_logging_flags_override_the_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "server: {port: 9000, access_log: off, log_format: json}\nmodels: {m: {model: a.b:C}}",
    )
    flags: dict[str, object] = {
        "name": None,
        "options": (),
        "access_log": "0.25",
        "log_level": "warning",
        "log_format": None,
    }
    config = _serve_config(str(path), flags)
    assert config.server.access_log == 0.25
    assert config.server.log_level == "warning"
    assert config.server.log_format == "json"  # not given: the file's
    assert config.server.port == 9000
    with pytest.raises(ConfigError, match="access_log"):
        _serve_config(str(path), {"name": None, "options": (), "access_log": "lots"})


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
    proc = modelpool_command("demo", "--workers", "1", "--requests", "100000000")
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
