"""``Model`` and input validation against a declared signature (``_model``): a model's own
``__init__`` gets the options, and an input error is worded for Python callers (with NumPy
advice) and, as ``problem``, plainly for the server."""

from __future__ import annotations

import numpy as np
import pytest

import modelpool
from _models import Doubler, WhoAmI
from modelpool._model import TensorSpec, normalize_inputs


def test_options_reach_model_without_super_init() -> None:
    with modelpool.Pool(WhoAmI, options={"alpha": 1}) as pool:
        assert pool.predict(None)["options"] == {"alpha": 1}


def test_input_validation_in_caller() -> None:
    with modelpool.Pool(Doubler) as pool:
        with pytest.raises(modelpool.InputValidationError, match="FP32"):
            pool.predict({"x": np.ones((1, 4), dtype=np.float64)})
        with pytest.raises(modelpool.InputValidationError, match=r"shape \[-1, 4\]"):
            pool.predict({"x": np.ones((1, 3), dtype=np.float32)})
        with pytest.raises(modelpool.InputValidationError, match="no input named 'z'"):
            pool.predict({"x": np.ones((1, 4), dtype=np.float32), "z": np.ones(1)})
        with pytest.raises(modelpool.InputValidationError, match="missing input 'x'"):
            pool.predict({})


SPECS = (TensorSpec("INPUT0", "FP32", [-1, 4]),)


@pytest.mark.parametrize(
    ("inputs", "python", "problem"),
    [
        (
            {"INPUT0": np.zeros((1, 4))},
            "model 'Iris', input 'INPUT0': expected datatype FP32 (float32), got float64; "
            "convert with .astype(np.float32)",
            "input 'INPUT0': expected datatype FP32, got FP64",
        ),
        (
            {"INPUT0": np.zeros((1, 3), np.float32)},
            "model 'Iris', input 'INPUT0': expected shape [-1, 4] (-1 = any), got [1, 3]",
            "input 'INPUT0': expected shape [-1, 4] (-1 = any), got [1, 3]",
        ),
        (
            {"X": np.zeros((1, 4), np.float32)},
            "model 'Iris' has no input named 'X'; its inputs are INPUT0",
            "no input named 'X'; its inputs are INPUT0",
        ),
        ({}, "model 'Iris': missing input 'INPUT0'", "missing input 'INPUT0' (FP32"),
    ],
    ids=["datatype", "shape", "unknown", "missing"],
)
def test_input_errors_keep_numpy_advice_for_python_and_state_the_problem_plainly(
    inputs: dict[str, object], python: str, problem: str
) -> None:
    with pytest.raises(modelpool.InputValidationError) as info:
        normalize_inputs(inputs, SPECS, "Iris")
    assert str(info.value).startswith(python)
    assert info.value.problem is not None
    assert info.value.problem.startswith(problem)
    assert "np." not in info.value.problem
    assert "Iris" not in info.value.problem
    import pickle

    again = pickle.loads(pickle.dumps(info.value))
    assert (str(again), again.problem) == (str(info.value), info.value.problem)
