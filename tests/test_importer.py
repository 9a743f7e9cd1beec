"""Import strings and how callables reach a worker (``_importer``): by reference when a fresh
process can import them, by value otherwise (lambdas, closures, decorated functions, a
script read from stdin), and a ModelSpecError saying what to change when neither works."""

from __future__ import annotations

import functools
import os
import threading

import pytest

import modelpool


def test_class_defined_in_a_function_is_refused() -> None:
    class Local(modelpool.Model):
        def predict(self, inputs: object) -> object:
            return inputs

    with pytest.raises(modelpool.ModelSpecError, match="defined inside a function"):
        modelpool.Pool(Local)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("_models", "must have the form"),
        ("no_such_module_xyz:Model", "no module named 'no_such_module_xyz'"),
        ("_models:NoSuchModel", "has no attribute 'NoSuchModel'"),
        ("_models:_die", "not a class"),
        ("modelpool:Model", "no predict"),
    ],
)
def test_bad_import_strings(spec: str, match: str) -> None:
    with pytest.raises(modelpool.ModelSpecError, match=match):
        modelpool.Pool(spec)


def _add(x: int, y: int) -> int:
    return x + y


def _undecorated(fn):  # type: ignore[no-untyped-def]
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]  # no functools.wraps
        return fn(*args, **kwargs) + 1

    return wrapper


@_undecorated
def _decorated(x: int) -> int:
    return x * 10


def test_functions_that_cannot_be_imported_go_by_value() -> None:
    offset = 5

    def closure(x: int) -> int:
        return x + offset

    with modelpool.Pool(workers=1) as pool:
        assert pool.submit(_decorated, 2).result() == 21
        assert pool.submit(lambda x: x * 3, 4).result() == 12
        assert pool.submit(closure, 1).result() == 6
        assert pool.submit(functools.partial(_add, 1), 2).result() == 3
        assert list(pool.map(lambda x: -x, range(4), chunksize=2)) == [0, -1, -2, -3]


def test_function_that_cannot_travel_names_itself() -> None:
    lock = threading.Lock()

    def uses_lock() -> bool:
        return lock.locked()

    with modelpool.Pool(workers=1) as pool:
        with pytest.raises(modelpool.ModelSpecError, match="uses_lock") as info:
            pool.submit(uses_lock)
        assert "top level of a module" in str(info.value)


def test_closures_are_pickled_with_their_current_state() -> None:
    state = {"n": 1}

    def read() -> int:
        return state["n"]

    with modelpool.Pool(workers=1) as pool:
        assert pool.submit(read).result() == 1
        state["n"] = 11
        assert pool.submit(read).result() == 11


def test_script_read_from_stdin_can_use_a_pool() -> None:
    """H9 variant: ``python - < script.py`` has ``__main__.__file__ == '<stdin>'``, which
    multiprocessing would try to re-run in every worker (FileNotFoundError)."""
    import subprocess
    import sys

    script = (
        "import modelpool\n"
        "def double(x):\n"
        "    return 2 * x\n"
        "with modelpool.Pool(workers=2) as pool:\n"
        "    print(list(pool.map(double, range(4))), pool.submit(lambda: 7).result())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-"], input=script, capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, 2, 4, 6] 7"
