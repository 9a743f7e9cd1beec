"""Built-in demo models that need no download and no torch.

``IrisClassifier`` classifies iris flowers from four measurements (sepal length, sepal width,
petal length, petal width, in cm) by their distance to the mean of each species in Fisher's
Iris data set (the class means are the data it ships). It answers softmax probabilities.
``Words`` streams: the words of a text, one piece each (a stand-in for a text generator).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ._model import Model, TensorSpec

__all__ = ["MODEL", "SPECIES", "IrisClassifier", "Words"]

#: The demo model's import string: what ``modelpool demo`` runs and a bare ``modelpool serve``
#: serves (the server, the YAML examples and the deploy manifests name it so).
MODEL = "modelpool.demo:IrisClassifier"

SPECIES = ("setosa", "versicolor", "virginica")

#: Per-species means of Fisher's Iris data (cm): sepal length, sepal width, petal length/width.
_MEANS = np.array(
    [
        [5.006, 3.428, 1.462, 0.246],
        [5.936, 2.770, 4.260, 1.326],
        [6.588, 2.974, 5.552, 2.026],
    ],
    dtype=np.float32,
)


class IrisClassifier(Model):
    """Nearest-class-mean classifier over the Iris species, with softmax confidences."""

    inputs = [TensorSpec("INPUT0", "FP32", [-1, 4])]
    outputs = [TensorSpec("PROBABILITIES", "FP32", [-1, 3]), TensorSpec("LABEL", "INT64", [-1])]

    def setup(self) -> None:
        self.means = _MEANS.copy()

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["INPUT0"]
        d2 = ((x[:, None, :] - self.means[None, :, :]) ** 2).sum(axis=-1)
        logits = -d2
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        return {"PROBABILITIES": p.astype(np.float32), "LABEL": p.argmax(axis=1).astype(np.int64)}


class Words(Model):
    """A demo of a model that streams (its ``predict`` is a generator): the words of its text,
    one piece each, ``pause`` seconds apart (option; default 0.1), as a text model yields
    tokens. Serve it with ``modelpool serve modelpool.demo:Words --name words`` and read it with
    ``curl -N .../v2/models/words/generate_stream -d '{"text_input": "one two three"}'``."""

    inputs = [TensorSpec("text_input", "BYTES", [-1])]
    outputs = [TensorSpec("text_output", "BYTES", [1])]

    def __init__(self, pause: float = 0.1) -> None:
        self.pause = float(pause)

    def predict(self, inputs: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        import time

        text = " ".join(
            w.decode() if isinstance(w, bytes) else str(w) for w in inputs["text_input"].tolist()
        )
        for i, word in enumerate(text.split()):
            if i and self.pause:
                time.sleep(self.pause)
            yield {"text_output": np.array([word], dtype=object)}
