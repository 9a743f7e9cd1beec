"""ONNX Runtime served by modelpool: a small graph the test writes (nothing downloaded), in a
Pool and behind ``modelpool serve``, with the worker's thread budget reaching ORT's intra-op
pool (ORT reads no thread variable: by default each session sizes its pool to the cores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import _onnx_sklearn_models as m
import modelpool
from _deps import need_module
from _scripts import run_script
from modelpool import _hygiene


def test_a_plain_session_sizes_its_pool_to_every_core(tmp_path: Path) -> None:
    """The control: without modelpool, each process's session starts one intra-op thread per
    core (less the caller's), so N workers on N cores run N x N threads."""
    need_module("onnxruntime")
    need_module("onnx")
    path = m.make_onnx(tmp_path / "tiny.onnx")
    result = run_script(
        """
        import json, os, sys
        import onnxruntime as ort
        before = len(os.listdir("/proc/self/task"))
        session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
        started = len(os.listdir("/proc/self/task")) - before
        print("RESULT " + json.dumps({"started": started}))
        """,
        str(path),
        timeout=60,
    )
    cores = _hygiene.usable_cores()
    assert result["started"] == cores - 1  # (2 cores here: 1 thread beside the caller's)


def test_served_from_a_pool_with_the_workers_thread_budget(tmp_path: Path) -> None:
    need_module("onnxruntime")
    need_module("onnx")
    path = m.make_onnx(tmp_path / "tiny.onnx")
    x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    with modelpool.Pool(m.OnnxMLP, workers=2, options={"path": str(path)}) as pool:
        assert pool.threads_per_worker == max(1, _hygiene.usable_cores() // 2)
        out = pool.predict({"x": x})
        np.testing.assert_allclose(out["y"], m.reference(x), rtol=1e-6, atol=1e-6)
        threads = pool.submit(m.onnx_threads).result(timeout=30)
    # the budget, not ORT's default of every core
    assert threads["intra_op"] == pool.threads_per_worker
    assert threads["threads_started"] == pool.threads_per_worker - 1


def test_the_budget_yields_to_a_number_the_session_options_set(tmp_path: Path) -> None:
    need_module("onnxruntime")
    need_module("onnx")
    path = m.make_onnx(tmp_path / "tiny.onnx")
    result = run_script(
        """
        import json, os, sys
        import onnxruntime as ort
        from modelpool import _hygiene

        def started(**kw):
            before = len(os.listdir("/proc/self/task"))
            session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"], **kw)
            opts = session.get_session_options()
            return [len(os.listdir("/proc/self/task")) - before, opts.intra_op_num_threads]

        _hygiene.limit_onnxruntime(ort, 1)
        _hygiene.limit_onnxruntime(ort, 1)  # (twice: patched once)
        two = ort.SessionOptions()
        two.intra_op_num_threads = 2
        print("RESULT " + json.dumps({
            "default": started(),
            "explicit": started(sess_options=two),
        }))
        """,
        str(path),
        timeout=60,
    )
    assert result["default"] == [0, 1]  # the budget: no thread beside the caller's
    assert result["explicit"] == [1, 2]  # the session's own number wins


def test_served_over_http(tmp_path: Path) -> None:
    need_module("onnxruntime")
    need_module("onnx")
    httpclient = need_module("tritonclient.http")
    from server._serving import ServerProcess

    path = m.make_onnx(tmp_path / "tiny.onnx")
    config = {
        "models": {
            "tiny": {
                "model": "_onnx_sklearn_models:OnnxMLP",
                "workers": 1,
                "options": {"path": str(path)},
            }
        }
    }
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    with ServerProcess(config=config, tmp=tmp_path) as server:
        client = httpclient.InferenceServerClient(server.host_port)
        try:
            given = httpclient.InferInput("x", [2, 4], "FP32")
            given.set_data_from_numpy(x, binary_data=True)
            answer = client.infer("tiny", [given])
            np.testing.assert_allclose(answer.as_numpy("y"), m.reference(x), rtol=1e-6)
        finally:
            client.close()
