"""Models and functions that make a call fail in one particular way, for tests/test_exceptions.py.
Importable by workers (tests/ is on sys.path under pytest).

``predict_here`` runs the worker's model on its inputs through ``modelpool.current_model()``, so
one model fails the same way whether it is reached by ``predict`` or by ``submit`` / ``map``.
"""

from __future__ import annotations

import gc
from typing import Any

import modelpool
from modelpool import _transport
from modelpool._worker import OK


def predict_here(inputs: Any) -> Any:
    """For ``submit`` / ``map``: what ``predict(inputs)`` would do, in the worker."""
    return modelpool.current_model().predict(inputs)


def _own_channel() -> _transport.Channel:
    """This worker's connection to its pool (the worker loop holds it in a local variable)."""
    (channel,) = [o for o in gc.get_objects() if isinstance(o, _transport.Channel)]
    return channel


class Meddler(modelpool.Model):
    """Writes to its own worker's connection behind the worker loop's back, then answers
    ``"ok"``: ``"wrong id"`` first sends an answer to a request that does not exist, ``"garbage"``
    a message that is not ``(kind, id, payload)``. Otherwise it answers as ``Echo`` does."""

    def predict(self, inputs: Any) -> Any:
        if inputs == "wrong id":
            _own_channel().send((OK, 10**9, "the answer to some other request"))
        elif inputs == "garbage":
            _own_channel().send("not a (kind, id, payload) message")
        elif inputs == "unreadable answer":
            return OnlyInWorkers()
        else:
            return inputs
        return "ok"


def _rebuild_in_workers_only() -> OnlyInWorkers:
    if modelpool.worker_info() is None:
        raise ModuleNotFoundError("No module named 'only_in_workers' (installed in workers only)")
    return OnlyInWorkers()


def _rebuild_in_caller_only() -> OnlyInCaller:
    if modelpool.worker_info() is not None:
        raise ModuleNotFoundError("No module named 'only_in_caller' (missing in the workers)")
    return OnlyInCaller()


class OnlyInWorkers:
    """Pickles anywhere; unpickles only in a worker (its class "cannot be imported" outside)."""

    def __reduce__(self) -> Any:
        return (_rebuild_in_workers_only, ())


class OnlyInCaller:
    """Pickles anywhere; unpickles only outside workers (the workers "cannot import" it)."""

    def __reduce__(self) -> Any:
        return (_rebuild_in_caller_only, ())
