"""Models the end-to-end server tests serve (imported by the server's workers)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

import modelpool


class Identity(modelpool.Model):
    """Any inputs back as outputs, renamed INPUTn -> OUTPUTn."""

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {k.replace("INPUT", "OUTPUT"): v for k, v in inputs.items()}


class Sleepy(modelpool.Model):
    """Sleeps ``seconds`` (input SECONDS, else the option), then answers its pid."""

    inputs = [modelpool.TensorSpec("SECONDS", "FP64", [-1])]
    outputs = [modelpool.TensorSpec("PID", "INT64", [-1])]

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        seconds = inputs["SECONDS"]
        time.sleep(float(seconds.max()) if seconds.size else self.seconds)
        return {"PID": np.full(seconds.shape[0], os.getpid(), np.int64)}


class Env(modelpool.Model):
    """Answers CUDA_VISIBLE_DEVICES as seen by the worker, and its slot."""

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        info = modelpool.worker_info()
        assert info is not None
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        return {
            "DEVICES": np.array([visible.encode()], dtype=object),
            "INDEX": np.array([info.index], np.int64),
        }


class Broken(modelpool.Model):
    """Fails to load."""

    def setup(self) -> None:
        raise RuntimeError("weights file /models/missing.pt not found")

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return inputs


class Buggy(modelpool.Model):
    """Raises in predict (a bug in the model: 500)."""

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("no such feature 'age'")


class Abort(modelpool.Model):
    """Aborts its worker (SIGABRT) in predict, as a failed C assertion would."""

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        os.abort()


class BadReturn(modelpool.Model):
    """Returns a list, not a dict of arrays."""

    def predict(self, inputs: dict[str, Any]) -> Any:
        return [1, 2, 3]


class Talker(modelpool.Model):
    """Logs a line about each request, and answers the request id it was given."""

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        import logging

        logging.getLogger("talker").warning("talking about this request")
        rid = modelpool.request_id() or ""
        return {"RID": np.array([rid.encode()], dtype=object)}


class Printer(modelpool.Model):
    """Prints to stdout and stderr on every request (debug prints people leave in models)."""

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        print("predict called", flush=True)
        print("a warning on stderr", file=sys.stderr, flush=True)
        return {k.replace("INPUT", "OUTPUT"): v for k, v in inputs.items()}


class Upper(modelpool.Model):
    """Text in, text out (a stand-in for a text model): each string upper-cased."""

    inputs = [modelpool.TensorSpec("text_input", "BYTES", [-1])]
    outputs = [modelpool.TensorSpec("text_output", "BYTES", [-1])]

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        words = inputs["text_input"]
        return {"text_output": np.array([w.upper() for w in words.tolist()], dtype=object)}


class Words(modelpool.Model):
    """A model that streams (a generator): one piece {"text_output": [word]} per word of its
    text, as it goes. Words that act: "slow" sleeps 0.3 s before its piece, "wait" sleeps
    60 s, "fail" raises, "crash" kills the worker, "bad" yields a piece that is not a dict,
    "log:PATH" makes PATH get a line per piece ("yielded WORD") and "finally" at the end."""

    inputs = [modelpool.TensorSpec("text_input", "BYTES", [-1])]
    outputs = [modelpool.TensorSpec("text_output", "BYTES", [1])]

    def predict(self, inputs: dict[str, Any]) -> Any:
        words = " ".join(
            w.decode() if isinstance(w, bytes) else str(w) for w in inputs["text_input"].tolist()
        ).split()
        log = next((w[4:] for w in words if w.startswith("log:")), "")

        def note(text: str) -> None:
            if log:
                with open(log, "a") as f:
                    f.write(text + "\n")

        try:
            for word in words:
                if word.startswith("log:"):
                    continue
                if word == "slow":
                    time.sleep(0.3)
                elif word == "wait":
                    time.sleep(60)
                elif word == "fail":
                    raise ValueError("the model failed at the word 'fail'")
                elif word == "crash":
                    os._exit(9)
                elif word == "bad":
                    yield 42
                    continue
                note(f"yielded {word}")
                yield {"text_output": np.array([word], dtype=object)}
        finally:
            note("finally")


class Tagged(modelpool.Model):
    """Answers its ``tag`` option (and pid) for every row: which version served a request."""

    def __init__(self, tag: float = 0.0) -> None:
        self.tag = tag

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        rows = next(iter(inputs.values())).shape[0]
        return {"TAG": np.full(rows, self.tag), "PID": np.full(rows, os.getpid(), np.int64)}
