"""Functions and models the benchmark's worker processes import (bench/ is on their path)."""

from __future__ import annotations

import statistics
from typing import Any

from mlp_weights import mlp_weights

import modelpool


def noop(x: Any) -> Any:
    return x


def echo_pipe(conn: Any) -> None:
    """The floor for a small call: a bare multiprocessing Pipe ping-pong."""
    while True:
        data = conn.recv_bytes()
        if not data:
            return
        conn.send_bytes(data)


class Identity(modelpool.Model):
    def predict(self, inputs: Any) -> Any:
        return inputs


class FixedCostMLP(modelpool.Model):
    """A small NumPy MLP (64 -> 256 -> 10) plus a fixed 2 ms per call: the shape of a model
    whose cost is dominated by per-call overhead at small batch (a GPU launch and sync, a
    remote feature lookup). Batching pays that overhead once per batch."""

    fixed_cost = 0.002

    def setup(self) -> None:
        self.w1, self.w2 = mlp_weights()

    def predict(self, inputs: Any) -> Any:
        import time

        import numpy as np

        time.sleep(self.fixed_cost)
        h = np.maximum(inputs["x"] @ self.w1, 0)
        return {"y": h @ self.w2}


class TorchMLP(modelpool.Model):
    """The same MLP in torch, no artificial cost: per-call overhead is torch's and ours."""

    def setup(self) -> None:
        import torch

        torch.manual_seed(0)
        self.torch = torch
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
        ).eval()

    def predict(self, inputs: Any) -> Any:
        with self.torch.inference_mode():
            return {"y": self.net(self.torch.from_numpy(inputs["x"])).numpy()}


class MLP(FixedCostMLP):
    """FixedCostMLP without the fixed cost, with a declared signature (for the HTTP server):
    the same weights, ``x`` FP32 [-1, 64] -> ``y`` FP32 [-1, 10]."""

    inputs = [modelpool.TensorSpec("x", "FP32", [-1, 64])]
    outputs = [modelpool.TensorSpec("y", "FP32", [-1, 10])]

    def predict(self, inputs: Any) -> Any:
        import numpy as np

        h = np.maximum(inputs["x"] @ self.w1, 0)
        return {"y": h @ self.w2}


def spread(values: list[float]) -> dict[str, Any]:
    """Median, quartiles, extremes and count of per-round values (kept as ``per_round``)."""
    if len(values) > 1:
        p25, _, p75 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        p25 = p75 = values[0]
    return {
        "median": statistics.median(values),
        "p25": p25,
        "p75": p75,
        "min": min(values),
        "max": max(values),
        "rounds": len(values),
        "per_round": values,
    }


class Ticker(modelpool.Model):
    """A model that streams (its ``predict`` is a generator), for bench/streaming.py: it works
    ``first_ms`` ms (a "prefill"), then yields ``n`` pieces as fast as it can, each
    ``{"i": [k], "took": [s]}`` (``took``: the seconds from the call to this yield, as the
    model itself measures them) plus ``data``, a string of ``size`` bytes, when ``size`` > 0.
    With a ``log`` path, it writes there how many pieces it has yielded so far."""

    inputs = [
        modelpool.TensorSpec("n", "INT64", [1]),
        modelpool.TensorSpec("size", "INT64", [1]),
        modelpool.TensorSpec("first_ms", "FP64", [1]),
        modelpool.TensorSpec("log", "BYTES", [1]),
    ]

    def predict(self, inputs: Any) -> Any:
        import time

        import numpy as np

        start = time.perf_counter()
        n, size = int(inputs["n"][0]), int(inputs["size"][0])
        log = inputs["log"][0]
        log = log.decode() if isinstance(log, bytes) else str(log)
        time.sleep(float(inputs["first_ms"][0]) / 1e3)
        data = {"data": np.array([b"x" * size], dtype=object)} if size else {}
        for k in range(n):
            if log:
                with open(log, "w") as f:
                    f.write(str(k + 1))
            yield {"i": np.array([k]), "took": np.array([time.perf_counter() - start]), **data}
