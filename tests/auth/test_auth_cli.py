"""``modelpool users``, ``keys`` and ``db`` as a user runs them: real processes, the database
named by ``--config``, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _cli import ENV, TESTS

PASSWORD = "a good long password"


def run(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "modelpool.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env or ENV,
        cwd=str(TESTS),
        timeout=120,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.fixture
def config(tmp_path: Path, database_url: str) -> str:
    path = tmp_path / "modelpool.yaml"
    models = {"iris": {"model": "modelpool.demo:IrisClassifier"}, "b": {"model": "x.y:Z"}}
    path.write_text(yaml.safe_dump({"database": database_url, "models": models}))
    return str(path)


def test_users_and_keys_from_the_command_line(config: str) -> None:
    code, out = run("users", "add", "root", "--admin", "--config", config, stdin=PASSWORD + "\n")
    assert (code, out.strip()) == (0, "added admin 'root'")
    assert run("users", "add", "ann", "--config", config, stdin=PASSWORD + "\n")[0] == 0
    code, out = run("users", "add", "ann", "--config", config, stdin=PASSWORD + "\n")
    assert code == 1
    assert "Error: a user named 'ann' already exists" in out
    code, out = run("users", "list", "--config", config)
    assert code == 0
    assert [line.split()[:3] for line in out.splitlines()[1:]] == [
        ["ann", "user", "active"],
        ["root", "admin", "active"],
    ]

    code, out = run(
        "keys", "create", "--user", "ann", "--models", "iris", "--expires", "30d", "--rate", "5",
        "--config", config,
    )  # fmt: skip
    assert code == 0, out
    key = out.splitlines()[-1]  # the key, alone on the last line
    assert key.startswith("mp_")
    assert len(key) > 50
    assert "models:  iris" in out
    code, out = run("keys", "list", "--config", config)
    assert code == 0
    assert key not in out
    assert key[:11] in out
    row = out.splitlines()[1].split()
    assert row[:5] == ["1", key[:11], "ann", "iris", "active"]

    code, out = run("keys", "revoke", key[:11], "--config", config)
    assert (code, out.strip()) == (0, f"revoked key 1 ({key[:11]}) of 'ann'")
    assert "revoked" in run("keys", "list", "--config", config)[1]
    code, out = run("users", "disable", "ann", "--config", config)
    assert code == 0
    assert "active" not in run("users", "list", "--config", config)[1].splitlines()[1]
    assert run("users", "remove", "ann", "--config", config)[0] == 0
    code, out = run("keys", "create", "--user", "ann", "--config", config)
    assert code == 1
    assert "no user named 'ann'" in out


def test_passwords_and_keys_are_checked_and_never_arguments(config: str) -> None:
    code, out = run("users", "add", "ann", "--config", config, stdin="short\n")
    assert code == 2
    assert "too short" in out
    code, out = run("users", "add", "ann", "--config", config)  # nothing on stdin
    assert code == 2
    assert "no password on stdin" in out
    code, out = run("users", "add", "bad name!", "--config", config, stdin=PASSWORD + "\n")
    assert code == 2
    assert "not allowed" in out
    code, out = run("users", "add", "ann", "--password", "x", "--config", config)
    assert code == 2  # there is no such option
    assert run("users", "add", "ann", "--config", config, stdin=PASSWORD + "\n")[0] == 0
    code, out = run("keys", "create", "--user", "ann", "--models", "nope", "--config", config)
    assert code == 2
    assert "nope not in" in out
    code, out = run("keys", "create", "--user", "ann", "--expires", "soon", "--config", config)
    assert code == 2
    assert "--expires" in out
    code, out = run("keys", "revoke", "99", "--config", config)
    assert code == 1
    assert "no API key '99'" in out


def test_the_default_database_is_a_file_in_the_data_directory(tmp_path: Path) -> None:
    env = {**ENV, "MODELPOOL_DATA_DIR": str(tmp_path / "data")}
    assert run("users", "add", "root", "--admin", stdin=PASSWORD + "\n", env=env)[0] == 0
    assert (tmp_path / "data" / "modelpool.db").is_file()
    code, out = run("db", "upgrade", env=env)
    assert code == 0
    assert "already at schema revision 0001" in out
    assert os.stat(tmp_path / "data").st_mode & 0o777 == 0o700


def test_db_upgrade_migrates_a_database_behind_and_reports_an_unreachable_one(
    config: str, tmp_path: Path
) -> None:
    code, out = run("db", "upgrade", "--config", config)
    assert code == 0
    assert "schema revision none -> 0001" in out
    assert "already at" in run("db", "upgrade", "--config", config)[1]
    elsewhere = tmp_path / "unreachable.yaml"
    elsewhere.write_text(
        yaml.safe_dump(
            {
                "database": "postgresql://u:hidden-pw@127.0.0.1:1/x",
                "models": {"m": {"model": "a.b:C"}},
            }
        )
    )
    code, out = run("users", "list", "--config", str(elsewhere))
    assert code == 1
    assert "Error: cannot use the database postgresql://u:***@127.0.0.1:1/x" in out
    assert "hidden-pw" not in out
