"""Real TensorFlow (``tensorflow-cpu``) with Keras: the prefork hang reproduced without
modelpool, then the same parent served by ``modelpool.Pool`` and ``modelpool serve``; the
worker's thread budget reaching TensorFlow's pools. (Through Celery:
integrations/test_celery_tensorflow.py.)

Importing TensorFlow takes seconds and its runtime must not start in the test process (later
tests fork it), so the parent is a fresh interpreter, run once for the module (``parent``).
The model's weights are fixed: the expected answer is NumPy's (``_tf_models.reference``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import _tf_models as m
from _deps import need_module
from _scripts import RESULT, ROOT, run_python, run_script
from modelpool import _hygiene

#: the tests of one parent run on one xdist worker, so that the parent (seconds of TensorFlow)
#: runs once; the others are spread over the workers like any test
one_parent = pytest.mark.xdist_group("tensorflow-parent")

#: how long a forked child may take for one tiny predict() before it counts as hung (it takes
#: about 0.2 s on this machine when it works)
HUNG_AFTER = 10.0

PARENT = f"""
import json, multiprocessing, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
import modelpool, _tf_models as m

x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
model = m.build()                       # a Keras model built and used in this process
out = {{"parent": m.tf_threads(),
       "parent_ok": bool(np.allclose(model.predict(x, verbose=0), m.reference(x), atol=1e-5))}}

def child():
    model.predict(x, verbose=0)         # the model the child inherited

fork = multiprocessing.get_context("fork")  # what Celery's prefork pool does
proc = fork.Process(target=child)
proc.start()
proc.join({HUNG_AFTER})
out["control_hung"] = proc.is_alive()
if proc.is_alive():
    proc.kill()
    proc.join()
out["control_exit"] = proc.exitcode

options = {{"path": sys.argv[1]}}
try:
    modelpool.Pool(m.KerasModel, options=options, start_method="fork").start()
except modelpool.UnsafeForkError as exc:
    out["fork_refused"] = str(exc)
with modelpool.Pool(m.KerasModel, workers=2, options=options, timeout=60) as pool:
    answer = pool.predict({{"x": x}})
    out["pool_ok"] = bool(np.allclose(answer["y"], m.reference(x), atol=1e-5))
    out["start_method"] = pool.start_method
    out["budget"] = pool.threads_per_worker
    out["worker"] = pool.submit(m.tf_threads).result(timeout=60)
print({RESULT!r} + json.dumps(out))
"""


@pytest.fixture(scope="module")
def keras_file(shared_tmp: Path) -> Path:
    need_module("tensorflow")
    return m.saved_keras(shared_tmp)


@pytest.fixture(scope="module")
def parent(keras_file: Path) -> dict[str, Any]:
    """A fresh interpreter that built and used a Keras model, then forked a child by hand
    (the control), asked for a fork pool, and served the model from a default pool."""
    result: dict[str, Any] = run_script(PARENT, str(keras_file), timeout=240)
    assert result["parent_ok"], "the parent's own Keras model computes the reference"
    return result


@one_parent
def test_keras_used_in_the_parent_hangs_a_forked_child_without_modelpool(
    parent: dict[str, Any],
) -> None:
    """The control: the child's first predict() waits for TensorFlow's runtime threads, which
    the fork did not copy, and never returns."""
    assert parent["control_hung"], f"the forked child exited ({parent['control_exit']})"


@one_parent
def test_a_fork_pool_is_refused_naming_tensorflow(parent: dict[str, Any]) -> None:
    message = parent["fork_refused"]
    assert "start_method='fork' refused" in message
    assert "TensorFlow's runtime has started in this process" in message
    assert "import TensorFlow only where the model loads" in message
    assert "forkserver" in message


@one_parent
def test_the_same_parent_serves_the_model_from_a_default_pool(parent: dict[str, Any]) -> None:
    assert parent["start_method"] == "forkserver"
    assert parent["pool_ok"], "the workers compute the reference"


@one_parent
def test_the_workers_thread_budget_reaches_tensorflow(parent: dict[str, Any]) -> None:
    """TensorFlow sizes its pools to the cores by default (the parent: one inter-op thread,
    ``tf_Compute``, per core); a worker's follow its budget: intra-op the budget, inter-op
    1 (2 from a budget of 2)."""
    cores = _hygiene.usable_cores()
    assert parent["parent"]["tf_compute"] == cores
    budget = parent["budget"]
    assert budget == max(1, cores // 2)
    worker = parent["worker"]
    assert worker["intra_op"] == budget
    assert worker["inter_op"] == min(budget, 2)
    assert worker["tf_compute"] == min(budget, 2)


def _client_infer(server: Any, x: np.ndarray) -> np.ndarray:
    httpclient = need_module("tritonclient.http")
    client = httpclient.InferenceServerClient(server.host_port)
    try:
        given = httpclient.InferInput("x", list(x.shape), "FP32")
        given.set_data_from_numpy(x, binary_data=True)
        return np.asarray(client.infer("keras", [given]).as_numpy("y"))
    finally:
        client.close()


def test_served_with_the_model_loaded_at_module_level(
    keras_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``modelpool serve`` on a module that loads its Keras model at import: the front process
    imports it (TensorFlow's runtime starts there), and the workers, started fresh, answer
    ``tritonclient`` with the reference."""
    need_module("tritonclient.http")
    from server._serving import ServerProcess

    monkeypatch.setenv("MODELPOOL_TEST_KERAS", str(keras_file))
    config = {"models": {"keras": {"model": "_tf_module_level:ModuleLevelKeras", "workers": 1}}}
    x = np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)
    server = ServerProcess(config=config, tmp=tmp_path)
    try:
        server.wait_ready(timeout=120)  # (TensorFlow loads in the front and in the worker)
        np.testing.assert_allclose(_client_infer(server, x), m.reference(x), atol=1e-5)
    finally:
        server.stop()


def test_serve_refuses_fork_after_the_module_started_tensorflow(
    keras_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same module with ``start_method: fork``: the server does not start (no worker
    would ever answer), and says why and what to do."""
    from server._serving import ServerProcess

    monkeypatch.setenv("MODELPOOL_TEST_KERAS", str(keras_file))
    model = {"model": "_tf_module_level:ModuleLevelKeras", "start_method": "fork"}
    server = ServerProcess(config={"models": {"keras": model}}, tmp=tmp_path)
    try:
        code = server.proc.wait(timeout=120)
    finally:
        server.stop()
    assert code != 0
    assert "TensorFlow's runtime has started in this process" in server.output
    assert "Press Ctrl+C to stop." not in server.output


def test_example_tensorflow_model() -> None:
    """examples/tensorflow_model.py runs as a user runs it, and says what it promises."""
    need_module("tensorflow")
    out, err = run_python(
        [str(ROOT / "examples" / "tensorflow_model.py")], timeout=240, cwd=ROOT / "examples"
    )
    assert "matches the model run in this process: True" in out, out + err
    assert "start_method='fork' refused: TensorFlow's runtime has started" in out, out + err
