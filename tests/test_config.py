"""The YAML configuration (``config``): every setting read and checked, and errors that name
the file, the field and what is allowed. How ``modelpool serve`` builds one from its
arguments: test_cli.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelpool.config import Config, ConfigError, load_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "modelpool.yaml"
    path.write_text(text)
    return path


def test_full_file_is_read_with_sizes_and_pool_settings(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
server:
  host: 0.0.0.0
  port: 9000
  max_body_size: 10MB
models:
  clf:
    model: mypkg.models:Classifier
    workers: 2
    options: {threshold: 0.5}
    max_batch_size: 32
    max_batch_delay: 0.002
    timeout: 5
    max_memory_per_worker: 1.5GB
    devices: ["cuda:0", "cuda:1"]
  other:
    model: mypkg.other:Model
""",
    )
    config = load_config(path)
    assert config.server.port == 9000
    assert config.server.max_body_size == 10 * 2**20
    clf = config.models["clf"]
    kwargs = clf.pool_kwargs()
    assert kwargs["workers"] == 2
    assert kwargs["options"] == {"threshold": 0.5}
    assert kwargs["max_memory_per_worker"] == int(1.5 * 2**30)
    assert kwargs["devices"] == ["cuda:0", "cuda:1"]
    assert "model" not in kwargs
    assert config.models["other"].workers == 1
    assert config.server.host == "0.0.0.0"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("models: {m: {model: a.b:C, wrkers: 2}}", ["models.m.wrkers", "unknown field", "workers"]),
        ("models: {m: {model: a.b:C, workers: 0}}", ["models.m.workers", "greater than"]),
        ("models: {m: {model: not-an-import}}", ["models.m.model", "package.module:ClassName"]),
        ("models: {m: {model: a.b:C, start_method: frk}}", ["start_method", "forkserver"]),
        ("models: {m: {model: a.b:C, devices: [tpu0]}}", ["devices", "cuda:N"]),
        ("models: {m: {model: a.b:C, max_memory_per_worker: lots}}", ["not a size"]),
        ("server: {prot: 1}\nmodels: {m: {model: a.b:C}}", ["server.prot", "port"]),
        ("models: {}", ["models", "at least 1"]),
        ("server: {}", ["models", "required"]),
        ("models: {'a b': {model: a.b:C}}", ["'a b'", "URL"]),
        ("- just\n- a list", ["top level must be a mapping"]),
        ("models: {m: {model: a.b:C}\n", ["not valid YAML", "line"]),
    ],
)
def test_errors_name_the_file_the_field_and_what_is_allowed(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message, message


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config("/nonexistent/modelpool.yaml")


def test_config_accepts_only_mappings() -> None:
    with pytest.raises(ConfigError, match="mapping"):
        Config.from_mapping(["models"])


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("server: {max_body_size: 1.5}\nmodels: {m: {model: a.b:C}}", "max_body_size"),
        ("models: {m: {model: a.b:C, max_memory_per_worker: [1]}}", "max_memory_per_worker"),
        ("models: {m: {model: a.b:C, workers: 2, min_ready_workers: 3}}", "can never be met"),
    ],
)
def test_wrong_types_are_config_errors_not_crashes(
    tmp_path: Path, text: str, fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(_write(tmp_path, text))


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "modelpool.yaml"
    path.write_bytes(b"\xff\xfemodels: {}")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


@pytest.mark.parametrize(
    ("value", "fraction"),
    [("on", 1.0), ("off", 0.0), ("0.1", 0.1), ("true", 1.0), ("1", 1.0), ("{}", None)],
)
def test_logging_settings_in_the_file(tmp_path: Path, value: str, fraction: float | None) -> None:
    if value == "{}":
        path = _write(tmp_path, "models: {m: {model: a.b:C}}")
    else:
        text = f"server: {{access_log: {value}, log_level: DEBUG, log_format: json}}\n"
        path = _write(tmp_path, text + "models: {m: {model: a.b:C}}")
    server = load_config(path).server
    if fraction is None:  # the defaults
        assert (server.access_log, server.log_level, server.log_format) == (0.0, "info", "text")
    else:
        assert server.access_log == fraction
        assert (server.log_level, server.log_format) == ("debug", "json")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("server: {access_log: sometimes}", ["server.access_log", "on, off", "'sometimes'"]),
        ("server: {access_log: 1.5}", ["server.access_log", "between 0 and 1"]),
        ("server: {log_level: loud}", ["server.log_level", "'debug'"]),
        ("server: {log_format: xml}", ["server.log_format", "'json'"]),
        ("server: {access_logs: on}", ["server.access_logs", "unknown field", "access_log"]),
    ],
)
def test_logging_settings_errors(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = _write(tmp_path, text + "\nmodels: {m: {model: a.b:C}}")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_versions_each_get_the_models_settings_with_their_changes() -> None:
    models = {
        "m": {
            "model": "pkg.mod:Model",
            "workers": 2,
            "options": {"size": 1},
            "versions": {"9": {}, "10": {"workers": 1, "options": {"size": 2}}, "beta": {}},
        }
    }
    entry = Config.from_mapping({"models": models}).models["m"]
    versions = entry.expand()
    assert {v: (s.version, s.workers, s.options) for v, s in versions.items()} == {
        "9": ("9", 2, {"size": 1}),
        "10": ("10", 1, {"size": 2}),
        "beta": ("beta", 2, {"size": 1}),
    }
    assert entry.served_version == "10"  # the highest number (names come after none)
    assert entry.default().options == {"size": 2}
    assert "versions" not in versions["9"].pool_kwargs()
    single = Config.from_mapping({"models": {"m": {"model": "a:B", "version": "3"}}}).models["m"]
    assert list(single.expand()) == ["3"]
    assert single.served_version == "3"
    # each front serves every version with its share of that version's workers
    front = Config.from_mapping({"models": models}).for_front(1, 2).models["m"].expand()
    assert (front["9"].workers, front["10"].workers) == (1, 1)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"version": "2", "versions": {"1": {}}}, "give either version: (one version) or"),
        ({"versions": {"1": {}}, "default_version": "2"}, "default_version '2' is not one of"),
        ({"versions": {}}, "versions: is empty"),
        ({"versions": {"": {}}}, "version '' must be a name or a number"),
        ({"versions": {"1": {"version": "3"}}}, "versions.1.version cannot be set per version"),
        ({"versions": {"1": {"workers": 0}}}, "versions.1: workers:"),
        ({"versions": {"1": {"colour": "red"}}}, "versions.1: colour: "),
        ({"versions": {"1": 5}}, "versions.1 must be a mapping"),
    ],
)
def test_version_errors_say_what_to_write(entry: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_mapping({"models": {"m": {"model": "a:B", **entry}}}, "f.yaml")
    assert message in str(caught.value)
    assert str(caught.value).startswith("f.yaml: ")


def test_versions_written_as_yaml_numbers(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        "models:\n  m:\n    model: a:B\n    versions: {1: {}, 2: {}}\n    default_version: 1\n"
    )
    entry = load_config(path).models["m"]
    assert (list(entry.expand()), entry.served_version) == (["1", "2"], "1")
