"""Functions and models for tests/test_hazards.py.

Everything here is importable by worker processes (tests/ is on their sys.path), whether they are
modelpool workers or the plain ``multiprocessing`` / ``concurrent.futures`` children the tests use
to reproduce each hazard without modelpool. torch is imported lazily, so a worker that does not
need it does not pay for it.
"""

from __future__ import annotations

import os
import random
import signal
import time
from typing import Any

import numpy as np

import modelpool
from _models import Unpicklable, _die

MATMUL_SIZE = 512


def matmul(n: int = MATMUL_SIZE) -> float:
    """One torch matmul, large enough to run in OpenMP's parallel region."""
    import torch

    a = torch.rand(n, n)
    return float((a @ a).sum())


class TorchMatmul(modelpool.Model):
    """Runs a torch matmul per request and says how many threads did it."""

    def setup(self) -> None:
        import torch

        self.torch = torch

    def predict(self, inputs: Any) -> Any:
        return {
            "sum": np.array(matmul()),
            "threads": np.array(self.torch.get_num_threads()),
            "pid": np.array(os.getpid()),
        }


# --------------------------------------------------------------------------- H6: RNG streams


def draws() -> dict[str, Any]:
    """First draws from ``random``, NumPy's global RNG and torch, plus who drew them."""
    import torch

    info = modelpool.worker_info()
    return {
        "pid": os.getpid(),
        "index": None if info is None else info.index,
        "seed": None if info is None else info.seed,
        "random": random.random(),
        "numpy": float(np.random.random()),
        "torch": float(torch.rand(1)),
    }


def put_draws(queue: Any) -> None:
    """Target of a plain forked child: report its draws through ``queue``."""
    queue.put(draws())


class RngDraws(modelpool.Model):
    """Imports torch in setup() (as a real model loading weights does), then answers each
    request with its draws; ``inputs`` is a number of seconds to stay busy afterwards."""

    def setup(self) -> None:
        import torch  # noqa: F401  (loaded here on purpose: seeding must cover it)

    def predict(self, inputs: Any) -> Any:
        out = draws()
        time.sleep(float(inputs))
        return out


# --------------------------------------------------------------------------- H8: pickling


def no_wraps(fn: Any) -> Any:
    """A decorator written without ``functools.wraps``: the wrapper's ``__qualname__`` is
    ``no_wraps.<locals>.wrapper``, which pickle cannot find."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


@no_wraps
def add(a: int, b: int) -> int:
    return a + b


# --------------------------------------------------------------------------- crashes, errors


def sleep_then(value: Any, seconds: float) -> Any:
    time.sleep(seconds)
    return value


def die(how: str) -> None:
    """Die as ``_models.Crashy`` does: ``"sigkill"``, ``"sigsegv"`` or ``"exit"``."""
    _die(how)


def echo_or_die(x: Any) -> Any:
    """Return ``x``; SIGKILL this process when ``x == "die"``."""
    if x == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def raise_unpicklable() -> None:
    """Raise an exception that pickles fine but cannot be unpickled (H13)."""
    raise Unpicklable(1, 2)


# --------------------------------------------------------------------------- H7: read-only arrays


def torch_from_numpy_report(a: np.ndarray) -> dict[str, Any]:
    """In a worker: is the received array writable, and what does ``torch.from_numpy`` say?"""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = torch.from_numpy(a)
        t.add_(1)
    return {
        "writeable": bool(a.flags.writeable),
        "warnings": [str(w.message) for w in caught],
        "result": a,
    }


def read_only_array() -> np.ndarray:
    """A read-only array, as ``np.frombuffer`` on received bytes gives."""
    return np.frombuffer(np.arange(4, dtype=np.float32).tobytes(), dtype=np.float32)


# --------------------------------------------------------------------------- H14: slow loads


def slow_init(marker: str, seconds: float) -> None:
    """An executor initializer that 'loads a model': record our pid, then take a while."""
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)


# --------------------------------------------------------------------------- H16: threads


def thread_report() -> dict[str, Any]:
    """Thread settings as the worker's libraries see them, after torch ran a matmul."""
    import torch
    from threadpoolctl import threadpool_info

    matmul(64)
    info = modelpool.worker_info()
    return {
        "budget": None if info is None else info.threads,
        "env": {
            k: os.environ.get(k)
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
        },
        "torch_threads": torch.get_num_threads(),
        "pools": [(i["internal_api"], i["prefix"], i["num_threads"]) for i in threadpool_info()],
    }


def torch_threads() -> int:
    """Target of a plain spawned child: torch's default thread count."""
    import torch

    return int(torch.get_num_threads())


def cv2_threads() -> dict[str, Any]:
    """Imports OpenCV here, late (not at module top, not in ``setup()``): its thread count."""
    import sys

    loaded_before = "cv2" in sys.modules
    import cv2

    return {"loaded_before": loaded_before, "threads": int(cv2.getNumThreads())}
