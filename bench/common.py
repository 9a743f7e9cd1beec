"""Functions and models the benchmark's worker processes import (bench/ is on their path)."""

from __future__ import annotations

from typing import Any

import modelpool


def noop(x: Any) -> Any:
    return x


def echo_pipe(conn: Any) -> None:
    """The floor for a small call: a bare multiprocessing Pipe ping-pong."""
    while True:
        data = conn.recv_bytes()
        if not data:
            return
        conn.send_bytes(data)


class Identity(modelpool.Model):
    def predict(self, inputs: Any) -> Any:
        return inputs
