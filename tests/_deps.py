"""Optional dependencies of the tests: skipped locally when missing, a failure in CI.

``CI=true`` (set by ``.ci/run``) turns every missing optional dependency into an error, so a
test can never pass CI by quietly skipping. Either way it is decided inside the tests (and
fixtures) that need the dependency: never at module level, where a missing module would stop
the collection of the whole suite.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from types import ModuleType
from typing import Any

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


class _Deferred(ModuleType):
    """A module imported on first use of one of its public names (see ``deferred_module``)."""

    def __init__(self, name: str, needs: tuple[str, ...]) -> None:
        super().__init__(name)
        self._needs = needs

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith(("__", "_pytest", "_fixture")):  # introspection (pytest collecting
            raise AttributeError(attr)  # a test module's globals): never an import, or a skip
        for need in self._needs:
            need_module(need)
        return getattr(importlib.import_module(self.__name__), attr)


def deferred_module(name: str, *needs: str) -> Any:
    """Module ``name``, imported when a test first uses it: a missing optional dependency then
    skips (or, in CI, fails) that test, instead of aborting the collection of the whole suite
    as an import or a ``need_module`` call at module level does. ``needs`` are the optional
    modules to check first, for a message that names them (default: ``name`` itself)."""
    return _Deferred(name, needs or (name,))


def need_installed(name: str) -> None:
    """Skip (locally) / fail (in CI) unless package ``name`` is installed, without importing
    it: for what a test imports only in a child process (KServe's protocol messages clash
    with tritonclient.grpc's in one process)."""
    if importlib.util.find_spec(name) is None:
        message = f"{MISSING} {name} is not installed; run: pip install -e '.[test]'"
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
