from __future__ import annotations

import collections
import os
import signal
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from _deps import MISSING
from _postgres import PostgresServer

# Children that the standard library keeps for the life of the test process: the forkserver
# and the resource tracker. They are not the pool's workers and are excluded from leak checks.
_STDLIB_HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")


def pool_children() -> list[psutil.Process]:
    """Live (non-zombie counts too) descendants of this process, minus stdlib helpers."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            cmd = ""
        except psutil.AccessDenied:
            cmd = ""
        if any(h in cmd for h in _STDLIB_HELPERS):
            continue
        out.append(child)
    return out


def wait_no_children(
    timeout: float = 10.0, ignore: frozenset[int] = frozenset()
) -> list[psutil.Process]:
    """Wait until no child is left but those in ``ignore`` (e.g. a module's server)."""
    deadline = time.monotonic() + timeout
    left = [p for p in pool_children() if p.pid not in ignore]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in pool_children() if p.is_running() and p.pid not in ignore]
    return left


def pytest_configure(config: pytest.Config) -> None:
    """Tests send Ctrl+C (SIGINT) to the programs they start. A child inherits an ignored
    SIGINT, and a test process may have one: a shell starts background jobs with SIGINT ignored
    (`pytest &` in a script), and so may a parallel runner. Restore the default here, so that
    what the tests check is modelpool's handling of Ctrl+C, not how the suite was launched."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Coverage's `patch = _exit` (pyproject.toml) replaces os._exit with a function that saves
    the coverage data first; pytest-cov starts coverage in this hook, so it is patched by now.
    Tests hand os._exit itself to workers (`pool.submit(os._exit, 3)`), and the pool sends a
    function by name when it can: name the replacement as what it stands for, so that it still
    goes as `os._exit` (which the worker looks up as its own) and the tests see the real one's
    behaviour, not an unpicklable closure."""
    if isinstance(os._exit, types.FunctionType):  # the real one is a builtin
        os._exit.__module__ = "os"
        os._exit.__qualname__ = os._exit.__name__ = "_exit"


@pytest.fixture(autouse=True)
def no_leaked_children() -> Iterator[None]:
    """Every test must leave no worker process (alive or zombie) behind."""
    before = frozenset(p.pid for p in pool_children())
    yield
    left = wait_no_children(ignore=before)
    assert not left, f"leaked child processes: {[(p.pid, p.status()) for p in left]}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say loudly, at the very end, which tests did not run for want of a dependency."""
    reasons: collections.Counter[str] = collections.Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        if reason.startswith(MISSING):
            reasons[reason.removeprefix(MISSING).strip()] += 1
    if not reasons:
        return
    total = sum(reasons.values())
    terminalreporter.section(f"{total} TESTS SKIPPED: MISSING DEPENDENCIES", sep="!", red=True)
    for reason, count in reasons.most_common():
        terminalreporter.write_line(f"{count:4d} skipped: {reason}", red=True, bold=True)
    terminalreporter.write_line(
        "Install them to run the whole suite (CI=true makes each one a failure instead). System "
        "packages: apt-get install chromium chromium-driver redis-server tini",
        red=True,
    )


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of this run shared by its parallel workers (pytest-xdist gives each worker its
    own base folder inside one folder of the run), for files made once per run under a lock
    (e.g. ``_tf_models.saved_keras``)."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (``_postgres``)."""
    server = PostgresServer()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A new, empty user and key database: a SQLite file, or a database on the session's
    PostgreSQL server; a test taking it runs on both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'modelpool.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database()
