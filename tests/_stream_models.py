"""Models whose ``predict`` streams (a generator, an async generator), for the streaming
tests: each records in a file what it did, so that a test sees the worker's side."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import numpy as np

import modelpool


class Counter(modelpool.Model):
    """Yields ``n`` pieces {"i": [k]}; ``log`` (a file) gets "yielded k" per piece and
    "finally" when the generator ends or is closed; ``fail_at`` raises there, ``crash_at``
    kills the worker there, ``stuck_at`` sleeps 600 s there; ``pause`` seconds between
    pieces."""

    def __init__(self, log: str = "", pause: float = 0.0) -> None:
        self.log, self.pause = log, pause

    def _note(self, text: str) -> None:
        if self.log:
            with open(self.log, "a") as f:
                f.write(text + "\n")

    def predict(self, inputs: dict[str, Any]) -> Any:
        n = int(inputs["n"][0])
        fail_at = int(inputs.get("fail_at", np.array([-1]))[0])
        crash_at = int(inputs.get("crash_at", np.array([-1]))[0])
        stuck_at = int(inputs.get("stuck_at", np.array([-1]))[0])
        try:
            for k in range(n):
                if k == fail_at:
                    raise ValueError(f"piece {k} failed")
                if k == crash_at:
                    os._exit(9)
                if k == stuck_at:
                    time.sleep(600)
                self._note(f"yielded {k}")
                yield {"i": np.array([k])}
                if self.pause:
                    time.sleep(self.pause)
        finally:
            self._note("finally")


class AsyncCounter(modelpool.Model):
    """The same as an async generator."""

    async def predict(self, inputs: dict[str, Any]) -> Any:
        for k in range(int(inputs["n"][0])):
            await asyncio.sleep(0)
            yield {"i": np.array([k])}


class Plain(modelpool.Model):
    def predict(self, inputs: dict[str, Any]) -> Any:
        return {"y": inputs["x"] * 2}


class Mixed(modelpool.Model):
    """A plain answer for {"sleep": [s]} (after sleeping s seconds), pieces for {"n": [n]}."""

    def predict(self, inputs: dict[str, Any]) -> Any:
        if "sleep" in inputs:
            time.sleep(float(inputs["sleep"][0]))
            return {"slept": inputs["sleep"]}
        return ({"i": np.array([k])} for k in range(int(inputs["n"][0])))
