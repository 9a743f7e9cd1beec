"""The small MLP's weights (64 -> 256 -> 10), with no import of modelpool: the benchmark's
models (``common``) and the peers (``peers``, in their own venvs) compute the same thing."""

from __future__ import annotations

from typing import Any


def mlp_weights() -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 256)).astype(np.float32) / 8
    w2 = rng.standard_normal((256, 10)).astype(np.float32) / 16
    return w1, w2
