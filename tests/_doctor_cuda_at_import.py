"""A model module that initialises CUDA when imported (``model.to("cuda")`` at module level).

On a machine with a GPU, it does. On one without (CI here), CUDA cannot be initialised, so
this is a STUB: ``torch.cuda.is_initialized`` is made to answer True, which is all the doctor
reads. The doctor's finding is the same either way; only the GPU machine proves the real one.
"""

from __future__ import annotations

from typing import Any

import torch

import modelpool

if torch.cuda.is_available():
    torch.cuda.init()
    STUB = False
else:
    torch.cuda.is_initialized = lambda: True
    STUB = True


class Model(modelpool.Model):
    def predict(self, inputs: Any) -> Any:
        return inputs
