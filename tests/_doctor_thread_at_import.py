"""A model module that starts a thread when imported (as TensorFlow's runtime, a metrics
exporter or a background loader do): a parent that imports it is no longer safe to fork."""

from __future__ import annotations

import threading
from typing import Any

import modelpool

_stop = threading.Event()
WATCHER = threading.Thread(target=_stop.wait, name="weights-refresher", daemon=True)
WATCHER.start()


class Model(modelpool.Model):
    def predict(self, inputs: Any) -> Any:
        return inputs
