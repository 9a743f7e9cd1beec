"""The settings are declared once (``modelpool._settings.SETTINGS``): the Pool's signature and
the configuration file's fields follow the declaration, and both run its checks."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import modelpool
from modelpool._settings import SETTINGS, PoolSettings, parse_size, scaling, validate
from modelpool.config import Config, ConfigError, ModelSettings


def test_the_pool_signature_follows_the_declaration() -> None:
    params = inspect.signature(modelpool.Pool).parameters
    for setting in SETTINGS:
        assert setting.name in params, setting.name
        assert params[setting.name].default == setting.default, setting.name


def test_the_config_fields_are_the_declaration_plus_the_entry_s_own() -> None:
    fields = ModelSettings.model_fields
    own = {"model", "version", "versions", "default_version", "min_ready_workers"}
    assert set(fields) == {s.name for s in SETTINGS} | own
    entry = ModelSettings(model="a.b:C")
    for setting in SETTINGS:
        expected = setting.check(setting.name, setting.default)  # normalised, e.g. options {}
        assert getattr(entry, setting.name) == expected, setting.name
    assert set(entry.pool_kwargs()) == {s.name for s in SETTINGS}


@pytest.mark.parametrize(
    ("name", "value", "error", "words"),
    [
        ("workers", 0, ValueError, "workers must be greater than 0, got 0"),
        ("workers", 1.5, TypeError, "workers must be an int"),
        ("workers", True, TypeError, "workers must be an int"),
        ("retries", -1, ValueError, "retries must be at least 0"),
        ("timeout", 0, ValueError, "timeout must be greater than 0"),
        ("timeout", "5", TypeError, "timeout must be a number of seconds or None"),
        ("max_batch_delay", -0.1, ValueError, "max_batch_delay must be at least 0"),
        ("max_memory_per_worker", "lots", ValueError, "not a size"),
        ("devices", "cuda:0", TypeError, "must be a list"),
        ("options", [1], TypeError, "options must be a mapping"),
        ("start_method", "frk", ValueError, "is not available here"),
        ("seed", "1", TypeError, "seed must be an int"),
    ],
)
def test_one_check_for_the_pool_and_the_file(
    name: str, value: Any, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        validate({name: value})
    with pytest.raises(error, match=words):
        modelpool.Pool(None, **{name: value})
    with pytest.raises(ConfigError, match=words):
        Config.from_mapping({"models": {"m": {"model": "a.b:C", name: value}}})


def test_the_scaling_bounds_are_checked_once_for_both() -> None:
    assert scaling(2, None, None) == (2, 2)
    assert scaling(1, 1, 4) == (1, 4)
    assert scaling(3, 2, None) == (2, 3)
    words = "min_workers=3 is more than max_workers=2"
    with pytest.raises(ValueError, match=words):
        modelpool.Pool(None, min_workers=3, max_workers=2)
    with pytest.raises(ConfigError, match=words):
        Config.from_mapping(
            {"models": {"m": {"model": "a.b:C", "min_workers": 3, "max_workers": 2}}}
        )


def test_values_are_normalised_the_same_way() -> None:
    given = validate({"max_memory_per_worker": "1.5GB", "timeout": 2, "options": None})
    assert given == {"max_memory_per_worker": 3 * 2**29, "timeout": 2.0, "options": {}}
    entry = Config.from_mapping(
        {"models": {"m": {"model": "a.b:C", "max_memory_per_worker": "1.5GB", "timeout": 2}}}
    ).models["m"]
    assert entry.max_memory_per_worker == 3 * 2**29
    assert entry.timeout == 2.0
    assert parse_size("512MB") == 512 * 2**20


def test_pool_settings_reach_the_pool() -> None:
    pool = modelpool.Pool(None, workers=2, timeout=3, max_memory_per_worker="1GB", min_workers=1)
    settings: PoolSettings = pool._settings
    assert (settings.workers, settings.floor, settings.timeout) == (2, 1, 3.0)
    assert settings.max_memory_per_worker == 2**30
    assert settings.autoscaling
    pool.shutdown()
