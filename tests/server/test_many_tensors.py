"""A request with thousands of small tensors goes through whole (it used to fail in the
transport with a bare OSError that the server blamed on the model)."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

from _serving import ServerProcess


def test_ten_thousand_inputs_to_a_model_that_declares_none(tmp_path: Path) -> None:
    n = 10_000
    tensors = [
        {"name": f"INPUT{i}", "datatype": "FP32", "shape": [1, 2], "data": [i, -i]}
        for i in range(n)
    ]
    config = {"models": {"identity": {"model": "_server_models:Identity", "workers": 1}}}
    with ServerProcess(config=config, tmp=tmp_path) as server:
        conn = http.client.HTTPConnection(server.host_port, timeout=60)
        try:
            conn.request("POST", "/v2/models/identity/infer", json.dumps({"inputs": tensors}))
            response = conn.getresponse()
            status, body = response.status, response.read()
        finally:
            conn.close()
    assert status == 200, body[:500]
    outputs = {o["name"]: o for o in json.loads(body)["outputs"]}
    assert len(outputs) == n
    assert outputs[f"OUTPUT{n - 1}"]["data"] == [n - 1, -(n - 1)]
