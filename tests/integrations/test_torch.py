"""PyTorch DataLoader workers with modelpool's hygiene (``integrations/torch``): each failure
reproduced with a plain ``DataLoader`` (num_workers=2, the default "fork" context on Linux),
then prevented by one argument, ``worker_init_fn=worker_init_fn``.

What torch 2.13's loader already does in each worker: ``random``, NumPy's global RNG and torch
seeded from its base seed (distinct per worker and per epoch), torch's intra-op threads set to
1. What it does not: generators the dataset holds (reseeded by ``worker_init_fn``), OpenCV's
and the BLAS pools' sizes (the thread budget). Every loader runs in a fresh interpreter
(``_scripts``): the test process never forks after OpenCV or OpenMP started threads.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from typing import Any

import pytest

from _deps import deferred_module, need_module
from _scripts import RESULT, ROOT, child_env, run_python, run_script
from modelpool import _hygiene

mp_torch = deferred_module("modelpool.integrations.torch", "torch")

GLOBAL = ("numpy", "random", "torch")
HELD = ("held_numpy", "held_random", "held_torch", "transform")

RNG_SCRIPT = f"""
import json, multiprocessing, sys
import numpy as np, torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
import _torch_cv_models as m
from modelpool.integrations.torch import worker_init_fn

init = worker_init_fn if sys.argv[1] == "fixed" else None


class Shards(IterableDataset):
    # shares out a permutation drawn in each worker from the generator it holds: each worker
    # must draw the same one
    def __init__(self):
        self.rng = np.random.default_rng(0)

    def __iter__(self):
        info = get_worker_info()
        return iter(self.rng.permutation(8)[info.id :: info.num_workers].tolist())


def epochs(seed, generator=False):
    options = {{}}
    if generator:
        options["generator"] = torch.Generator().manual_seed(seed)
    else:
        torch.manual_seed(seed)
    loader = DataLoader(
        m.Draws(8), batch_size=None, num_workers=2, timeout=30, worker_init_fn=init, **options
    )
    return [list(loader) for _ in range(2)]


out = {{"start_method": multiprocessing.get_start_method(), "first": epochs(0)}}
if init is not None:
    out["again"] = epochs(0)
    out["generator"] = epochs(5, generator=True)
    out["generator_again"] = epochs(5, generator=True)
    shards = DataLoader(Shards(), batch_size=None, num_workers=2, timeout=30,
                        worker_init_fn=init)
    out["shards"] = list(shards)
print({RESULT!r} + json.dumps(out))
"""


def _by_worker(epoch: list[dict[str, Any]], key: str) -> dict[int, list[float]]:
    """``key``'s draws, per worker, in the order that worker drew them."""
    out: dict[int, list[float]] = {}
    for row in sorted(epoch, key=lambda r: r["index"]):
        out.setdefault(row["worker"], []).append(row[key])
    assert sorted(out) == [0, 1], "both workers should have loaded items"
    return out


def _values(epoch: list[dict[str, Any]], key: str) -> list[float]:
    return [row[key] for row in sorted(epoch, key=lambda r: r["index"])]


def test_plain_dataloader_workers_repeat_the_datasets_generators() -> None:
    """Control: torch 2.13 seeds the global ``random``, NumPy and torch RNGs per worker (all
    8 draws of an epoch differ, and the next epoch's too), but a generator the dataset made
    in ``__init__`` is copied into each worker in the same state: both workers draw the same
    sequence from it, and the next epoch (new workers, copied again) repeats it."""
    need_module("torch")
    result = run_script(RNG_SCRIPT, "plain", timeout=90)
    assert result["start_method"] == "fork"
    first, second = result["first"]
    for key in GLOBAL:
        assert len(set(_values(first, key))) == 8, (key, first)
        assert not set(_values(first, key)) & set(_values(second, key)), key
    for key in HELD:
        streams = _by_worker(first, key)
        assert streams[0] == streams[1], f"{key}: workers drew different numbers: {streams}"
        assert len(set(streams[0])) == 4  # a real stream, repeated: not a constant
        assert _by_worker(second, key) == streams, f"{key}: the next epoch drew new numbers"


def test_worker_init_fn_gives_distinct_reproducible_streams() -> None:
    """Fixed: with ``worker_init_fn``, every RNG, the dataset's own generators included, draws
    8 distinct numbers per epoch and new ones the next epoch; the same ``torch.manual_seed``
    (or the same loader ``generator=`` seed) gives the same numbers item for item, another
    seed other numbers. An ``IterableDataset``'s generators are not reseeded: its workers,
    drawing the same permutation, share out every item once."""
    need_module("torch")
    result = run_script(RNG_SCRIPT, "fixed", timeout=90)
    first, second = result["first"]
    for key in GLOBAL + HELD:
        assert len(set(_values(first, key))) == 8, (key, first)
        assert not set(_values(first, key)) & set(_values(second, key)), key
        for epoch in range(2):
            assert _values(result["again"][epoch], key) == _values(result["first"][epoch], key)
            assert _values(result["generator_again"][epoch], key) == _values(
                result["generator"][epoch], key
            )
            other = set(_values(result["generator"][epoch], key))  # seed 5, not 0
            assert not other & set(_values(result["first"][epoch], key)), key
    # an IterableDataset's generators are left alone: its workers share out one permutation
    assert sorted(result["shards"]) == list(range(8)), result["shards"]


OPENCV_SCRIPT = f"""
import json, signal, sys, time
import psutil
from torch.utils.data import DataLoader
import _torch_cv_models as m
from modelpool import _hygiene
from modelpool.integrations.torch import with_hygiene, worker_init_fn

out = {{"cores": _hygiene.usable_cores()}}
if sys.argv[1] == "parent-used-cv2":
    out["parent_cv2"] = m.resize_with_threads()


def load(init, timeout):
    start = time.monotonic()
    # a healthy item takes milliseconds: a worker that hangs fails the load after `timeout` s
    loader = DataLoader(m.Resizing(4), batch_size=None, num_workers=2, timeout=timeout,
                        worker_init_fn=init)
    items = iter(loader)
    try:
        rows = list(items)
    except RuntimeError as exc:
        rows = str(exc)
        # torch's SIGCHLD handler would raise, mid-kill, that a worker was killed
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in psutil.Process().children():  # or the loader's shutdown waits 5 s each
            child.kill()
    return {{"rows": rows, "seconds": round(time.monotonic() - start, 3)}}


out["plain"] = load(None, 30)
out["fixed"] = load(worker_init_fn, 30)
out["chained"] = load(with_hygiene(m.remember_init, threads=3), 30)
# cv2.setNumThreads(1), the usual advice (a hang shows in 3 s: the others take < 1 s)
out["naive"] = load(m.naive_cv2_init, 3 if "parent_cv2" in out else 30)
out["cv2_in_parent"] = "cv2" in sys.modules
print({RESULT!r} + json.dumps(out))
"""


@pytest.fixture
def two_cores() -> int:
    cores = _hygiene.usable_cores()
    if cores < 2:
        pytest.skip("one usable core: two workers cannot oversubscribe it")
    return cores


def _check_rows(rows: Any, what: str) -> list[dict[str, Any]]:
    assert isinstance(rows, list), f"{what}: {rows}"
    assert sorted(r["worker"] for r in rows) == [0, 0, 1, 1], what
    assert all(r["shape"] == [256, 256, 3] for r in rows), what
    assert all(r["torch"] == 1 for r in rows), what  # the loader's own setting
    return rows


def test_opencv_in_dataloader_workers_imported_there(two_cores: int) -> None:
    """Control and fix, OpenCV imported in the workers (``cv2.resize`` in ``__getitem__``, 2
    workers). Plain: each worker's OpenCV pool has every core, threads that really run (2
    workers x N threads on N cores). ``worker_init_fn``: each has the budget, cores // 2, as
    have its BLAS pools and thread variables; torch keeps the loader's 1.
    ``with_hygiene(fn, threads=3)`` sets 3, then runs ``fn``, which sees it."""
    need_module("torch")
    need_module("cv2")
    result = run_script(OPENCV_SCRIPT, "cv2-imported-in-workers", timeout=120)
    assert result["cv2_in_parent"] is False
    budget = max(1, two_cores // 2)
    plain = _check_rows(result["plain"]["rows"], "plain")
    assert {r["cv2"] for r in plain} == {two_cores}, plain
    for row in _check_rows(result["fixed"]["rows"], "fixed"):
        assert (row["cv2"], row["omp_env"], row["openblas"]) == (budget, str(budget), [budget])
    for row in _check_rows(result["chained"]["rows"], "chained"):
        assert (row["cv2"], row["omp_env"]) == (3, "3"), row
        assert row["init"] == f"{row['worker']}:3", "the user's init_fn runs after the limits"
    assert {r["cv2"] for r in _check_rows(result["naive"]["rows"], "naive")} == {1}


def test_opencv_in_dataloader_workers_after_the_parent_used_it(two_cores: int) -> None:
    """Control and fix, the parent ran a threaded ``cv2.resize`` before the loader forked its
    workers. Plain: no hang, each worker reports the parent's pool size. The usual advice,
    ``cv2.setNumThreads(1)`` in a ``worker_init_fn``, hangs every worker: shrinking the pool
    joins the parent's threads, which the fork did not copy. ``worker_init_fn``: no hang,
    OpenCV sequential (1 thread, within the budget), even when a larger budget is asked."""
    need_module("torch")
    need_module("cv2")
    result = run_script(OPENCV_SCRIPT, "parent-used-cv2", timeout=120)
    assert result["cv2_in_parent"] is True
    assert result["parent_cv2"] == two_cores, "the parent's resize ran on every core"
    budget = max(1, two_cores // 2)
    plain = _check_rows(result["plain"]["rows"], "plain")
    assert {r["cv2"] for r in plain} == {two_cores}, plain
    assert "DataLoader timed out after 3 seconds" in result["naive"]["rows"], result["naive"]
    for row in _check_rows(result["fixed"]["rows"], "fixed"):
        assert (row["cv2"], row["omp_env"], row["openblas"]) == (1, str(budget), [budget])
    for row in _check_rows(result["chained"]["rows"], "chained"):
        assert (row["cv2"], row["omp_env"]) == (1, "3"), row
        assert row["init"] == f"{row['worker']}:3"


def test_with_hygiene_pickles_and_checks_its_budget() -> None:
    """A loader with a spawn or forkserver context pickles its ``worker_init_fn``."""
    need_module("torch")
    chained = mp_torch.with_hygiene(_hygiene.usable_cores, threads=2)
    again = pickle.loads(pickle.dumps(chained))
    assert (again.init_fn, again.threads) == (_hygiene.usable_cores, 2)
    assert pickle.loads(pickle.dumps(mp_torch.worker_init_fn)) is mp_torch.worker_init_fn
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="threads must be an int >= 1"):
            mp_torch.with_hygiene(threads=bad)


def test_import_without_torch_says_how_to_install_it() -> None:
    code = "import sys; sys.modules['torch'] = None; import modelpool.integrations.torch"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=60
    )
    assert proc.returncode == 1
    assert "pip install 'modelpool[torch]'" in proc.stderr, proc.stderr


def test_example_torch_dataloader() -> None:
    """examples/torch_dataloader.py runs, and says what the controls above show: without
    ``worker_init_fn`` the 2 workers drew the same augmentations (8 distinct of 16) and ran
    OpenCV on every core; with it, 16 of 16, on the budget."""
    need_module("torch")
    need_module("cv2")
    out, _ = run_python([str(ROOT / "examples" / "torch_dataloader.py")], timeout=120, cwd=ROOT)
    budget = max(1, _hygiene.usable_cores() // 2)
    assert "without: distinct augmentations: 8 of 16\n" in out, out
    assert "with worker_init_fn: distinct augmentations: 16 of 16\n" in out, out
    assert f"with worker_init_fn: OpenCV threads per worker: {budget}\n" in out, out
    assert "batches: 4 of shape (4, 3, 64, 64)\n" in out, out
