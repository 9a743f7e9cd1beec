"""MLServer serving the small MLP (runs in the mlserver venv that ``peers.py`` builds, named
by its model-settings.json as ``peer_mlserver.MLPModel``)."""

from __future__ import annotations

import numpy as np
from mlp_weights import mlp_weights
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class MLPModel(MLModel):
    async def load(self) -> bool:
        self.w1, self.w2 = mlp_weights()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        y = np.maximum(x @ self.w1, 0) @ self.w2
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("y", y)])
