"""Running ``modelpool doctor`` as a user would, and reading its ``--json`` answer."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from _cli import ENV, TESTS


def run_doctor(
    *args: str,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    prefix: tuple[str, ...] = (),
) -> tuple[int, dict[str, Any]]:
    """``modelpool doctor ARGS --json`` (under ``prefix``, e.g. ``unshare``): exit status and
    the report."""
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "modelpool.cli", "doctor", *args, "--json"],
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
        cwd=str(TESTS),
        preexec_fn=preexec_fn,
        timeout=240,
    )
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"doctor printed no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
        ) from None
    assert report["exit_code"] == done.returncode, report
    return done.returncode, report


def findings(report: dict[str, Any], check: str) -> list[dict[str, Any]]:
    return [f for f in report["findings"] if f["check"] == check]


def levels(report: dict[str, Any], check: str) -> set[str]:
    return {f["level"] for f in findings(report, check)}
