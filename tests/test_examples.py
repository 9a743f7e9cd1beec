"""Every example in examples/ runs as a user runs it (``python examples/NAME.py``, a fresh
interpreter in the examples folder) and prints what its docstring promises."""

from __future__ import annotations

import pytest

from _deps import need_module
from _scripts import ROOT, run_python

#: example -> (optional modules it needs, lines its output must contain)
EXAMPLES = {
    "quickstart.py": ((), ["-> setosa", "rejected:", "submit: pid"]),
    "torch_model.py": (("torch",), ["matches the model run in this process", "torch uses"]),
    "onnx_model.py": (("onnx", "onnxruntime"), ["matches NumPy: True", "1 intra-op thread"]),
    "sklearn_model.py": (("sklearn", "joblib"), ["matches the fitted pipeline: True"]),
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name: str) -> None:
    needs, expected = EXAMPLES[name]
    for module in needs:
        need_module(module)
    out, err = run_python([name], timeout=120, cwd=ROOT / "examples")
    for text in expected:
        assert text in out, f"{name} did not print {text!r}\n--- stdout\n{out}\n--- stderr\n{err}"


#: examples not run here, and why
NOT_HERE = {
    "celery_app.py": "a Celery app module: it needs a broker and a `celery worker` to run",
    "torch_dataloader.py": "run by tests/integrations/test_torch.py",
    "opencv_model.py": "run by tests/test_opencv.py",
    "tensorflow_model.py": "run by tests/frameworks/test_tensorflow.py (its slow import once)",
}


def test_every_example_is_run_by_a_test() -> None:
    """A new example gets an entry in EXAMPLES (or in NOT_HERE, saying why)."""
    found = {p.name for p in (ROOT / "examples").glob("*.py")}
    assert found <= set(EXAMPLES) | set(NOT_HERE), sorted(found - set(EXAMPLES) - set(NOT_HERE))
