"""The failure table's reproducible rows, twice: broken with the plain tool, fine with modelpool.

The hazards are numbered as in HAZARDS.md (H1 ... H16). Every "without modelpool" half reproduces
the failure with the standard library (``multiprocessing``, ``concurrent.futures``) and every wait
in it is bounded. Anything that forks a process which may already run OpenMP, or that may leave
a wedged interpreter behind, runs in a fresh ``python -c`` subprocess in its own session, so the
test process itself never forks after OpenMP ran and everything it started can be killed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

import _hazard_models
import modelpool
from _deps import deferred_module, need_module
from _models import Crashy, Doubler, TorchModel, WhoAmI, started_then_wait
from _waiting import wait_for
from modelpool import _hygiene

torch = deferred_module("torch")  # optional: imported by the tests that use it
TESTS_DIR = Path(__file__).resolve().parent
RESULT = "RESULT "  # prefix of the one JSON line a script prints for the test to read


# --------------------------------------------------------------------------- helpers


def _child_env() -> dict[str, str]:
    """Environment for scripts: tests/ importable, no thread limits inherited from the caller."""
    env = {k: v for k, v in os.environ.items() if k not in _hygiene.THREAD_ENV_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    return env


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _popen(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_child_env(),
        cwd=TESTS_DIR,
        start_new_session=True,  # its own process group: one killpg cleans up everything
    )


def run_script(code: str, *args: str, timeout: float) -> tuple[Any, str]:
    """Run ``code`` in a fresh interpreter; return (its RESULT json, its stderr).

    The script, and whatever it left behind in its process group, is killed afterwards.
    """
    proc = _popen(code, *args)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"script ran past {timeout} s\n--- stdout\n{out}\n--- stderr\n{err}")
    finally:
        _kill_group(proc.pid)
    lines = [line for line in out.splitlines() if line.startswith(RESULT)]
    report = f"exit {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"
    assert proc.returncode == 0, report
    assert len(lines) == 1, report
    return json.loads(lines[0][len(RESULT) :]), err


def _read_pids(marker: Path) -> list[int]:
    try:
        text = marker.read_text()
    except FileNotFoundError:
        return []
    return [int(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def _wait_for_pids(marker: Path, count: int, proc: subprocess.Popen[str]) -> list[psutil.Process]:
    """Wait until ``count`` processes wrote their pid to ``marker`` (they are then loading)."""
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        pids = _read_pids(marker)
        if len(pids) >= count:
            return [psutil.Process(pid) for pid in pids]
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    _kill_group(proc.pid)
    out, err = proc.communicate()
    pytest.fail(f"workers did not start loading\n--- stdout\n{out}\n--- stderr\n{err}")


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still running (same pid *and* start time; zombies count as dead)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_dead(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    left = _alive(procs)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = _alive(left)
    return left


def _kill_all(procs: list[psutil.Process]) -> None:
    for p in _alive(procs):
        with contextlib.suppress(psutil.Error):
            p.kill()


@pytest.fixture
def torch_installed() -> None:
    """For the tests that run torch (here, in a script or in a worker): skipped, or in CI
    failed, when it is missing, as ``need_module`` does."""
    need_module("torch")


@pytest.fixture
def no_thread_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No thread limits exported by whoever runs the tests."""
    for name in _hygiene.THREAD_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def _draws_per_worker(pool: modelpool.Pool, workers: int) -> dict[int, dict[str, Any]]:
    """One request per worker: each stays busy for a while, so the next goes to another."""

    async def gather() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(pool.apredict(0.3) for _ in range(workers))))

    by_index = {d["index"]: d for d in asyncio.run(gather())}
    assert sorted(by_index) == list(range(workers)), "each request should hit its own worker"
    return by_index


# --------------------------------------------------------------------------- H1 OpenMP after fork

H1_FORK_AFTER_OPENMP = f"""
import json, multiprocessing, time
import torch, _hazard_models

torch.set_num_threads(2)
_hazard_models.matmul()  # OpenMP's thread team now exists in this process
ctx = multiprocessing.get_context("fork")
children = [ctx.Process(target=_hazard_models.matmul) for _ in range(3)]
for c in children:
    c.start()
deadline = time.monotonic() + 8.0  # a healthy child needs well under a second
for c in children:
    c.join(max(0.0, deadline - time.monotonic()))
hung = [c.pid for c in children if c.is_alive()]
for c in children:
    if c.is_alive():
        c.kill()
    c.join()
print({RESULT!r} + json.dumps({{"hung": len(hung), "exitcodes": [c.exitcode for c in children]}}))
"""

H1_MODELPOOL = f"""
import json
import torch, modelpool, _hazard_models

torch.set_num_threads(2)
_hazard_models.matmul()  # the same poisoned parent as in the plain-fork script
out = {{}}
with modelpool.Pool(_hazard_models.TorchMatmul, workers=1, threads_per_worker=2) as pool:
    answer = pool.predict(None, timeout=30)
    out["sum_ok"] = bool(answer["sum"] > 0)
    out["worker_threads"] = int(answer["threads"])
    out["start_method"] = pool.start_method
pool = modelpool.Pool(_hazard_models.TorchMatmul, start_method="fork")
try:
    pool.start()
    out["fork"] = "started"
except modelpool.UnsafeForkError as exc:
    out["fork"] = "refused: " + str(exc)
finally:
    pool.shutdown()
print({RESULT!r} + json.dumps(out))
"""


@pytest.mark.usefixtures("torch_installed")
def test_h1_plain_fork_after_openmp_hangs_the_children() -> None:
    """H1 without modelpool: after the parent ran a 2-thread torch matmul, children forked with
    ``multiprocessing``'s "fork" context hang in their own matmul (libgomp's team state is
    copied, its threads are not). Runs in a fresh interpreter; hung children are killed."""
    result, _ = run_script(H1_FORK_AFTER_OPENMP, timeout=40)
    assert result["hung"] >= 1, f"no forked child hung: {result}"
    # a hung child was killed by the script (-9); none of them failed in any other way
    assert set(result["exitcodes"]) <= {0, -signal.SIGKILL}


@pytest.mark.usefixtures("torch_installed")
def test_h1_modelpool_workers_run_openmp_and_fork_is_refused() -> None:
    """H1 with modelpool: in the same poisoned parent, a default pool (forkserver) runs a
    2-thread torch matmul in its worker and answers; ``start_method="fork"`` is refused at
    ``start()`` with ``UnsafeForkError`` naming the native threads. Runs in a fresh
    interpreter so the test process never holds an OpenMP team."""
    result, _ = run_script(H1_MODELPOOL, timeout=60)
    assert result["start_method"] == "forkserver"
    assert result["sum_ok"] is True
    assert result["worker_threads"] == 2  # the worker really ran OpenMP with 2 threads
    assert result["fork"].startswith("refused: start_method='fork' refused")
    assert "native thread" in result["fork"]


# --------------------------------------------------------------------------- H6 RNG streams

H6_FORK_DRAWS = f"""
import json, multiprocessing
import numpy, torch, _hazard_models

numpy.random.permutation(10)  # the parent uses NumPy's global RNG, e.g. to shuffle data
ctx = multiprocessing.get_context("fork")
queue = ctx.Queue()
children = [ctx.Process(target=_hazard_models.put_draws, args=(queue,)) for _ in range(3)]
for c in children:
    c.start()
draws = [queue.get(timeout=20) for _ in children]
for c in children:
    c.join(10)
print({RESULT!r} + json.dumps(draws))
"""


@pytest.mark.usefixtures("torch_installed")
def test_h6_plain_fork_children_draw_identical_numbers() -> None:
    """H6 without modelpool: forked children inherit the parent's NumPy and torch RNG state,
    so every "random" draw is the same in every child (``random`` alone is reseeded by
    CPython at fork). NumPy 2 creates its global state on first use, so the parent uses it
    once before forking, as any program that shuffled or sampled something has."""
    draws, _ = run_script(H6_FORK_DRAWS, timeout=40)
    assert len(draws) == 3
    assert len({d["pid"] for d in draws}) == 3
    assert len({d["numpy"] for d in draws}) == 1, draws
    assert len({d["torch"] for d in draws}) == 1, draws


@pytest.mark.usefixtures("torch_installed")
def test_h6_modelpool_workers_draw_distinct_reproducible_numbers() -> None:
    """H6 with modelpool: each worker's ``random``, NumPy and torch streams differ from the
    others', ``worker_info().seed`` differs per worker, and two pools with the same ``seed=``
    give the same draws worker for worker (a different seed gives different ones)."""
    with modelpool.Pool(_hazard_models.RngDraws, workers=3, seed=1234) as pool:
        first = _draws_per_worker(pool, 3)
    with modelpool.Pool(_hazard_models.RngDraws, workers=3, seed=1234) as pool:
        again = _draws_per_worker(pool, 3)
    with modelpool.Pool(_hazard_models.RngDraws, workers=3, seed=4321) as pool:
        other = _draws_per_worker(pool, 3)

    for key in ("seed", "random", "numpy", "torch"):
        assert len({first[i][key] for i in range(3)}) == 3, (key, first)
    for i in range(3):
        for key in ("seed", "random", "numpy", "torch"):
            assert again[i][key] == first[i][key], (i, key, first[i], again[i])
            assert other[i][key] != first[i][key], (i, key, first[i], other[i])


def _whoami_draws(seed: int) -> dict[str, Any]:
    with modelpool.Pool(WhoAmI, workers=1, seed=seed) as pool:
        out: dict[str, Any] = pool.predict("torch", timeout=60)
    out["seed"] = out["info"].seed
    return out


def _submitted_draws(seed: int) -> dict[str, Any]:
    with modelpool.Pool(workers=1, seed=seed) as pool:
        return pool.submit(_hazard_models.draws).result(timeout=60)


@pytest.mark.parametrize(
    "run", [_whoami_draws, _submitted_draws], ids=["model-imports-torch-in-predict", "submit"]
)
@pytest.mark.usefixtures("torch_installed")
def test_h6_torch_imported_after_setup_is_seeded_too(
    run: Callable[[int], dict[str, Any]],
) -> None:
    """H6 with modelpool: torch imported only after the worker loaded (inside ``predict``, as
    ``WhoAmI`` does, or by a submitted function) still gets a reproducible stream from
    ``seed=``, as ``random`` and NumPy do."""
    first, again = run(77), run(77)
    assert first["seed"] == again["seed"]
    assert first["numpy"] == again["numpy"]
    assert first["random"] == again["random"]
    assert first["torch"] == again["torch"], "torch was not seeded from seed="


# --------------------------------------------------------------------------- H7 read-only arrays

H7_READ_ONLY = f"""
import json, warnings
import numpy as np, torch

raw = np.arange(8, dtype=np.float32).tobytes()  # e.g. the body of a request
before = raw.hex()
a = np.frombuffer(raw, dtype=np.float32)  # what tritonclient's as_numpy returns
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    t = torch.from_numpy(a)
t.add_(1)  # torch tensors are always writable: this writes into an immutable bytes object
print({RESULT!r} + json.dumps({{
    "writeable": bool(a.flags.writeable),
    "warnings": [str(w.message) for w in caught],
    "bytes_changed": raw.hex() != before,
}}))
"""


@pytest.mark.usefixtures("torch_installed")
def test_h7_plain_read_only_array_warns_and_mutates_bytes() -> None:
    """H7 without modelpool: ``torch.from_numpy(np.frombuffer(bytes))`` warns that the array is
    not writable, and an in-place op then changes an immutable ``bytes`` object. Runs in a
    fresh interpreter because torch emits this warning only once per process."""
    result, _ = run_script(H7_READ_ONLY, timeout=40)
    assert result["writeable"] is False
    assert any("not writable" in m or "non-writable" in m for m in result["warnings"]), result
    assert result["bytes_changed"] is True


def _read_only_input() -> tuple[bytes, np.ndarray]:
    raw = np.arange(8, dtype=np.float32).tobytes()
    x = np.frombuffer(raw, dtype=np.float32).reshape(2, 4)
    assert not x.flags.writeable
    return raw, x


def _assert_safe_for_torch(arr: np.ndarray) -> None:
    """Writable, and ``torch.from_numpy`` plus an in-place op on it raise no warning."""
    assert arr.flags.writeable
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = torch.from_numpy(arr)
        t.add_(1)  # in place, into memory the caller owns
    assert not [str(w.message) for w in caught], "torch warned about the array"


@pytest.mark.usefixtures("torch_installed")
def test_h7_modelpool_read_only_input_arrives_writable_in_the_worker() -> None:
    """H7 with modelpool: a read-only input (``np.frombuffer``, as tritonclient's ``as_numpy``
    returns) arrives writable in the worker, where ``torch.from_numpy`` and an in-place add
    raise no warning (observed in the worker, a fresh process where torch has not warned yet);
    the caller's bytes stay untouched."""
    raw, x = _read_only_input()
    with modelpool.Pool(workers=1) as pool:
        report = pool.submit(_hazard_models.torch_from_numpy_report, x).result(timeout=30)
    assert report["writeable"] is True
    assert report["warnings"] == []
    np.testing.assert_array_equal(report["result"], x + 1)
    assert raw == np.arange(8, dtype=np.float32).tobytes()  # the worker changed its own copy


@pytest.mark.usefixtures("torch_installed")
def test_h7_modelpool_predict_outputs_are_writable_for_torch() -> None:
    """H7 with modelpool: a torch model (in-place add on ``torch.from_numpy`` of its input) fed
    a read-only array answers, leaves the caller's bytes untouched, and its outputs reach the
    caller writable and safe for ``torch.from_numpy``."""
    raw, x = _read_only_input()
    with modelpool.Pool(TorchModel) as pool:
        out = pool.predict({"x": x}, timeout=30)
    assert out["y"].shape == (2, 2)
    assert raw == np.arange(8, dtype=np.float32).tobytes()
    _assert_safe_for_torch(out["y"])


@pytest.mark.usefixtures("torch_installed")
def test_h7_modelpool_read_only_result_arrives_writable() -> None:
    """H7 with modelpool: an array that is read-only in the worker (here ``np.frombuffer``)
    reaches the caller writable and safe for ``torch.from_numpy``."""
    with modelpool.Pool(workers=1) as pool:
        arr = pool.submit(_hazard_models.read_only_array).result(timeout=30)
    np.testing.assert_array_equal(arr, np.arange(4, dtype=np.float32))
    _assert_safe_for_torch(arr)


# --------------------------------------------------------------------------- H8 pickling


def _make_closure(k: int) -> Callable[[int], int]:
    def add_k(x: int) -> int:
        return x + k

    return add_k


NOT_IMPORTABLE = [
    pytest.param(_hazard_models.add, (1, 2), 3, id="decorator-without-wraps"),
    pytest.param(lambda x: x + 1, (1,), 2, id="lambda"),
    pytest.param(_make_closure(10), (1,), 11, id="closure"),
]


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
@pytest.mark.parametrize(("fn", "args", "expected"), NOT_IMPORTABLE)
def test_h8_plain_executor_cannot_pickle_local_functions(
    method: str, fn: Callable[..., Any], args: tuple[Any, ...], expected: Any
) -> None:
    """H8 without modelpool: ``ProcessPoolExecutor`` pickles functions by module and
    ``__qualname__``, so a decorator without ``functools.wraps``, a lambda and a closure all
    fail with "Can't pickle"."""
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(method)) as ex:
        future = ex.submit(fn, *args)
        with pytest.raises((AttributeError, pickle.PicklingError), match="Can't pickle"):
            future.result(timeout=20)


@pytest.mark.parametrize(("fn", "args", "expected"), NOT_IMPORTABLE)
def test_h8_modelpool_sends_local_functions_by_value(
    fn: Callable[..., Any], args: tuple[Any, ...], expected: Any
) -> None:
    """H8 with modelpool: the same three callables run in a worker (sent by value with
    cloudpickle, since workers cannot import them by name)."""
    with modelpool.Pool(workers=1) as pool:
        assert pool.submit(fn, *args).result(timeout=30) == expected


# --------------------------------------------------------------------------- H9 python -c

H9_PLAIN = f"""
import concurrent.futures as cf, json, multiprocessing

def double(x):
    return 2 * x

with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
    try:
        out = {{"result": ex.submit(double, 21).result(timeout=20)}}
    except Exception as exc:
        out = {{"error": type(exc).__name__}}
print({RESULT!r} + json.dumps(out))
"""

H9_MODELPOOL = f"""
import json, modelpool

def double(x):
    return 2 * x

out = {{}}
for method in ("spawn", "forkserver"):
    with modelpool.Pool(workers=1, start_method=method) as pool:
        out[method] = pool.submit(double, 21).result(timeout=30)
print({RESULT!r} + json.dumps(out))
"""


def test_h9_plain_spawn_cannot_run_function_from_python_c() -> None:
    """H9 without modelpool: a function defined in ``python -c`` cannot be imported by a
    spawned worker (``__main__`` has no file), so the executor's worker dies unpickling the
    call and the pool breaks."""
    result, err = run_script(H9_PLAIN, timeout=40)
    assert result == {"error": "BrokenProcessPool"}
    assert "Can't get attribute 'double' on <module '__main__'" in err


def test_h9_modelpool_runs_function_from_python_c() -> None:
    """H9 with modelpool: the same function from ``python -c`` runs under spawn and
    forkserver workers (sent by value)."""
    result, _ = run_script(H9_MODELPOOL, timeout=60)
    assert result == {"spawn": 42, "forkserver": 42}


# --------------------------------------------------------------------------- H10 one crash


@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_h10_plain_executor_breaks_for_good_after_one_crash(how: str) -> None:
    """H10 without modelpool: one task that kills its process breaks ``ProcessPoolExecutor``:
    the crashing task, an innocent task in flight beside it and every later submit all get
    ``BrokenProcessPool``."""
    ctx = multiprocessing.get_context("forkserver")
    with cf.ProcessPoolExecutor(2, mp_context=ctx) as ex:
        # Start both workers and let the executor's manager thread see both of them first: it
        # may otherwise miss the death of a worker spawned after it last looked (a CPython race
        # that only delays the breakage until the innocent task is done).
        assert list(ex.map(_hazard_models.sleep_then, ["warm"] * 2, [0.5] * 2)) == ["warm"] * 2
        innocent = ex.submit(_hazard_models.sleep_then, "innocent", 5.0)
        crash = ex.submit(_hazard_models.die, how)
        with pytest.raises(BrokenProcessPool):
            crash.result(timeout=20)
        with pytest.raises(BrokenProcessPool):
            innocent.result(timeout=20)
        with pytest.raises(BrokenProcessPool):
            ex.submit(_hazard_models.sleep_then, "later", 0.0).result(timeout=20)


@pytest.mark.parametrize(
    ("how", "signal_name", "exitcode"),
    [
        ("sigkill", "SIGKILL", -signal.SIGKILL),
        ("sigsegv", "SIGSEGV", -signal.SIGSEGV),
        ("exit", None, 7),
    ],
)
def test_h10_modelpool_fails_only_the_crashing_request(
    how: str, signal_name: str | None, exitcode: int, tmp_path: Path
) -> None:
    """H10 with modelpool: only the request whose worker died fails, with a
    ``WorkerCrashedError`` that names the exit; an innocent request running in the other
    worker at the same time succeeds, the dead worker is replaced and later requests succeed."""
    started, gate = tmp_path / "started", tmp_path / "gate"
    with modelpool.Pool(Crashy, workers=2) as pool:
        innocent = pool.submit(started_then_wait, str(started), str(gate))
        wait_for(started.exists, 60, "the innocent request to run")
        with pytest.raises(modelpool.WorkerCrashedError) as info:
            pool.predict({"die": how}, timeout=60)
        assert info.value.signal_name == signal_name
        assert info.value.exitcode == exitcode
        assert not innocent.done()  # it was running beside the crash, and still is
        gate.touch()
        assert innocent.result(timeout=60) == int(started.read_text())  # where it started
        later = [pool.predict({"x": np.array(i)}, timeout=60) for i in range(4)]
        assert all(isinstance(out["pid"], int) for out in later)
        assert pool.submit(_hazard_models.sleep_then, "later", 0.0).result(timeout=60) == "later"
        # the other worker may have served all of those before the replacement started
        deadline = time.monotonic() + 60
        while sorted(w.restarts for w in pool.stats().workers) != [0, 1]:
            assert time.monotonic() < deadline, pool.stats()
            time.sleep(0.02)


# --------------------------------------------------------------------------- H11 map hangs


def test_h11_plain_pool_map_hangs_when_a_worker_is_killed() -> None:
    """H11 without modelpool: ``multiprocessing.Pool`` replaces a killed worker but loses its
    task, so ``map`` never returns; a bounded ``get`` shows the hang, then the pool is
    terminated."""
    pool = multiprocessing.get_context("forkserver").Pool(2)
    try:
        result = pool.map_async(_hazard_models.echo_or_die, ["a", "die", "b", "c"], chunksize=1)
        with pytest.raises(multiprocessing.TimeoutError):
            result.get(timeout=5)
    finally:
        pool.terminate()
        pool.join()


def test_h11_modelpool_fails_the_killed_workers_request_promptly() -> None:
    """H11 with modelpool: the same map-like batch returns: the item whose worker was killed
    fails with ``WorkerCrashedError`` (not a timeout), every other item succeeds."""
    with modelpool.Pool(workers=2) as pool:
        futures = [pool.submit(_hazard_models.echo_or_die, x) for x in ["a", "die", "b", "c"]]
        t0 = time.monotonic()
        with pytest.raises(modelpool.WorkerCrashedError) as info:
            futures[1].result(timeout=30)
        assert time.monotonic() - t0 < 30  # the plain pool's map never returns at all
        assert info.value.signal_name == "SIGKILL"
        assert [futures[i].result(timeout=60) for i in (0, 2, 3)] == ["a", "b", "c"]
        with pytest.raises(modelpool.WorkerCrashedError):
            list(pool.map(_hazard_models.echo_or_die, ["x", "die"], timeout=60))


# --------------------------------------------------------------------------- H13 unpicklable error

H13_PLAIN_POOL = f"""
import json, multiprocessing, psutil, _hazard_models

pool = multiprocessing.get_context("forkserver").Pool(1)
out = {{}}
try:
    pool.apply_async(_hazard_models.raise_unpicklable).get(timeout=3)
    out["get"] = "returned"
except multiprocessing.TimeoutError:
    out["get"] = "hung"
except Exception as exc:
    out["get"] = type(exc).__name__
try:
    pool.terminate()
    out["terminate"] = "ok"
except BaseException as exc:
    out["terminate"] = type(exc).__name__
for child in psutil.Process().children(recursive=True):  # the pool cannot clean up itself
    try:
        child.kill()
    except psutil.NoSuchProcess:  # exited between the listing and the kill
        pass
print({RESULT!r} + json.dumps(out), flush=True)
"""


def test_h13_plain_pool_hangs_on_exception_that_cannot_be_unpickled() -> None:
    """H13 without modelpool: a worker raises an exception that pickles but cannot be
    unpickled; ``multiprocessing.Pool``'s result thread dies unpickling it, so ``get`` hangs
    (bounded here to 3 s). Runs in a fresh interpreter: the pool is wrecked afterwards."""
    result, err = run_script(H13_PLAIN_POOL, timeout=40)
    assert result["get"] == "hung"
    assert "_handle_results" in err
    assert "missing 1 required positional argument" in err


def test_h13_plain_executor_breaks_on_exception_that_cannot_be_unpickled() -> None:
    """H13 without modelpool: the same exception breaks ``ProcessPoolExecutor`` for good."""
    ctx = multiprocessing.get_context("forkserver")
    with cf.ProcessPoolExecutor(1, mp_context=ctx) as ex:
        with pytest.raises(BrokenProcessPool):
            ex.submit(_hazard_models.raise_unpicklable).result(timeout=20)
        with pytest.raises(BrokenProcessPool):
            ex.submit(_hazard_models.sleep_then, "later", 0.0).result(timeout=20)


def test_h13_modelpool_sends_remote_error_and_keeps_serving() -> None:
    """H13 with modelpool: the exception arrives as ``RemoteError`` with its type name,
    message and traceback, and the pool keeps serving."""
    with modelpool.Pool(workers=1) as pool:
        with pytest.raises(modelpool.RemoteError) as info:
            pool.submit(_hazard_models.raise_unpicklable).result(timeout=20)
        assert info.value.type_name == "_models.Unpicklable"
        assert info.value.remote_message == "1-2"
        assert "raise_unpicklable" in info.value.remote_traceback
        assert pool.submit(_hazard_models.sleep_then, "later", 0.0).result(timeout=20) == "later"


# --------------------------------------------------------------------------- H14 signals in load

H14_MODELPOOL = """
import sys, modelpool

pool = modelpool.Pool(
    "_models:SlowSetup", workers=2, options={"seconds": 30, "marker": sys.argv[1]}
)
try:
    pool.start()
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
    raise SystemExit(130)
print("started", flush=True)
"""

H14_PLAIN_EXECUTOR = """
import sys, multiprocessing, concurrent.futures as cf, _hazard_models

ex = cf.ProcessPoolExecutor(
    2,
    mp_context=multiprocessing.get_context("spawn"),
    initializer=_hazard_models.slow_init,
    initargs=(sys.argv[1], 30),
)
futures = [ex.submit(_hazard_models.sleep_then, i, 0.0) for i in range(2)]
print([f.result() for f in futures])
"""


@contextlib.contextmanager
def _loading_script(code: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Any]]:
    """Start ``code`` with a marker path; yield it and its two loading workers; kill all after."""
    marker = tmp_path / "loading.pids"
    proc = _popen(code, str(marker))
    workers: list[psutil.Process] = []
    try:
        workers = _wait_for_pids(marker, 2, proc)
        yield proc, workers
    finally:
        _kill_all(workers)
        _kill_group(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)


def test_h14_modelpool_ctrl_c_during_load_exits_and_reaps(tmp_path: Path) -> None:
    """H14 with modelpool: SIGINT to a script whose pool is loading (setup() sleeps 30 s)
    makes ``start()`` raise ``KeyboardInterrupt`` promptly, and no worker is left alive."""
    with _loading_script(H14_MODELPOOL, tmp_path) as (proc, workers):
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=20)  # "promptly": setup() would take 30 s
        assert proc.returncode == 130, (out, err)
        assert "KeyboardInterrupt" in out
        # reaped before the script exits; 10 s of slack is still far below their 30 s setup()
        assert not _wait_dead(workers, 10.0), "workers outlived the interrupted script"


def test_h14_modelpool_workers_die_with_a_killed_parent(tmp_path: Path) -> None:
    """H14 with modelpool: SIGKILL to the script (no cleanup code runs) while its pool is
    loading: the workers notice their parent is gone and exit by themselves within seconds."""
    with _loading_script(H14_MODELPOOL, tmp_path) as (proc, workers):
        proc.kill()
        proc.wait(timeout=10)  # not communicate(): orphans may hold its pipes
        # within seconds; 15 s of slack is still half of their 30 s setup()
        assert not _wait_dead(workers, 15.0), "workers outlived their killed parent"


def test_h14_plain_executor_workers_outlive_a_killed_parent(tmp_path: Path) -> None:
    """H14 without modelpool: SIGKILL to a script whose ``ProcessPoolExecutor`` is still in
    its (slow) initializer leaves both workers running as orphans; the test kills them."""
    with _loading_script(H14_PLAIN_EXECUTOR, tmp_path) as (proc, workers):
        proc.kill()
        proc.wait(timeout=10)  # not communicate(): orphans may hold its pipes
        time.sleep(3.0)
        assert len(_alive(workers)) == 2, "expected orphaned executor workers"


# --------------------------------------------------------------------------- H16 oversubscription


def _cores() -> int:
    cores = _hygiene.usable_cores()
    if cores < 2:
        pytest.skip("one usable core: there is nothing to oversubscribe")
    return cores


@pytest.mark.usefixtures("no_thread_env", "torch_installed")
def test_h16_plain_spawn_child_uses_every_core() -> None:
    """H16 without modelpool: a plain spawned child's torch uses all cores, whatever number of
    sibling workers run beside it (so N workers oversubscribe the machine N times)."""
    cores = _cores()
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        threads = ex.submit(_hazard_models.torch_threads).result(timeout=60)
    assert threads in {os.cpu_count(), psutil.cpu_count(logical=False)}
    assert threads > cores // 2


@pytest.mark.usefixtures("no_thread_env", "torch_installed")
def test_h16_modelpool_default_budget_is_cores_per_worker() -> None:
    """H16 with modelpool: by default each of 2 workers gets usable cores // 2 threads: the
    environment (OMP/MKL/OpenBLAS), every BLAS/OpenMP pool threadpoolctl sees and torch."""
    expected = max(1, _cores() // 2)
    with modelpool.Pool(WhoAmI, workers=2) as pool:
        who = pool.predict("torch", timeout=60)
        report = pool.submit(_hazard_models.thread_report).result(timeout=60)
        assert pool.threads_per_worker == expected
    assert who["info"].threads == expected
    assert who["env"] == dict.fromkeys(who["env"], str(expected))
    assert who["torch_threads"] == expected
    assert report["env"] == dict.fromkeys(report["env"], str(expected))
    assert report["torch_threads"] == expected
    assert report["pools"], "threadpoolctl found no BLAS/OpenMP pool"
    assert {n for _, _, n in report["pools"]} == {expected}, report["pools"]


@pytest.mark.usefixtures("no_thread_env", "torch_installed")
def test_h16_modelpool_explicit_threads_per_worker_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """H16 with modelpool: an explicit ``threads_per_worker`` beats both the default and an
    exported ``OMP_NUM_THREADS``."""
    explicit = max(1, _cores() // 2) + 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(explicit + 1))
    with modelpool.Pool(workers=2, threads_per_worker=explicit) as pool:
        report = pool.submit(_hazard_models.thread_report).result(timeout=60)
    assert report["budget"] == explicit
    assert report["env"] == dict.fromkeys(report["env"], str(explicit))
    assert report["torch_threads"] == explicit
    assert {n for _, _, n in report["pools"]} == {explicit}, report["pools"]


@pytest.mark.usefixtures("no_thread_env", "torch_installed")
def test_h16_modelpool_exported_omp_num_threads_wins_over_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """H16 with modelpool: an ``OMP_NUM_THREADS`` the user exported before creating the pool
    beats the cores // workers default, in the worker's environment and its thread pools.
    The fork server is started first, as it is in any program that already used a pool."""
    exported = max(1, _cores() // 2) + 1
    forkserver.ensure_running()
    monkeypatch.setenv("OMP_NUM_THREADS", str(exported))
    with modelpool.Pool(workers=2) as pool:
        report = pool.submit(_hazard_models.thread_report).result(timeout=60)
    assert report["budget"] == exported
    assert report["env"]["OMP_NUM_THREADS"] == str(exported), report["env"]
    assert report["torch_threads"] == exported
    assert {n for _, _, n in report["pools"]} == {exported}, report["pools"]


@pytest.mark.usefixtures("no_thread_env")
def test_h16_plain_spawn_child_opencv_uses_every_core() -> None:
    """H16 without modelpool, OpenCV: it reads none of the thread variables, so even a child
    with ``OMP_NUM_THREADS=1`` gets a pool of all the machine's cores."""
    need_module("cv2")
    _cores()
    code = f"""
    import json, os
    os.environ["OMP_NUM_THREADS"] = "1"
    import cv2
    print({RESULT!r} + json.dumps(cv2.getNumThreads()))
    """
    threads, _ = run_script(code, timeout=60)
    assert threads > 1


@pytest.mark.usefixtures("no_thread_env")
@pytest.mark.parametrize("model", [None, Doubler], ids=["function-pool", "model-pool"])
def test_h16_modelpool_opencv_imported_late_keeps_the_budget(model: type | None) -> None:
    """H16 with modelpool: OpenCV imported only inside a submitted function (after the worker
    loaded, so no limit applied at start can reach it) still runs with the worker's budget."""
    need_module("cv2")
    _cores()
    with modelpool.Pool(model, workers=1, threads_per_worker=1) as pool:
        report = pool.submit(_hazard_models.cv2_threads).result(timeout=60)
    assert not report["loaded_before"], "cv2 must be imported late for this test to mean much"
    assert report["threads"] == 1
