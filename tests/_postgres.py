"""A real PostgreSQL server for the tests: ``initdb`` into a temporary directory, ``postgres``
on a free port of 127.0.0.1, trust authentication, durability off (fsync) for speed.

PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user that
Debian's ``postgresql`` package creates. A missing installation skips locally and fails in CI
(``_deps``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from _deps import IN_CI, MISSING


def _bindir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found and shutil.which("initdb"):
        return os.path.dirname(str(shutil.which("initdb")))
    if not found:
        message = f"{MISSING} PostgreSQL's initdb is not installed; apt-get install postgresql"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return os.path.dirname(found[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PostgresServer:
    """One PostgreSQL server in a directory of its own; ``stop`` / ``start`` again keep its
    data (for outage tests)."""

    def __init__(self) -> None:
        self.bin = _bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="modelpool-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.running = False
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        self._run(
            [
                f"{self.bin}/initdb",
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )
        self.start()

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, **self._as)
        assert done.returncode == 0, done.stdout + done.stderr

    def start(self) -> None:
        """``pg_ctl start``: the server detaches (it is not a child of the test process, whose
        leak checks count children) and answers before this returns."""
        options = (
            f"-p {self.port} -h 127.0.0.1 -k {self.dir} -c fsync=off -c full_page_writes=off "
            "-c synchronous_commit=off -c autovacuum=off -c max_connections=200"
        )
        self._run(
            [
                f"{self.bin}/pg_ctl",
                "start",
                "-D",
                str(self.data),
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "-l",
                str(self.dir / "server.log"),
            ]
        )
        self.running = True

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A new, empty database on this server; its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """A fast shutdown: connected clients are cut off."""
        if self.running:
            self._run([f"{self.bin}/pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w"])
        self.running = False

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
