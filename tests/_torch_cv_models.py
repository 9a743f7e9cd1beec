"""Datasets and models for the PyTorch DataLoader, OpenCV and read-only-array tests. Importable
by workers, by ``modelpool serve`` and by Celery workers (tests/ on their path); torch and cv2
are imported where used, so importing this module needs neither."""

from __future__ import annotations

import os
import random
import sys
import warnings
from typing import Any

import numpy as np

import modelpool


def image(size: int = 1024, seed: int = 0) -> np.ndarray:
    """A random BGR image, ``size`` x ``size``."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def resize_with_threads(size: int = 2048) -> int:
    """The parent's use of OpenCV before any worker starts: a large resize, which runs on
    OpenCV's thread pool (all cores by default), then a second for its threads to go idle.
    Returns that pool's size.

    (Forked while those threads still spin after the job, a child's ``setNumThreads`` may
    get through; forked once they sleep, it hangs every time. Measured on this 2-core machine
    with one core kept busy: 0 of 4 hangs without the pause, 3 of 3 with it.)"""
    import time

    import cv2

    cv2.resize(image(size), (size // 3, size // 3), interpolation=cv2.INTER_AREA)
    time.sleep(1.0)
    return int(cv2.getNumThreads())


# --------------------------------------------------------------------------- DataLoader


class Jitter:
    """A transform holding its own generator (made once, in the parent)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> float:
        return float(self.rng.random())


class Draws:
    """A map-style dataset: each item is one draw from every kind of RNG, and who drew it.

    ``numpy``, ``random``, ``torch``: the global RNGs. ``held_*``: generators the dataset
    made in ``__init__`` (in the parent), NumPy's recommended style; ``transform``: one held
    by an object the dataset holds."""

    def __init__(self, n: int = 8) -> None:
        import torch

        self.n = n
        self.rng = np.random.default_rng(0)
        self.py_rng = random.Random(0)
        self.torch_rng = torch.Generator().manual_seed(0)
        self.transforms = [Jitter(1)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        return {
            "worker": -1 if info is None else info.id,
            "index": index,
            "numpy": float(np.random.random()),
            "random": random.random(),
            "torch": float(torch.rand(1)),
            "held_numpy": float(self.rng.random()),
            "held_random": self.py_rng.random(),
            "held_torch": float(torch.rand(1, generator=self.torch_rng)),
            "transform": self.transforms[0](),
        }


class Resizing:
    """A map-style dataset whose ``__getitem__`` resizes an image with OpenCV (imported there
    when ``late``), and reports the thread pools of the worker that ran it."""

    def __init__(self, n: int = 4) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        import cv2
        import torch
        from threadpoolctl import threadpool_info
        from torch.utils.data import get_worker_info

        small = cv2.resize(image(1024, index), (256, 256), interpolation=cv2.INTER_AREA)
        info = get_worker_info()
        return {
            "worker": -1 if info is None else info.id,
            "shape": list(small.shape),
            "cv2": int(cv2.getNumThreads()),
            "torch": int(torch.get_num_threads()),
            "openblas": sorted(
                {
                    int(p["num_threads"])
                    for p in threadpool_info()
                    if p["internal_api"] == "openblas"
                }
            ),
            "omp_env": os.environ.get("OMP_NUM_THREADS"),
            "init": os.environ.get("MODELPOOL_TEST_INIT"),
        }


def naive_cv2_init(worker_id: int) -> None:
    """The usual advice for OpenCV in DataLoader workers, as a ``worker_init_fn``."""
    import cv2

    cv2.setNumThreads(1)


def remember_init(worker_id: int) -> None:
    """A user's own ``worker_init_fn``: notes its worker and the thread budget it saw."""
    os.environ["MODELPOOL_TEST_INIT"] = f"{worker_id}:{os.environ.get('OMP_NUM_THREADS')}"


# --------------------------------------------------------------------------- models


class Thumbnail(modelpool.Model):
    """OpenCV in a modelpool worker: resizes ``image`` (uint8, H x W x 3) to ``size``."""

    def __init__(self, size: int = 64) -> None:
        self.size = size

    def setup(self) -> None:
        import cv2

        self.cv2 = cv2

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cv2 = self.cv2
        small = cv2.resize(inputs["image"], (self.size, self.size), interpolation=cv2.INTER_AREA)
        return {
            "thumbnail": small,
            "cv2_threads": np.array([cv2.getNumThreads()]),
            "pid": np.array([os.getpid()]),
        }


class TorchInPlace(modelpool.Model):
    """``torch.from_numpy(x)`` with warnings as errors (torch warns when ``x`` is read-only),
    then an in-place add: returns ``x + 1``, and whether ``x`` arrived writable."""

    def setup(self) -> None:
        import torch

        self.torch = torch

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            t = self.torch.from_numpy(x)
        t.add_(1)  # in place, in memory this process owns
        return {
            "y": t.numpy().copy(),
            "writable": np.array([x.flags.writeable]),
            "pid": np.array([os.getpid()]),
        }


def torch_warns_on_read_only() -> str:
    """The control, run in a fresh process: ``TorchInPlace`` fed a read-only array directly
    (no pool) fails with torch's warning, raised as an error."""
    model = TorchInPlace()
    model.setup()
    x = np.frombuffer(np.arange(4, dtype=np.float32).tobytes(), dtype=np.float32)
    try:
        model.predict({"x": x})
    except UserWarning as exc:
        return str(exc)
    print("no warning", file=sys.stderr)
    return ""
