"""A small PyTorch model (``torch.nn.Linear``) served by a modelpool.Pool.

Run it with ``python examples/torch_model.py`` (needs ``pip install torch``).

The parent saves the weights to a file; each worker loads them in ``setup()``, the way a real
model loads a checkpoint. Weights are not created at random in the workers: each worker's torch
RNG is seeded differently, so randomly initialised layers would differ from worker to worker.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

import modelpool


class TorchLinear(modelpool.Model):
    inputs = [modelpool.TensorSpec("x", "FP32", [-1, 4])]
    outputs = [modelpool.TensorSpec("y", "FP32", [-1, 2])]

    def __init__(self, *, weights: str) -> None:  # Pool(options={"weights": ...})
        self.weights = weights

    def setup(self) -> None:
        # Runs in the worker, after modelpool set its thread limits (torch.set_num_threads).
        self.layer = torch.nn.Linear(4, 2)
        self.layer.load_state_dict(torch.load(self.weights, weights_only=True))
        self.layer.eval()

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Each input array arrives writable, in memory this worker owns, so torch.from_numpy
        # can share it without a copy and without a warning.
        x = torch.from_numpy(inputs["x"])
        with torch.inference_mode():
            y = self.layer(x)
        return {"y": y.numpy()}


def worker_threads() -> tuple[int, int]:
    """Runs in a worker through Pool.submit."""
    return os.getpid(), torch.get_num_threads()


if __name__ == "__main__":  # required: workers re-import this file when they start
    torch.manual_seed(0)
    reference = torch.nn.Linear(4, 2)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "linear.pt")
        torch.save(reference.state_dict(), path)

        with modelpool.Pool(
            TorchLinear, workers=2, options={"weights": path}, timeout=30.0
        ) as pool:
            x = np.random.default_rng(0).standard_normal((8, 4), dtype=np.float32)
            y = pool.predict({"x": x})["y"]

            with torch.inference_mode():
                expected = reference(torch.from_numpy(x)).numpy()
            np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
            print("y =", y[:2], "... matches the model run in this process")

            pid, threads = pool.submit(worker_threads).result()
            print(f"worker pid {pid}: torch uses {threads} thread(s)")
