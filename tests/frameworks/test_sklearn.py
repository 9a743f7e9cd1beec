"""scikit-learn served by modelpool: a pipeline the test fits and saves with joblib (nothing
downloaded), in a Pool and behind ``modelpool serve``, with its OpenMP pool held to the
worker's thread budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import _onnx_sklearn_models as m
import modelpool
from _deps import need_module


def test_served_from_a_pool_as_fitted(tmp_path: Path) -> None:
    need_module("sklearn")
    joblib = need_module("joblib")
    path = m.make_sklearn(tmp_path / "classifier.joblib")
    fitted = joblib.load(path)
    x, _ = m.iris_like(n=20, seed=7)
    with modelpool.Pool(
        m.SklearnClassifier, workers=2, threads_per_worker=1, options={"path": str(path)}
    ) as pool:
        out = pool.predict({"x": x})
        pools = pool.submit(m.openmp_threads).result(timeout=30)
    np.testing.assert_array_equal(out["label"], fitted.predict(x))
    np.testing.assert_allclose(out["proba"], fitted.predict_proba(x), rtol=1e-12)
    assert pools, "scikit-learn's OpenMP runtime is not loaded in the worker"
    assert set(pools) == {1}  # every OpenMP pool at the budget


def test_served_over_http(tmp_path: Path) -> None:
    need_module("sklearn")
    joblib = need_module("joblib")
    from server._serving import ServerProcess

    path = m.make_sklearn(tmp_path / "classifier.joblib")
    fitted = joblib.load(path)
    config = {
        "models": {
            "classifier": {
                "model": "_onnx_sklearn_models:SklearnClassifier",
                "workers": 1,
                "options": {"path": str(path)},
            }
        }
    }
    x, _ = m.iris_like(n=3, seed=11)
    with ServerProcess(config=config, tmp=tmp_path) as server:
        client = modelpool.Client(server.url)
        try:
            out = client.infer("classifier", {"x": x})
        finally:
            client.close()
    np.testing.assert_array_equal(out["label"], fitted.predict(x))
    np.testing.assert_allclose(out["proba"], fitted.predict_proba(x), rtol=1e-12)
