"""Models for the Celery tests; they run in modelpool workers (threads) or Celery children
(prefork). ``MARKS`` (an option) names a directory where a model leaves one file per call, so
the test can see which process ran what, and when."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

import modelpool


def _mark(marks: str | None, what: str) -> None:
    if marks:
        name = f"{what}-{os.getpid()}-{time.monotonic_ns()}"
        Path(marks, name).write_text(str(os.getpid()))


class Affine(modelpool.Model):
    """y = x * 2 + 1 (dtype kept); also its pid and whether the input arrived writable."""

    def __init__(self, marks: str | None = None) -> None:
        self.marks = marks

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        x = inputs["x"]
        _mark(self.marks, "affine")
        return {
            "y": x * 2 + 1,
            "pid": np.array([os.getpid()]),
            "writable": np.array([x.flags.writeable]),
            "seed_draw": np.array([np.random.randint(0, 2**31 - 1)]),
            "seed": np.array([info.seed if (info := modelpool.worker_info()) else -1]),
            "omp_threads": np.array([int(os.environ.get("OMP_NUM_THREADS", "0"))]),
        }


class Slow(modelpool.Model):
    """Sleeps ``x[0]`` seconds, then returns ``x``; marks its start (for kill tests)."""

    def __init__(self, marks: str | None = None) -> None:
        self.marks = marks

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        x = inputs["x"]
        _mark(self.marks, "start")
        time.sleep(float(x[0]))
        return {"y": x, "pid": np.array([os.getpid()])}


class Poison(modelpool.Model):
    """Kills its own process on every call: the task nobody can run."""

    def __init__(self, marks: str | None = None) -> None:
        self.marks = marks

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        _mark(self.marks, "poison")
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


class SlowSetup(modelpool.Model):
    """Takes ``seconds`` to load (longer than Celery's worker_proc_alive_timeout in the test);
    marks the start of its load."""

    def __init__(self, seconds: float = 1.0, marks: str | None = None) -> None:
        self.seconds = seconds
        self.marks = marks

    def setup(self) -> None:
        _mark(self.marks, "setup")
        time.sleep(self.seconds)

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {"y": inputs["x"] + 1}


class Fails(modelpool.Model):
    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("bad input: the model refuses it")


class BrokenSetup(modelpool.Model):
    """Cannot load: its weights are missing."""

    def setup(self) -> None:
        raise FileNotFoundError("weights.pt is missing")

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("never loaded")
