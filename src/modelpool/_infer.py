"""An HTTP inference request handled whole in a worker.

The server's front process does no tensor work: it hands a request's body bytes (and its
``Inference-Header-Content-Length``) to a worker, which decodes them, checks the inputs
against the model's declared ones, predicts and encodes the answer's bytes. What goes back is
an ``Answer`` tuple, cheap to pickle:

* ``(200, body, json_length, body_id, rows)``: the answer's bytes (``json_length``: the
  ``Inference-Header-Content-Length`` of a binary answer, else None) and the rows the request
  had (its inputs' first dimension; an API key's usage counts them);
* ``(400 | 413, message, None, body_id, 0)``: the request was malformed (the codec's
  message) or its inputs do not fit the model (the same words the front used to answer with);
* ``(BAD_OUTPUTS, message, None, body_id, 0)``: ``predict`` returned something that cannot
  be answered (a 500 the front logs as the model's fault).

An exception raised by ``predict`` is not an answer: it travels as it does for ``Pool.predict``
and the front words it (``server._errors``). ``body_id`` is the body's ``id`` (None when it
has none), which the front adopts as the request id under the same rule as before.

Large bodies travel out of band (through the pool's shared memory) both ways.

A gRPC ``ModelInferRequest`` travels the same way, as its serialized bytes, with the header
length ``GRPC``: the worker decodes it with ``_grpc_codec`` and answers a serialized
``ModelInferResponse`` (the statuses above keep their meaning; the front maps them to gRPC
codes).
"""

from __future__ import annotations

import inspect
import pickle
from typing import Any

import orjson

from . import (
    _batching,
    _generate,
    _grpc_codec,
    _logs,
    _plain,
    _protocol,
    _shm,
    _streaming,
    _transport,
)
from ._exceptions import (
    BatchError,
    BodyTooLarge,
    CodecError,
    InputValidationError,
    UnsupportedDatatypeError,
)
from ._model import check_rows, declared, normalize_inputs

__all__ = [
    "BAD_OUTPUTS",
    "GENERATE",
    "GRPC",
    "SIGNATURE",
    "Answer",
    "handle",
    "handle_batch",
    "request_payload",
    "stream",
]

#: the status of an answer whose outputs the model got wrong (a 500, logged)
BAD_OUTPUTS = -1
#: the header length that marks a body as a serialized gRPC ModelInferRequest
GRPC = -1
#: the header length that marks a body as a request of Triton's generate extension
GENERATE = -2

Answer = tuple[int, Any, int | None, str | None, int]

#: the batching key of every request sent as its bytes: the pool cannot see their inputs, so
#: the worker that runs them groups the compatible ones (``handle_batch``)
SIGNATURE: _batching.Signature = (("<infer>", "", ()),)


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
    doc = _json_of(payload)
    if doc is not None and (answer := _handle_plain(model, payload, doc)) is not None:
        return answer
    read = _read(model, payload, doc)
    if not isinstance(read, _Read):
        return read
    return _encode(read, model.predict(read.inputs))


def stream(
    channel: Any, rid: int, model: Any, payload: tuple[Any, ...], ok: int
) -> tuple[int, int, Any]:
    """A request to a model that streams (``STREAM_INFER``): each item ``predict`` yields
    goes back as an encoded ``Answer`` piece as it comes (``_streaming.run_stream``); the
    final answer's result is None, or the ``Answer`` of a request that could not be run, or
    (gRPC, when the request asks for it) an empty last answer. An item that cannot be
    encoded is a last, non-200 piece. gRPC pieces are whole ``ModelStreamInferResponse``s.
    ``predict``'s exceptions propagate."""
    read = _read(model, payload)
    if not isinstance(read, _Read):
        return (ok, rid, read)
    grpc = read.kind == GRPC
    outputs = model.predict(read.inputs)
    once = not _streams(outputs)  # a plain answer: its one piece is the last (gRPC says so)

    def encode(item: Any) -> tuple[Answer, bool]:
        answer = _encode(read, item, streaming=True)
        if answer[0] != 200:
            return answer, True
        if grpc:  # a whole ModelStreamInferResponse
            data = _grpc_codec.stream_answer(bytes(answer[1]), final=once)
            answer = (200, data, None, answer[3], answer[4])
        return answer, False

    reply = _streaming.run_stream(channel, rid, outputs, ok, encode)
    if grpc and not once and read.decoded.parameters.get("triton_enable_empty_final_response"):
        body_id = read.decoded.id
        empty = _grpc_codec.empty_response(read.name, read.version, body_id or read.rid)
        return (ok, rid, (200, _grpc_codec.stream_answer(empty), None, body_id, 0))
    return reply


def _json_of(payload: tuple[Any, ...]) -> Any:
    """The parsed body of a REST request that is all JSON (parsed once, whichever path takes
    it); None for any other, or one orjson cannot read (the general path words why, or reads
    what only the standard library reads)."""
    if payload[3] is not None:
        return None
    try:
        return orjson.loads(payload[2])
    except orjson.JSONDecodeError:
        return None


def _handle_plain(model: Any, payload: tuple[Any, ...], doc: Any) -> Answer | None:
    """``handle`` for a JSON request of the common kind (``_plain``), in the fewest steps: under
    load every step costs several times its idle cost. None, before anything ran, for any other
    request (and for one whose inputs do not fit the model: the general path words why)."""
    name, version, _, _, tag, adopt_id = payload
    plain = _plain.decode_inputs(doc)
    if plain is None:
        return None
    body_id, inputs = plain
    rid = _adopt(body_id, tag, adopt_id)
    specs, limit = declared(type(model))
    try:
        inputs = normalize_inputs(inputs, specs, name)
        check_rows(inputs, limit, name)
    except InputValidationError:
        return None
    outputs = model.predict(inputs)
    if type(outputs) is dict:
        head = _plain.answer_head(name, version, body_id or rid)
        if (data := _plain.encode_outputs(head, outputs)) is not None:
            first = {value.shape[0] for value in inputs.values()}  # (as ``signature`` counts)
            return (200, _out_of_band(data), None, body_id, first.pop() if len(first) == 1 else 1)
    decoded = _protocol.InferRequest(id=body_id, inputs=inputs)
    return _encode(_Read(decoded, inputs, name, version, rid, None), outputs)


def _adopt(body_id: str | None, tag: str | None, adopt_id: bool) -> str | None:
    """The request id: the body's ``id`` when it may be adopted (no header gave one) and is
    usable as one, else the front's ``tag``."""
    if adopt_id and body_id is not None and _logs.usable_request_id(body_id):
        _logs.REQUEST_ID.set(body_id)  # the model's log lines carry it (reset by the caller)
        return body_id
    return tag


def _streams(outputs: Any) -> bool:
    return inspect.isgenerator(outputs) or inspect.isasyncgen(outputs)


def _refuse_stream(read: _Read, outputs: Any) -> Answer:
    """The answer to a request that cannot take a stream (as Triton refuses a decoupled
    model on its non-streaming endpoints); the generator is closed unrun."""
    close = getattr(outputs, "aclose", None) or outputs.close
    result: Any = close()
    if result is not None:  # (aclose's awaitable)
        result.close()  # (an async generator that never started has nothing to finish)
    where = {
        GRPC: "ModelStreamInfer (gRPC)",
        GENERATE: f"/v2/models/{read.name}/generate_stream",
    }.get(read.kind, f"/v2/models/{read.name}/generate_stream or gRPC ModelStreamInfer")
    return (
        400,
        f"model {read.name!r} streams its answer (its predict is a generator), so it cannot "
        f"be answered in one response; call {where}",
        None,
        read.decoded.id,
        0,
    )


def handle_batch(model: Any, payloads: list[tuple[Any, ...]], max_batch_size: int) -> list[Any]:
    """Several requests' bodies, batched here: each is decoded and checked, the compatible
    ones (``_batching.signature``) are merged in arrival order into predicts of at most
    ``max_batch_size`` rows, and each request gets its own answer: an ``Answer``, or the
    ``RemoteException`` of the predict it ran in (which fails only that predict's requests)."""
    results: list[Any] = [None] * len(payloads)
    groups: dict[Any, list[tuple[int, _Read]]] = {}  # (insertion order: the oldest first)
    for i, payload in enumerate(payloads):
        read = _read(model, payload)
        if not isinstance(read, _Read):
            results[i] = read
            continue
        key = read.signature if read.signature is not None else ("alone", i)
        groups.setdefault(key, []).append((i, read))
    for members in groups.values():
        run: list[tuple[int, _Read]] = []
        rows = 0
        for member in members:
            if run and rows + member[1].rows > max_batch_size:
                _run(model, run, results)
                run, rows = [], 0
            run.append(member)
            rows += member[1].rows
        _run(model, run, results)
    return results


class _Read:
    """A decoded and checked request."""

    __slots__ = (
        "decoded",
        "inputs",
        "kind",
        "name",
        "rid",
        "rows",
        "signature",
        "tag",
        "version",
    )

    def __init__(
        self, decoded: Any, inputs: Any, name: str, version: Any, rid: Any, kind: Any
    ) -> None:
        self.decoded, self.inputs, self.name, self.version = decoded, inputs, name, version
        self.rid, self.kind = rid, kind  # kind: GRPC, GENERATE, or None (REST)
        self.signature, self.rows = _batching.signature(inputs)


def _read(model: Any, payload: tuple[Any, ...], doc: Any = None) -> _Read | Answer:
    """``doc``: the body's JSON, when the caller parsed it already (``_json_of``)."""
    name, version, body, header_length, tag, adopt_id = payload
    kind = header_length if header_length in (GRPC, GENERATE) else None
    specs, limit = declared(type(model))
    try:
        if kind == GRPC:
            decoded = _grpc_codec.decode_model_infer(body)
        elif kind == GENERATE:
            decoded = _generate.decode_generate(body, specs, name)
        elif doc is not None:
            decoded = _protocol.infer_request_of(doc, body, None)
        else:
            decoded = _protocol.decode_infer_request(body, header_length)
    except BodyTooLarge as exc:
        return (413, str(exc), None, None, 0)
    except CodecError as exc:
        return (400, str(exc), None, None, 0)
    body_id = decoded.id
    rid = _adopt(body_id, tag, adopt_id)
    try:
        inputs = normalize_inputs(decoded.inputs, specs, name)
        check_rows(inputs, limit, name)
    except InputValidationError as exc:
        return (400, f"model {name!r}: {exc.problem or exc}", None, body_id, 0)
    return _Read(decoded, inputs, name, version, rid, kind)


def _run(model: Any, run: list[tuple[int, _Read]], results: list[Any]) -> None:
    """One predict for ``run`` (compatible requests), its outputs cut back per request."""
    reads = [read for _, read in run]
    tags = [read.rid for read in reads if read.rid is not None]
    token = _logs.REQUEST_ID.set(",".join(tags) if tags else None)
    try:
        outputs = model.predict(_batching.merge([read.inputs for read in reads]))
        if len(reads) == 1 or _streams(outputs):
            answers = [outputs] * len(reads)  # (a stream is refused, to each of them)
        else:
            try:
                answers = _batching.split(outputs, [read.rows for read in reads], reads[0].name)
            except BatchError as exc:
                for i, read in run:
                    results[i] = (BAD_OUTPUTS, str(exc), None, read.decoded.id, 0)
                return
    except Exception as exc:
        error = _transport.RemoteException.capture(exc)
        for i, _ in run:
            results[i] = error
        return
    finally:
        _logs.REQUEST_ID.reset(token)
    for (i, read), outputs in zip(run, answers, strict=True):
        results[i] = _encode(read, outputs)


def _encode(read: _Read, outputs: Any, streaming: bool = False) -> Answer:
    body_id = read.decoded.id
    if not streaming and _streams(outputs):
        return _refuse_stream(read, outputs)
    if not isinstance(outputs, dict) or not all(isinstance(k, str) for k in outputs):
        what = f"{type(outputs).__name__}, but predict() must return a dict of output name -> array"
        return (BAD_OUTPUTS, what, None, body_id, 0)
    try:
        if read.kind is not None:
            encode = (
                _grpc_codec.encode_model_infer if read.kind == GRPC else _generate.encode_generate
            )
            data: bytes = encode(
                read.name, read.version, body_id or read.rid, outputs, read.decoded
            )
            json_length = None
        else:
            data, json_length = _protocol.encode_infer_response(
                read.name, read.version, body_id or read.rid, outputs, read.decoded
            )
    except CodecError as exc:
        return (400, str(exc), None, body_id, 0)
    except UnsupportedDatatypeError as exc:
        return (BAD_OUTPUTS, str(exc), None, body_id, 0)
    return (200, _out_of_band(data), json_length, body_id, read.rows)
