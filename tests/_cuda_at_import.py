"""A model module that initialises CUDA when imported, for real: a layer moved to the GPU at
module level (the mistake ``modelpool doctor`` names). Only the GPU tests (tests/gpu) load it,
and only on a machine with a GPU; tests/_doctor_cuda_at_import.py is the stub for machines
without one."""

from __future__ import annotations

from typing import Any

import torch

import modelpool

LAYER = torch.nn.Linear(4, 4).to("cuda")  # at import: every process that imports this holds CUDA


class Model(modelpool.Model):
    def predict(self, inputs: Any) -> Any:
        return inputs
