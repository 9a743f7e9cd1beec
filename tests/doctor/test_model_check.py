"""``modelpool doctor pkg.mod:Model``: the model loaded in a child as a worker loads it; each
problem it reports is made for real by a model in tests/_doctor_models.py (one stub: CUDA on a
machine without a GPU, said so in tests/_doctor_cuda_at_import.py)."""

from __future__ import annotations

import pytest

import _doctor_models
from _deps import IN_CI, need_module
from doctor._doctor import findings, levels, run_doctor


def test_a_clean_model_is_loaded_measured_and_tried() -> None:
    code, report = run_doctor(
        "_doctor_models:Clean", "--no-frameworks", "--threads-per-worker", "1"
    )
    assert code == 0, report["findings"]
    model = report["facts"]["model"]
    assert model["threads"] == 1
    assert model["import_s"] >= 0
    assert model["setup_s"] >= 0
    assert model["rss"] > 10 * 2**20
    # a test predict on inputs built from its TensorSpecs (-1 taken as 1; BYTES as text)
    assert model["predict_outputs"] == {"y": {"shape": [1, 3], "dtype": "float32"}}
    assert levels(report, "fork-safety") == {"ok"}
    assert levels(report, "pickle") == {"ok"}


def test_two_openmp_runtimes_in_one_worker_are_a_hazard() -> None:
    if not (_doctor_models.LLVM_LIBOMP and _doctor_models.GNU_LIBGOMP):
        message = "missing dependency: LLVM's libomp (apt-get install libomp5) and libgomp"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    code, report = run_doctor("_doctor_models:TwoOpenMP", "--no-frameworks")
    (openmp,) = findings(report, "openmp")
    assert openmp["level"] == "hazard"
    assert "GNU libgomp" in openmp["summary"]
    assert "LLVM libomp" in openmp["summary"]
    loaded = report["facts"]["model"]["libraries"]
    assert any("libomp.so" in path for path in loaded), loaded
    assert code == 2


def test_an_import_that_starts_a_thread_makes_fork_unsafe() -> None:
    code, report = run_doctor("_doctor_thread_at_import:Model", "--no-frameworks")
    (fork,) = findings(report, "fork-safety")
    assert fork["level"] == "warning"
    assert "weights-refresher" in fork["summary"]
    assert "weights-refresher" in report["facts"]["model"]["import_thread_names"]
    assert code == 1


def test_cuda_initialised_at_import_is_a_hazard() -> None:
    need_module("torch")  # (a stub on a machine without a GPU: see _doctor_cuda_at_import)
    code, report = run_doctor("_doctor_cuda_at_import:Model", "--no-frameworks")
    (fork,) = findings(report, "fork-safety")
    assert fork["level"] == "hazard"
    assert "initialises CUDA" in fork["summary"]
    assert "setup()" in fork["fix"]
    assert code == 2


def test_a_model_that_sets_its_own_thread_counts_is_told_so() -> None:
    need_module("cv2")
    code, report = run_doctor(
        "_doctor_models:SetsItsOwnThreads", "--no-frameworks", "--threads-per-worker", "1"
    )
    (threads,) = findings(report, "model-threads")
    # a worker puts the budget back after setup(), so it is a note, not a warning
    assert threads["level"] == "info"
    assert "OpenCV 8" in threads["summary"]
    assert report["facts"]["model"]["pools"]["cv2"] == 1  # (as the worker leaves it)
    assert code == 0


def test_a_class_defined_in_a_function_cannot_be_sent_by_reference() -> None:
    code, report = run_doctor("_doctor_models:Local", "--no-frameworks")
    (pickled,) = findings(report, "pickle")
    assert pickled["level"] == "warning"
    assert "<locals>" in pickled["summary"]
    assert code == 1


@pytest.mark.parametrize(
    ("target", "check", "words"),
    [
        ("_doctor_models:SetupFails", "model-setup", "weights file /nonexistent/model.pt"),
        ("_doctor_models:PredictFails", "model-predict", "LinAlgError"),
        ("_doctor_models:Missing", "model-import", "has no attribute 'Missing'"),
        ("_no_such_module_here:Model", "model-import", "_no_such_module_here"),
    ],
)
def test_failures_are_hazards_with_the_error(target: str, check: str, words: str) -> None:
    code, report = run_doctor(target, "--no-frameworks")
    (failed,) = findings(report, check)
    assert failed["level"] == "hazard", failed
    assert words in failed["summary"], failed
    assert code == 2


def test_options_reach_the_model() -> None:
    code, report = run_doctor("_doctor_models:Clean", "--no-frameworks", "--option", "scale=3")
    assert code == 0, report["findings"]
    assert report["facts"]["model"]["options"] == {"scale": 3}
