"""An ONNX model served by a modelpool.Pool, with ONNX Runtime.

Run it with ``python examples/onnx_model.py`` (needs ``pip install onnx onnxruntime``). The
example writes its own tiny model file (a linear layer and a ReLU) so that nothing is
downloaded; a real deployment points ``path`` at its exported ``.onnx`` file.

ONNX Runtime reads no thread variable: left alone, every session starts one thread per core,
so N workers on N cores run N x N threads. In a modelpool worker, each session made without
its own ``intra_op_num_threads`` gets the worker's thread budget instead.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

import modelpool


class OnnxModel(modelpool.Model):
    """Any single-input, single-output ONNX graph; ``path`` is a model option."""

    inputs = [modelpool.TensorSpec("x", "FP32", [-1, 4])]
    outputs = [modelpool.TensorSpec("y", "FP32", [-1, 3])]

    def setup(self) -> None:
        import onnxruntime as ort  # imported in the worker, where the thread budget applies

        self.session = ort.InferenceSession(
            self.options["path"], providers=["CPUExecutionProvider"]
        )

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        (y,) = self.session.run(None, {"x": inputs["x"]})
        return {"y": y}


def session_threads() -> str:
    """Runs in a worker through Pool.submit: the budget its session got."""
    session = modelpool.current_model().session
    intra = session.get_session_options().intra_op_num_threads
    return f"worker {modelpool.worker_info().index}: {intra} intra-op thread(s)"


def write_model(path: str) -> np.ndarray:
    """Write y = relu(x @ w) as an ONNX file; return w, to check the answers."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "example",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return w


if __name__ == "__main__":  # required: workers re-import this file when they start
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        w = write_model(path)
        x = np.array([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.0, 1.0, 0.5]], dtype=np.float32)
        with modelpool.Pool(OnnxModel, workers=2, options={"path": path}) as pool:
            y = pool.predict({"x": x})["y"]
            print("y =", np.round(y, 3).tolist())
            print("matches NumPy:", bool(np.allclose(y, np.maximum(x @ w, 0), atol=1e-6)))
            print(pool.submit(session_threads).result())
