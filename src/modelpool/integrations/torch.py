"""PyTorch DataLoader workers with the hygiene of a modelpool worker: ``worker_init_fn``.

``DataLoader(dataset, num_workers=4, worker_init_fn=worker_init_fn)`` gives every loader worker,
before it loads its first sample:

* Seeds, distinct per worker and reproducible under ``torch.manual_seed`` (or the loader's
  ``generator=``): ``random``, NumPy's global RNG (a 32-bit seed) and torch, all derived from
  ``torch.initial_seed()``, which the loader makes distinct per worker and per epoch. torch
  (>= 1.9) already seeds those three itself; what it cannot reach, and this does, are the
  generators a map-style dataset holds (``self.rng = np.random.default_rng(0)`` in
  ``__init__``, NumPy's recommended style, or a ``random.Random``, ``RandomState`` or CPU
  ``torch.Generator``), in its attributes or those of the objects it holds (transforms), a
  few levels deep: otherwise each worker gets a copy of the parent's generator in the same
  state, so every worker draws the same "random" augmentations, and the next epoch repeats
  them. They are reseeded in place. An ``IterableDataset``'s are left alone (the same stream
  in every worker is how such a dataset usually shares out its items).
* A thread budget: usable cores // ``num_workers`` (at least 1; an ``OMP_NUM_THREADS`` the
  user exported wins, as in a pool), applied to OpenCV (``cv2.setNumThreads``; also if cv2 is
  imported later: it reads no variable and otherwise sizes its pool to every core in every
  worker), the BLAS and OpenMP pools loaded (threadpoolctl), numexpr, and the thread variables
  of the worker's environment. torch's intra-op pool is capped by it, never raised: the loader
  sets it to 1 on purpose. A worker forked from a parent that had OpenCV loaded runs OpenCV
  sequentially instead: resizing the pool it inherited hangs (``_limit_opencv``); importing
  this module registers the fork handler that tells such a worker apart.

A user's own init function runs after: ``worker_init_fn=with_hygiene(my_init)``; an explicit
budget: ``with_hygiene(threads=2)``. Both are picklable (loaders with a ``spawn`` or
``forkserver`` context pickle them). Called outside a loader worker, both seed and limit the
calling process as if it were the only worker.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import types
from collections.abc import Callable
from typing import Any

from modelpool import _hygiene

try:
    import torch
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"modelpool.integrations.torch needs PyTorch ({_exc}); run: pip install 'modelpool[torch]'"
    ) from _exc

__all__ = ["with_hygiene", "worker_init_fn"]

#: How deep reseeding looks into the dataset (its attributes, theirs, ...), and the longest
#: list, tuple or dict it looks into (a list of transforms, not a list of samples).
_MAX_DEPTH = 4
_MAX_CONTAINER = 64

#: This process was forked from one that had OpenCV loaded (see ``_limit_opencv``).
_forked_with_cv2 = False


def _note_fork() -> None:
    global _forked_with_cv2
    _forked_with_cv2 = "cv2" in sys.modules


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_note_fork)


def worker_init_fn(worker_id: int) -> None:
    """Seed this DataLoader worker and limit its threads (see the module's docstring).

    Pass it as it is: ``DataLoader(dataset, num_workers=2, worker_init_fn=worker_init_fn)``.
    """
    _prepare(worker_id, None)


class _WorkerInit:
    """``worker_init_fn`` with options (see ``with_hygiene``); a class, so that it pickles."""

    def __init__(self, init_fn: Callable[[int], object] | None, threads: int | None) -> None:
        if threads is not None and (isinstance(threads, bool) or threads < 1):
            raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
        self.init_fn = init_fn
        self.threads = threads

    def __call__(self, worker_id: int) -> None:
        _prepare(worker_id, self.threads)
        if self.init_fn is not None:
            self.init_fn(worker_id)

    def __repr__(self) -> str:
        return f"with_hygiene({self.init_fn!r}, threads={self.threads!r})"


def with_hygiene(
    init_fn: Callable[[int], object] | None = None, *, threads: int | None = None
) -> Callable[[int], None]:
    """A ``worker_init_fn`` that does what ``worker_init_fn`` does, then calls
    ``init_fn(worker_id)`` (yours: it sees the seeds and limits already set).

    ``threads`` replaces the budget (default: usable cores // ``num_workers``, or an exported
    ``OMP_NUM_THREADS``). ``init_fn`` must pickle if the loader's context is not ``fork``.
    """
    return _WorkerInit(init_fn, threads)


def _prepare(worker_id: int, threads: int | None) -> None:
    info = get_worker_info()
    workers = info.num_workers if info is not None else 1
    seed = _hygiene.derive_seed(torch.initial_seed(), worker_id, 0)  # 32 bits: NumPy takes it
    _hygiene.seed_rngs(seed)  # random, NumPy's global RNG, torch
    if info is not None and not isinstance(info.dataset, IterableDataset):
        _reseed_held(info.dataset, seed)

    budget = _hygiene.resolve_threads(threads, workers)
    env = _hygiene.thread_env(budget, explicit=threads is not None)
    os.environ.update(env)  # read by pools loaded later and by processes started here
    torch_threads = min(torch.get_num_threads(), int(env["OMP_NUM_THREADS"]))
    _hygiene.limit_blas_and_openmp(budget, env)
    torch.set_num_threads(torch_threads)  # after OpenMP's limit, which also sets torch's
    numexpr = sys.modules.get("numexpr")
    if numexpr is not None:
        with contextlib.suppress(Exception):
            numexpr.set_num_threads(int(env["NUMEXPR_NUM_THREADS"]))
    _limit_opencv(budget)
    _hygiene.limit_when_imported(seed, budget, env)  # cv2 or numexpr imported later


def _limit_opencv(budget: int) -> None:
    """Size OpenCV's pool, if loaded; imported later: ``limit_when_imported``.

    In a worker forked after the parent loaded OpenCV, the pool's bookkeeping lists the
    parent's threads, which do not exist here: shrinking it joins them and hangs for good
    (``cv2.setNumThreads(1)`` at once, a smaller count at the next parallel call; pthreads
    builds, measured). There OpenCV is made sequential instead (``setNumThreads(0)``, which
    never touches the pool: 1 thread, within any budget).
    """
    cv2: Any = sys.modules.get("cv2")
    if cv2 is None:
        return
    with contextlib.suppress(Exception):
        if _forked_with_cv2:
            cv2.setNumThreads(0)
        elif cv2.getNumThreads() != budget:
            cv2.setNumThreads(budget)


def _reseed(obj: Any, seed: int) -> bool:
    """Reseed ``obj`` in place if it is a random generator; say whether it was one."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        if isinstance(obj, numpy.random.Generator):
            bits = obj.bit_generator
            bits.state = type(bits)(seed).state
            return True
        if isinstance(obj, numpy.random.RandomState):
            obj.seed(seed)
            return True
    if isinstance(obj, random.Random):
        obj.seed(seed)
        return True
    if isinstance(obj, torch.Generator):
        if obj.device.type == "cpu":
            obj.manual_seed(seed)
        return True
    return False


def _children(obj: Any) -> list[Any]:
    """What reseeding looks into below ``obj``: its attributes, or a small container's items."""
    if isinstance(obj, dict):
        return list(obj.values()) if len(obj) <= _MAX_CONTAINER else []
    if isinstance(obj, list | tuple):
        return list(obj) if len(obj) <= _MAX_CONTAINER else []
    if isinstance(obj, type | types.ModuleType) or type(obj).__module__ == "builtins":
        return []  # classes, modules, functions, methods, str, int...
    attributes = getattr(obj, "__dict__", None)
    return list(attributes.values()) if isinstance(attributes, dict) else []


def _reseed_held(root: Any, seed: int) -> int:
    """Reseed every generator reachable from ``root`` (depth-first, in attribute order, so the
    same dataset gets the same seeds); return how many there were."""
    seen: set[int] = set()
    found = 0
    stack = [(root, 0)]
    while stack:
        obj, depth = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if _reseed(obj, _hygiene.derive_seed(seed, found + 1, 1)):
            found += 1
        elif depth < _MAX_DEPTH:
            stack.extend((child, depth + 1) for child in reversed(_children(obj)))
    return found
