"""Running the ``modelpool`` command as a user would, from the tests' folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
#: the tests' model modules importable by the command, as they are by the tests
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS / "server")])}


def modelpool_command(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    """``python -m modelpool.cli ARGS`` with output captured as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "modelpool.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        cwd=str(TESTS),
        **kwargs,  # type: ignore[call-overload]
    )
