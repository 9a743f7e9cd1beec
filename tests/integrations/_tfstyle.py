"""A model built like TensorFlow's: importing the module starts a runtime with its own threads.

Work is handed to the runtime's thread and waited for. Forked after the import, a child gets
the runtime's state but not its thread, so the first ``predict`` waits forever: the
"Keras predict hangs in a Celery prefork worker" trap (keras#12531, tensorflow#27074).
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import Any

import numpy as np

# created at import, warmed up: the pool's thread now exists and waits for work
RUNTIME = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tfstyle-runtime")
RUNTIME.submit(int).result()


class Model:
    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        x = np.asarray(inputs["x"])
        return {"y": RUNTIME.submit(np.multiply, x, 3).result(timeout=30)}
