"""Models for the real-GPU tests (tests/gpu). torch is imported only in the workers (in
``setup``): the test process imports this module, and never touches torch or CUDA itself."""

from __future__ import annotations

import os
from typing import Any

import modelpool


class MatmulOnDevice(modelpool.Model):
    """``y = a @ b`` on the GPU this worker sees (on the CPU when it sees none), with what the
    worker saw: its slot, ``CUDA_VISIBLE_DEVICES``, how many GPUs torch counts, where the
    product was computed."""

    def setup(self) -> None:
        import torch

        self.torch = torch
        self.gpus = torch.cuda.device_count()
        if self.gpus:
            torch.zeros(1, device="cuda")  # CUDA initialised in the worker, as a model does

    def predict(self, inputs: Any) -> Any:
        torch = self.torch
        device = "cuda" if self.gpus else "cpu"
        a = torch.from_numpy(inputs["a"]).to(device)
        b = torch.from_numpy(inputs["b"]).to(device)
        y = a @ b
        info = modelpool.worker_info()
        assert info is not None
        return {
            "index": info.index,
            "pid": os.getpid(),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpus": torch.cuda.device_count(),
            "cuda_initialised": torch.cuda.is_initialized(),
            "device": str(y.device),
            "name": torch.cuda.get_device_name(0) if self.gpus else None,
            "y": y.cpu().numpy(),
        }
