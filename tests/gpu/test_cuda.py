"""On a real CUDA GPU: each worker given its device, CUDA after fork broken without modelpool
and refused with it, and ``modelpool doctor`` finding CUDA initialised at import.

Everywhere else (CI here has no GPU) every test is skipped, saying "no CUDA GPU on this
machine": a GPU is hardware, not a dependency to install, so ``CI=true`` does not make the skip
a failure. Whether there is one is asked in a fresh interpreter, and every process that
initialises CUDA is a subprocess or a worker: the test process never imports torch, so it
never holds CUDA (nor has the driver initialised) when it or a later test forks.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest

import modelpool
from _cuda_models import MatmulOnDevice
from _deps import need_module
from _scripts import child_env, run_script
from _waiting import wait_for
from doctor._doctor import findings, run_doctor

pytestmark = [pytest.mark.gpu, pytest.mark.xdist_group("gpu")]

NO_GPU = "no CUDA GPU on this machine"

GPU_PROBE = """
import json
import torch
print("RESULT " + json.dumps({
    "torch": torch.__version__,
    "available": torch.cuda.is_available(),
    "count": torch.cuda.device_count(),
}))
"""


@pytest.fixture(scope="module")
def gpu() -> dict[str, Any]:
    """What torch sees in a fresh interpreter; skips the test when it sees no GPU."""
    if importlib.util.find_spec("torch") is None:
        need_module("torch")  # a missing dependency (a failure in CI), not a missing GPU
    seen: dict[str, Any] = run_script(GPU_PROBE, timeout=120)
    if not seen["available"]:
        pytest.skip(f"{NO_GPU} (torch {seen['torch']}: torch.cuda.is_available() is False)")
    return seen


def _operands(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((256, 128)), rng.standard_normal((128, 64))


# --------------------------------------------------------------------------- devices


def test_each_worker_gets_its_device(gpu: dict[str, Any]) -> None:
    a, b = _operands()
    want = a @ b  # float64 on the CPU, in this process (no torch here)
    seen: dict[int, dict[str, Any]] = {}

    def both_workers_answered() -> bool:
        out = pool.predict({"a": a, "b": b})
        seen[out["index"]] = out
        return len(seen) == 2

    with modelpool.Pool(MatmulOnDevice, workers=2, devices=["cuda:0", "cpu"], timeout=60) as pool:
        # (the idle worker that has served least takes each call: they alternate)
        wait_for(both_workers_answered, timeout=60, what="an answer from each of the 2 workers")
    gpu_worker, cpu_worker = seen[0], seen[1]

    assert gpu_worker["visible"] == "0"
    assert gpu_worker["gpus"] == 1  # exactly the one it was given
    assert gpu_worker["cuda_initialised"]
    assert gpu_worker["device"] == "cuda:0"
    np.testing.assert_allclose(gpu_worker["y"], want, rtol=1e-9, atol=1e-9)

    assert cpu_worker["visible"] == ""
    assert cpu_worker["gpus"] == 0  # "cpu": no GPU visible at all
    assert not cpu_worker["cuda_initialised"]
    assert cpu_worker["device"] == "cpu"
    np.testing.assert_allclose(cpu_worker["y"], want, rtol=1e-9, atol=1e-9)
    assert gpu_worker["pid"] != cpu_worker["pid"]


# --------------------------------------------------------------------------- CUDA after fork

FORK_AFTER_CUDA_PLAIN = """
import json
import multiprocessing

import torch

torch.zeros(1, device="cuda")  # the parent initialises CUDA


def child(conn):
    try:
        torch.zeros(1, device="cuda")
        conn.send("no error")
    except Exception as exc:
        conn.send(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=child, args=(child_end,))
    proc.start()
    result = parent_end.recv() if parent_end.poll(60) else "no answer within 60 s"
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()
    print("RESULT " + json.dumps({
        "parent_initialised": torch.cuda.is_initialized(),
        "child": result,
        "exitcode": proc.exitcode,
    }))
"""


def test_a_forked_child_cannot_use_the_parents_cuda_without_modelpool(
    gpu: dict[str, Any],
) -> None:
    result = run_script(FORK_AFTER_CUDA_PLAIN, timeout=120)
    assert result["parent_initialised"]
    assert "Cannot re-initialize CUDA in forked subprocess" in result["child"], result


FORK_AFTER_CUDA_MODELPOOL = """
import json

import numpy as np
import torch

import modelpool
from _cuda_models import MatmulOnDevice

torch.zeros(1, device="cuda")  # the parent initialises CUDA
out = {"parent_initialised": torch.cuda.is_initialized()}

forked = modelpool.Pool(MatmulOnDevice, workers=1, start_method="fork")
try:
    forked.start()
except modelpool.UnsafeForkError as exc:
    out["refused"] = str(exc)
else:
    out["refused"] = None
    forked.shutdown()

rng = np.random.default_rng(1)
a, b = rng.standard_normal((64, 32)), rng.standard_normal((32, 16))
with modelpool.Pool(MatmulOnDevice, workers=1, devices=["cuda:0"]) as pool:
    answer = pool.predict({"a": a, "b": b})
    out["start_method"] = pool.start_method
out["worker"] = {k: answer[k] for k in ("device", "gpus", "visible", "name", "pid")}
out["max_error"] = float(np.max(np.abs(answer["y"] - a @ b)))
print("RESULT " + json.dumps(out))
"""


def test_modelpool_refuses_fork_after_cuda_and_its_default_start_works(
    gpu: dict[str, Any],
) -> None:
    result = run_script(FORK_AFTER_CUDA_MODELPOOL, timeout=150)
    assert result["parent_initialised"]
    assert result["refused"] is not None, "start_method='fork' was not refused"
    assert "start_method='fork' refused" in result["refused"]
    assert "CUDA is initialised in this process" in result["refused"]
    # the default start method (forkserver on Linux) gives a worker that computes on the GPU
    assert result["start_method"] != "fork"
    worker = result["worker"]
    assert worker["device"] == "cuda:0", result
    assert worker["gpus"] == 1
    assert worker["visible"] == "0"
    assert result["max_error"] < 1e-9, result


# --------------------------------------------------------------------------- modelpool doctor


def _doctor(*args: str) -> tuple[int, dict[str, Any]]:
    """``modelpool doctor ARGS --json``, with this environment's PYTHONPATH kept (ahead of it
    tests/), so that a modelpool importable only through PYTHONPATH is found too."""
    return run_doctor(*args, env={"PYTHONPATH": child_env()["PYTHONPATH"]})


def test_doctor_finds_cuda_initialised_at_import_for_real(gpu: dict[str, Any]) -> None:
    code, report = _doctor("_cuda_at_import:Model", "--no-frameworks")
    (fork,) = findings(report, "fork-safety")
    assert fork["level"] == "hazard", fork
    assert "importing _cuda_at_import initialises CUDA" in fork["summary"]
    assert "setup()" in fork["fix"]
    assert report["facts"]["model"]["import_cuda_initialised"] is True
    assert code == 2


def test_doctor_finds_cuda_in_setup_fine_and_sees_the_gpu(gpu: dict[str, Any]) -> None:
    _, report = _doctor("_cuda_models:MatmulOnDevice", "--no-frameworks")
    (fork,) = findings(report, "fork-safety")
    assert fork["level"] == "ok", fork  # CUDA in setup(): the worker's own, not the parent's
    model = report["facts"]["model"]
    assert model["import_cuda_initialised"] is False
    assert model["cuda_initialised"] is True
    (setup,) = findings(report, "model-setup")
    assert "CUDA is in use in the worker" in setup["detail"], setup
    assert "devices: ['cuda:0'" in setup["detail"]
    # the environment check counts the GPU's device files
    assert report["facts"]["gpu"]["devices"], report["facts"]["gpu"]
    (gpu_finding,) = findings(report, "gpu")
    assert "NVIDIA GPU(s)" in gpu_finding["summary"]
