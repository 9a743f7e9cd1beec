"""Running a short Python script in a fresh interpreter and reading the one result it prints.

For what must not happen in the test process: forking after OpenCV or OpenMP started their
threads, a process-wide "warn once", anything that may wedge. The script runs in its own
session with tests/ importable and no thread limits inherited from the caller; everything it
left behind in its process group is killed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from modelpool import _hygiene

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
#: prefix of the one JSON line a script prints for the test to read
RESULT = "RESULT "


def child_env() -> dict[str, str]:
    """The environment for scripts: tests/ importable, no exported thread limits."""
    env = {k: v for k, v in os.environ.items() if k not in _hygiene.THREAD_ENV_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return env


def run_python(args: list[str], *, timeout: float, cwd: Path = TESTS) -> tuple[str, str]:
    """Run ``python ARGS``; return its (stdout, stderr), failing unless it exits 0 in time."""
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=cwd,
        start_new_session=True,  # its own process group: one killpg cleans up everything
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"python {args[0]} ran past {timeout} s\n--- stdout\n{out}\n--- stderr\n{err}")
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"
    return out, err


def run_script(code: str, *args: str, timeout: float) -> Any:
    """Run ``code`` (dedented) in a fresh interpreter; return the JSON it printed after
    ``RESULT``."""
    out, err = run_python(["-c", textwrap.dedent(code), *args], timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith(RESULT)]
    assert len(lines) == 1, f"--- stdout\n{out}\n--- stderr\n{err}"
    return json.loads(lines[0][len(RESULT) :])
