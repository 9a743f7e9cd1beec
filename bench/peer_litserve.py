"""LitServe serving the small MLP (runs in the litserve venv that ``peers.py`` builds; its
workers import this module, so the API class lives at module level)."""

from __future__ import annotations

import sys

import litserve as ls
import numpy as np
from mlp_weights import mlp_weights

PATH = "/v2/models/mlp/infer"


class MLPAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.w1, self.w2 = mlp_weights()

    def decode_request(self, request: dict) -> np.ndarray:
        tensor = request["inputs"][0]
        return np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])

    def batch(self, inputs: list) -> np.ndarray:
        return np.concatenate(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ self.w1, 0) @ self.w2

    def unbatch(self, y: np.ndarray) -> list:
        return [row[None] for row in y]

    def encode_response(self, y: np.ndarray) -> dict:
        out = {"name": "y", "datatype": "FP32", "shape": list(y.shape)}
        return {"model_name": "mlp", "outputs": [{**out, "data": y.reshape(-1).tolist()}]}


def main(port: int, batch: int, delay: float, workers: int) -> None:
    api = MLPAPI(max_batch_size=batch, batch_timeout=delay if batch > 1 else 0.0, api_path=PATH)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=workers)
    server.run(port=port, host="127.0.0.1", generate_client_file=False)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
