"""An HTTP inference request handled whole in a worker.

The server's front process does no tensor work: it hands a request's body bytes (and its
``Inference-Header-Content-Length``) to a worker, which decodes them, checks the inputs
against the model's declared ones, predicts and encodes the answer's bytes. What goes back is
an ``Answer`` tuple, cheap to pickle:

* ``(200, body, json_length, body_id)``: the answer's bytes (``json_length``: the
  ``Inference-Header-Content-Length`` of a binary answer, else None);
* ``(400 | 413, message, None, body_id)``: the request was malformed (the codec's message)
  or its inputs do not fit the model (the same words the front used to answer with);
* ``(BAD_OUTPUTS, message, None, body_id)``: ``predict`` returned something that cannot be
  answered (a 500 the front logs as the model's fault).

An exception raised by ``predict`` is not an answer: it travels as it does for ``Pool.predict``
and the front words it (``server._errors``). ``body_id`` is the body's ``id`` (None when it
has none), which the front adopts as the request id under the same rule as before.

Large bodies travel out of band (through the pool's shared memory) both ways.
"""

from __future__ import annotations

import pickle
from typing import Any

from . import _logs, _protocol, _shm
from ._exceptions import BodyTooLarge, CodecError, InputValidationError, UnsupportedDatatypeError
from ._model import check_rows, declared, normalize_inputs

__all__ = ["BAD_OUTPUTS", "Answer", "handle", "request_payload"]

#: the status of an answer whose outputs the model got wrong (a 500, logged)
BAD_OUTPUTS = -1

Answer = tuple[int, Any, int | None, str | None]


def _out_of_band(data: Any) -> Any:
    """Bytes big enough for shared memory travel as a buffer, not inside the pickle."""
    if len(data) >= _shm.THRESHOLD:
        return pickle.PickleBuffer(data)
    return data


def request_payload(
    name: str,
    version: str | None,
    body: bytes,
    header_length: int | None,
    tag: str | None,
    adopt_id: bool,
) -> tuple[Any, ...]:
    """What the front sends: ``adopt_id`` says whether the body's ``id`` may become the
    request id (no header gave one)."""
    return (name, version, _out_of_band(body), header_length, tag, adopt_id)


def handle(model: Any, payload: tuple[Any, ...]) -> Answer:
    """Decode, check, predict, encode (in the worker). ``predict``'s exceptions propagate."""
    name, version, body, header_length, tag, adopt_id = payload
    try:
        decoded = _protocol.decode_infer_request(body, header_length)
    except BodyTooLarge as exc:
        return (413, str(exc), None, None)
    except CodecError as exc:
        return (400, str(exc), None, None)
    body_id = decoded.id
    rid = tag
    if adopt_id and body_id is not None and _logs.usable_request_id(body_id):
        rid = body_id
        _logs.REQUEST_ID.set(rid)  # the model's log lines carry it (reset by the caller)
    specs, limit = declared(type(model))
    try:
        inputs = normalize_inputs(decoded.inputs, specs, name)
        check_rows(inputs, limit, name)
    except InputValidationError as exc:
        return (400, f"model {name!r}: {exc.problem or exc}", None, body_id)
    outputs = model.predict(inputs)
    if not isinstance(outputs, dict) or not all(isinstance(k, str) for k in outputs):
        what = f"{type(outputs).__name__}, but predict() must return a dict of output name -> array"
        return (BAD_OUTPUTS, what, None, body_id)
    try:
        data, json_length = _protocol.encode_infer_response(
            name, version, body_id or rid, outputs, decoded
        )
    except CodecError as exc:
        return (400, str(exc), None, body_id)
    except UnsupportedDatatypeError as exc:
        return (BAD_OUTPUTS, str(exc), None, body_id)
    return (200, _out_of_band(data), json_length, body_id)
