"""A scikit-learn pipeline served by a modelpool.Pool.

Run it with ``python examples/sklearn_model.py`` (needs ``pip install scikit-learn``). The
example fits and saves its own small classifier with joblib, so that nothing is downloaded; a
real deployment points ``path`` at its saved pipeline.

Load the pipeline in ``setup()``, in the worker: scikit-learn's OpenMP and BLAS pools then
start there, within the worker's thread budget, and the parent stays safe to fork.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

import modelpool


class SklearnModel(modelpool.Model):
    """A fitted pipeline saved with joblib; ``path`` is a model option."""

    inputs = [modelpool.TensorSpec("features", "FP64", [-1, 2])]
    outputs = [
        modelpool.TensorSpec("label", "INT64", [-1]),
        modelpool.TensorSpec("probability", "FP64", [-1]),
    ]

    def setup(self) -> None:
        import joblib

        self.pipeline = joblib.load(self.options["path"])

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        x = inputs["features"]
        return {
            "label": self.pipeline.predict(x).astype(np.int64),
            "probability": self.pipeline.predict_proba(x).max(axis=1),
        }


def fit_and_save(path: str) -> Any:
    """Fit a scaler + logistic regression on two generated clusters; save it to ``path``."""
    import joblib
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(-2, 1, size=(50, 2)), rng.normal(2, 1, size=(50, 2))])
    y = np.repeat([0, 1], 50)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y)
    joblib.dump(pipeline, path)
    return pipeline


if __name__ == "__main__":  # required: workers re-import this file when they start
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "classifier.joblib")
        fitted = fit_and_save(path)
        points = np.array([[-2.5, -1.0], [0.1, 0.2], [3.0, 2.0]])
        with modelpool.Pool(SklearnModel, workers=2, options={"path": path}) as pool:
            out = pool.predict({"features": points})
        for point, label, p in zip(points, out["label"], out["probability"], strict=True):
            print(f"{point.tolist()} -> class {label} (p={p:.2f})")
        print("matches the fitted pipeline:", bool((out["label"] == fitted.predict(points)).all()))
