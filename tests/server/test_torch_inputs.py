"""torch on what the server delivers: a model doing ``torch.from_numpy`` and an in-place op on
its inputs, with warnings as errors in the worker, called by tritonclient with inputs that are
read-only in the caller (``np.frombuffer``, and the arrays tritonclient's ``as_numpy``
returns, fed back in). The Celery task's side: integrations/test_celery_torch.py; a pool's
(``Pool.predict``, ``submit``): test_hazards.py, H7."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from _serving import ServerProcess

from _deps import need_module
from _scripts import RESULT, run_script

MODEL = "inplace"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    need_module("torch")
    config = {"models": {MODEL: {"model": "_torch_cv_models:TorchInPlace", "workers": 1}}}
    with ServerProcess(config=config, tmp=tmp_path_factory.mktemp("torch")) as server:
        yield server


def test_control_the_model_fails_on_a_read_only_array() -> None:
    """Control: the served model, fed a read-only array directly (no pool, no server), fails
    with torch's warning raised as an error. Runs in a fresh interpreter: torch warns once
    per process."""
    need_module("torch")
    code = f"""
    import json, _torch_cv_models as m
    print({RESULT!r} + json.dumps(m.torch_warns_on_read_only()))
    """
    message = run_script(code, timeout=60)
    assert "not writable" in message or "non-writable" in message, message


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_read_only_inputs_arrive_writable(server: ServerProcess, binary: bool) -> None:
    """A read-only ``np.frombuffer`` input, then the (read-only, in binary mode) array
    ``as_numpy`` returned, fed back in: the model's ``torch.from_numpy`` raises no warning,
    its in-place add gives x + 1, then x + 2; the caller's bytes stay as they were."""
    httpclient = need_module("tritonclient.http")
    raw = np.arange(8, dtype=np.float32).tobytes()
    x = np.frombuffer(raw, dtype=np.float32).reshape(2, 4)
    assert not x.flags.writeable
    client = httpclient.InferenceServerClient(server.host_port)

    def infer(array: np.ndarray) -> tuple[np.ndarray, bool]:
        item = httpclient.InferInput("x", list(array.shape), "FP32")
        item.set_data_from_numpy(array, binary_data=binary)
        outputs = [
            httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("y", "writable")
        ]
        result = client.infer(MODEL, [item], outputs=outputs)
        return result.as_numpy("y"), bool(result.as_numpy("writable")[0])

    try:
        y, writable = infer(x)
        assert writable, "the input arrived read-only in the worker"
        np.testing.assert_array_equal(y, x + 1)
        if binary:
            assert not y.flags.writeable  # tritonclient's as_numpy: a view of the response
        y2, writable = infer(y)
        assert writable
        np.testing.assert_array_equal(y2, x + 2)
    finally:
        client.close()
    assert raw == np.arange(8, dtype=np.float32).tobytes()
    assert "Traceback" not in server.output, server.output
