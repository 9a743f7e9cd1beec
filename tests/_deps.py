"""Optional dependencies of the tests: skipped locally when missing, a failure in CI.

``CI=true`` (set by ``.ci/run``) turns every missing optional dependency into an error, so a
test can never pass CI by quietly skipping.
"""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
#: Every skip for a missing dependency starts with this (tests/conftest.py counts them and
#: prints a loud summary at the end of the run).
MISSING = "missing dependency:"


def need_module(name: str) -> ModuleType:
    """Import ``name``, or skip (locally) / fail (in CI) saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        message = f"{MISSING} {name} is not installed ({exc}); run: pip install -e '.[test]'"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def need_program(name: str, package: str) -> str:
    """The path of program ``name``, or skip (locally) / fail (in CI) naming its package."""
    path = shutil.which(name)
    if path is None:
        message = (
            f"{MISSING} {name} is not on PATH; install Debian's {package} "
            f"(apt-get install {package})"
        )
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path
