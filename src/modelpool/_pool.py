"""``modelpool.Pool``: the public object tying model, supervisor and transport together."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import itertools
import multiprocessing
import os
import pickle
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from . import _batching, _hygiene, _infer, _transport
from ._atexit import register_atexit
from ._exceptions import ModelSpecError, PoolClosedError, UnsafeForkError
from ._handle import WorkerStats
from ._importer import import_from_string, portable, reference_of
from ._loopside import LoopFuture
from ._model import TensorSpec, check_rows, normalize_inputs
from ._requests import Request
from ._settings import PoolSettings, check, default_start_method, scaling, validate
from ._started import StartedPredict
from ._streaming import STREAM, STREAM_INFER, PredictStream, Sink
from ._supervisor import Supervisor
from ._worker import CALL, INFER, PREDICT, PREDICT_TAGGED, model_loaded

__all__ = ["Pool", "PoolStats", "StartedPredict"]

T = TypeVar("T")


def _run_chunk(fn: Callable[..., T], chunk: list[tuple[Any, ...]]) -> list[T]:
    return [fn(*args) for args in chunk]


def _chunked(items: Iterator[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


class PoolStats(dict[str, Any]):
    """What ``Pool.stats()`` returns: a dict that also reads as attributes.

    Keys: ``model``, ``workers`` (a list of ``WorkerStats``: index, generation, pid, state,
    served, restarts, last_exit, rss), ``queued``, ``in_flight``, ``start_method``,
    ``threads_per_worker``, ``events`` (recent scaling events: time, event, workers, reason),
    ``exit_reasons`` (worker exits since start by kind: ``"SIGKILL"``, ``"timeout"``,
    ``"recycled"``, ...), ``batch_sizes`` (batches run, by rows; batching pools only).
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Pool(cf.Executor):
    """A supervised pool of worker processes, each running one copy of a model.

    ``model`` is ``"pkg.module:ClassName"`` or an importable class (see ``modelpool.Model``);
    ``None`` makes a plain, robust process pool for ``submit``. See the README for the safety
    rules applied automatically (start method, thread limits, seeds, signals, parent death).
    ``name`` is how errors, logs and ``stats()`` name the model (default: its class's name;
    ``modelpool serve`` passes the name the URL uses).
    """

    def __init__(
        self,
        model: str | type | None = None,
        *,
        workers: int = 1,
        options: Mapping[str, Any] | None = None,
        start_method: str | None = None,
        threads_per_worker: int | None = None,
        timeout: float | None = None,
        setup_timeout: float | None = None,
        max_requests_per_worker: int | None = None,
        max_memory_per_worker: int | str | None = None,
        retries: int = 0,
        seed: int | None = None,
        drain_timeout: float | None = 30.0,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        max_batch_size: int = 1,
        max_batch_delay: float = 0.005,
        max_queue: int | None = None,
        min_workers: int | None = None,
        max_workers: int | None = None,
        load_concurrency: int | None = None,
        scale_down_after: float = 30.0,
        devices: Sequence[str | int] | None = None,
        name: str | None = None,
    ) -> None:
        given = validate(
            {
                "workers": workers,
                "options": options,
                "start_method": start_method,
                "threads_per_worker": threads_per_worker,
                "timeout": timeout,
                "setup_timeout": setup_timeout,
                "max_requests_per_worker": max_requests_per_worker,
                "max_memory_per_worker": max_memory_per_worker,
                "retries": retries,
                "seed": seed,
                "drain_timeout": drain_timeout,
                "max_batch_size": max_batch_size,
                "max_batch_delay": max_batch_delay,
                "max_queue": max_queue,
                "min_workers": min_workers,
                "max_workers": max_workers,
                "load_concurrency": load_concurrency,
                "scale_down_after": scale_down_after,
                "devices": devices,
            }
        )
        floor, ceiling = scaling(workers, min_workers, max_workers)
        method = given["start_method"] or default_start_method()
        self._start_method = method
        ref, cls, specs, model_limit = self._resolve_model(model, method)
        self._model_class = cls
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"name must be a non-empty str or None, got {name!r}")
        name = name or (cls.__name__ if cls is not None else "function pool")
        self._model_name = name
        self._input_specs: tuple[TensorSpec, ...] = specs
        self._model_limit = model_limit  # rows the model accepts at most (its own declaration)
        batch_limit = given["max_batch_size"]
        if model_limit is not None:
            batch_limit = min(batch_limit, model_limit)
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, got {initializer!r}")
        init = None
        if initializer is not None:
            init = (portable(initializer, method), tuple(initargs))
            try:
                pickle.dumps(init[1])
            except Exception as exc:
                raise ModelSpecError(f"initargs must be picklable: {exc}") from exc
        threads = _hygiene.resolve_threads(given["threads_per_worker"], ceiling)
        env = _hygiene.thread_env(threads, explicit=threads_per_worker is not None)
        self._settings = PoolSettings(
            model_ref=ref,
            model_name=name,
            options=given["options"],
            workers=ceiling,
            min_workers=floor if floor < ceiling else 0,
            load_concurrency=given["load_concurrency"],
            scale_down_after=given["scale_down_after"],
            threads=threads,
            env=env,
            seed=seed if seed is not None else int.from_bytes(os.urandom(4), "little"),
            timeout=given["timeout"],
            setup_timeout=given["setup_timeout"],
            max_requests_per_worker=given["max_requests_per_worker"],
            max_memory_per_worker=given["max_memory_per_worker"],
            retries=given["retries"],
            drain_timeout=given["drain_timeout"],
            initializer=init,
            max_batch_size=batch_limit,
            max_batch_delay=given["max_batch_delay"],
            max_queue=given["max_queue"],
            devices=tuple(_hygiene.device_env(d) for d in given["devices"] or ()),
        )
        try:
            pickle.dumps(self._settings.options)
        except Exception as exc:
            raise ModelSpecError(
                f"options for {name!r} must be picklable to reach the workers: {exc}"
            ) from exc
        self._supervisor = Supervisor(self._settings, multiprocessing.get_context(method))
        self._start_lock = threading.Lock()
        self._started = False
        self._closed = False
        # a pool dropped without shutdown() still stops its workers (supervisor != self)
        weakref.finalize(self, self._supervisor.close_soon)

    @staticmethod
    def _resolve_model(
        model: Any, method: str
    ) -> tuple[str | None, type | None, tuple[TensorSpec, ...], int | None]:
        if model is None:
            return None, None, (), None
        if isinstance(model, str):
            cls = import_from_string(model)
            ref = model
        else:
            cls = model
            ref = None
        if not isinstance(cls, type):
            raise ModelSpecError(
                f"{ref or cls!r} is a {type(cls).__name__}, not a class; pass a class with a "
                "predict(inputs) method (usually a modelpool.Model subclass)"
            )
        predict = getattr(cls, "predict", None)
        if not callable(predict) or getattr(predict, "__isabstractmethod__", False):
            raise ModelSpecError(f"{cls.__qualname__} has no predict(inputs) method; define one")
        if ref is None:
            ref = reference_of(cls, start_method=method)
        specs = tuple(getattr(cls, "inputs", ()) or ())
        if not all(isinstance(s, TensorSpec) for s in specs):
            raise ModelSpecError(f"{cls.__qualname__}.inputs must be a list of TensorSpec")
        limit = getattr(cls, "max_batch_size", None)
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ModelSpecError(f"{cls.__qualname__}.max_batch_size must be an int >= 1 or None")
        return ref, cls, specs, limit

    # ------------------------------------------------------------------ life cycle

    def start(self, wait: bool = True) -> Pool:
        """Start the workers. With ``wait``, block until all finished ``setup()``.

        Raises ``ModelSetupError`` when a worker cannot load the model (the pool is then shut
        down), ``UnsafeForkError`` for ``start_method="fork"`` in a process that cannot fork
        safely. Any interruption (Ctrl+C) stops and reaps every worker before it propagates.
        """
        with self._start_lock:
            if self._closed:
                raise PoolClosedError("this pool was shut down; create a new Pool")
            since = self._supervisor.failure_seq
            first = not self._started
            if first:
                if self._start_method == "fork":
                    hazards = _hygiene.fork_hazards()
                    if hazards:
                        raise UnsafeForkError(
                            "start_method='fork' refused: "
                            + "; ".join(hazards)
                            + ". Use the default start method (forkserver/spawn), or create "
                            "the pool before importing or running these."
                        )
                register_atexit(self._supervisor)
                self._started = True
                self._supervisor.start()
        if wait:
            try:
                self._supervisor.wait_ready(since)
            except BaseException:
                if first:  # a pool that never got going leaves nothing behind
                    self.terminate()
                raise
        return self

    def __enter__(self) -> Pool:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown(wait=True)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work, finish queued and in-flight work (within ``drain_timeout``),
        run ``teardown()`` in every worker, stop and reap them all.

        With ``cancel_futures``, queued work is cancelled instead of run. With ``wait=False``
        this returns at once and the shutdown completes in the background.
        """
        self._closed = True
        with self._start_lock:
            started = self._started
        self._supervisor.close(cancel_futures=cancel_futures, force=False)
        if not started:
            self._supervisor.join()
            return
        if wait:
            try:
                self._supervisor.join()
            except BaseException:
                self.terminate()
                raise

    def terminate(self) -> None:
        """Kill every worker now and reap them: the emergency stop, for when ``shutdown()``
        is too slow (a second Ctrl+C, an error while starting).

        No drain and no ``teardown()``: queued requests are cancelled, running ones fail with
        ``PoolClosedError``, and the pool takes no more work, as after ``shutdown()``. Returns
        when every worker is reaped (waiting 30 s at most). Safe to call more than once, and
        on a pool that was never started.
        """
        self._closed = True
        self._supervisor.close(cancel_futures=True, force=True)
        self._supervisor.join(timeout=30.0)

    # ------------------------------------------------------------------ requests

    def _ensure_started(self) -> None:
        if not self._started:
            if self._closed:
                raise PoolClosedError("this pool was shut down; create a new Pool")
            self.start(wait=False)

    def _new_request(self, timeout: float | None) -> Request:
        """Check the per-call timeout, start the pool if needed, and open a request whose
        deadline counts from now."""
        if timeout is not None:
            check("timeout", timeout)
        self._ensure_started()
        return self._supervisor.new_request(self._settings.timeout if timeout is None else timeout)

    def _request(
        self, kind: int, payload: Any, timeout: float | None, tag: str | None = None
    ) -> cf.Future[Any]:
        return self._enqueue(kind, payload, timeout, tag).future

    def _enqueue(
        self,
        kind: int,
        payload: Any,
        timeout: float | None,
        tag: str | None = None,
        *,
        counted: bool = True,
        on_loop: bool = False,
    ) -> Request:
        req = self._new_request(timeout)
        req.tag, req.counted = tag, counted
        if on_loop:  # made on the attached event loop: its answer is read there
            self._supervisor.loop_future(req)
        signature, rows = (None, 1)
        if self._settings.max_batch_size > 1:
            if kind == PREDICT:
                signature, rows = _batching.signature(payload)
            elif kind == INFER:  # bytes: the worker decodes and groups them (_infer)
                signature = _infer.SIGNATURE
        if signature is not None:  # merged with others at dispatch
            req.inputs, req.signature, req.rows = payload, signature, rows
        elif kind == INFER:  # plain values and a byte buffer: pickled as they are
            req.frame = _transport.encode_plain((kind, req.id, payload))
        else:
            req.frame = _transport.encode_request(_message(kind, req.id, payload, tag), _what(kind))
        self._supervisor.submit(req)
        return req

    def _call(self, kind: int, payload: Any, timeout: float | None, tag: str | None) -> Any:
        req = self._new_request(timeout)
        req.frame = _transport.encode_request(_message(kind, req.id, payload, tag), _what(kind))
        return self._supervisor.call(req)

    def predict(
        self, inputs: Any, timeout: float | None = None, *, request_id: str | None = None
    ) -> Any:
        """Run the model on ``inputs`` in a worker and return its outputs (blocking).

        ``timeout`` (seconds, counted from this call) overrides the pool's; ``None`` uses it.
        ``request_id`` is what ``modelpool.request_id()`` returns in the worker meanwhile (for
        its log lines). Safe to call from any number of threads.
        """
        self._check_has_model()
        inputs = normalize_inputs(inputs, self._input_specs, self._model_name)
        check_rows(inputs, self._model_limit, self._model_name)
        tag = _tag(request_id)
        if self._settings.max_batch_size > 1:
            return self._request(PREDICT, inputs, timeout, tag).result()
        return self._call(PREDICT, inputs, timeout, tag)

    def stream(
        self, inputs: Any, timeout: float | None = None, *, request_id: str | None = None
    ) -> PredictStream:
        """Run the model on ``inputs`` and return its answer's pieces as they come: for a
        ``predict`` written as a generator (or async generator), each item it yields, as soon
        as it is yielded; for any other ``predict``, its one answer.

        Iterate the result with ``for`` or ``async for``. The worker stays at most
        ``_streaming.WINDOW`` pieces ahead of the reader (a slow reader pauses the
        generator). ``close()`` (or leaving a ``with`` block) stops the generator in the
        worker, whose ``finally`` runs. A worker that dies mid-stream ends the iteration with
        ``WorkerCrashedError`` (a stream that has yielded is never retried); ``timeout``
        covers the whole stream. Arguments as for ``predict``.
        """
        self._check_has_model()
        inputs = normalize_inputs(inputs, self._input_specs, self._model_name)
        check_rows(inputs, self._model_limit, self._model_name)
        return self._stream(STREAM, inputs, timeout, _tag(request_id))

    def _stream(self, kind: int, payload: Any, timeout: float | None, tag: Any) -> PredictStream:
        """Queue a stream request (``STREAM`` or ``STREAM_INFER``); made on the attached loop,
        its pieces are read there."""
        req = self._new_request(timeout)
        req.tag = tag
        self._supervisor.loop_future(req)
        req.stream = Sink()
        future: Any = req.future
        (future.waiter if isinstance(future, LoopFuture) else future).add_done_callback(
            req.stream.end
        )
        message = (kind, req.id, (tag, payload) if kind == STREAM else payload)
        req.frame = _transport.encode_request(message, "the inputs")
        self._supervisor.submit(req)
        return PredictStream(req)

    def _check_has_model(self) -> None:
        if self._settings.model_ref is None:
            raise ModelSpecError(
                "this pool was created without a model, so it has no predict(); pass a model "
                "(Pool('pkg.module:Model', ...)) or use submit() to run functions"
            )

    async def apredict(
        self, inputs: Any, timeout: float | None = None, *, request_id: str | None = None
    ) -> Any:
        """``predict`` for asyncio; works from any event loop. Cancelling it drops the request
        if it has not started, or its result if it has."""
        return await StartedPredict(self._start_predict(inputs, timeout, request_id)).wait()

    def _start_predict(self, inputs: Any, timeout: float | None, request_id: str | None) -> Request:
        """Check and queue a predict (``apredict`` and ``start_predict``)."""
        self._check_has_model()
        inputs = normalize_inputs(inputs, self._input_specs, self._model_name)
        check_rows(inputs, self._model_limit, self._model_name)
        return self._enqueue(PREDICT, inputs, timeout, _tag(request_id), on_loop=True)

    # for a server that embeds the pool, as modelpool.server does (docs/server.md, "Embedding
    # a pool in a server"): public names, but not part of the everyday API

    def start_predict(
        self, inputs: Any, timeout: float | None = None, *, request_id: str | None = None
    ) -> StartedPredict:
        """Queue a predict without waiting for it: its future, and afterwards the pid of the
        worker that ran it (for a server's error answers and logs).

        Arguments as for ``predict``; an invalid request raises here, not in the future.
        """
        return StartedPredict(self._start_predict(inputs, timeout, request_id))

    def start_infer(
        self,
        body: bytes,
        header_length: int | None = None,
        *,
        version: str | None = None,
        request_id: str | None = None,
        adopt_id: bool = True,
        timeout: float | None = None,
    ) -> StartedPredict:
        """Queue an Open Inference Protocol request as its HTTP body's bytes: a worker decodes
        it, checks the inputs, predicts and encodes the answer (``header_length``: its
        ``Inference-Header-Content-Length``; ``adopt_id``: the body's ``id`` may become the
        request id). The future's result is a ``modelpool._infer.Answer``; ``predict``'s own
        exceptions fail it as they fail ``predict``. With batching on, the pool sends several
        queued requests' bytes to a worker at once, which merges the compatible ones into
        predicts of at most ``max_batch_size`` rows (a request counts as one row in the
        queue: the pool does not decode them)."""
        payload = self._infer_payload(body, header_length, version, request_id, adopt_id)
        return StartedPredict(self._enqueue(INFER, payload, timeout, on_loop=True))

    def start_stream_infer(
        self,
        body: bytes,
        header_length: int | None = None,
        *,
        version: str | None = None,
        request_id: str | None = None,
        adopt_id: bool = True,
        timeout: float | None = None,
    ) -> PredictStream:
        """``start_infer`` for a streaming model: an ``_infer.Answer`` per item ``predict``
        yields, as they come; a non-200 one (a request or item that cannot be answered) last."""
        payload = self._infer_payload(body, header_length, version, request_id, adopt_id)
        return self._stream(STREAM_INFER, payload, timeout, payload[4])

    def _infer_payload(
        self,
        body: bytes,
        header_length: int | None,
        version: str | None,
        request_id: str | None,
        adopt_id: bool,
    ) -> tuple[Any, ...]:
        self._check_has_model()
        tag = _tag(request_id)
        return _infer.request_payload(self._model_name, version, body, header_length, tag, adopt_id)

    def attach_loop(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Let an event loop (default: the running one; call this in its thread) send
        predicts made in it straight to idle workers and read their answers itself, with no
        thread hand-off. One loop per pool; call ``detach_loop`` in the same thread before the
        loop stops. Predicts made elsewhere are unaffected."""
        self._supervisor.attach_loop(loop or asyncio.get_running_loop())

    def detach_loop(self) -> None:
        """Undo ``attach_loop`` (in the loop's thread): answers still to come are read by the
        pool's own thread again."""
        self._supervisor.detach_loop()

    def probe(self) -> cf.Future[bool]:
        """A readiness probe through the real request path: a call queued to a worker like any
        request (the pool's ``timeout`` applies), resolving to whether that worker has its
        model loaded. Not counted as a request served (``stats()``'s ``served``,
        ``max_requests_per_worker``). Raises or fails like ``submit`` (e.g.
        ``PoolClosedError``)."""
        payload: tuple[Any, ...] = (portable(model_loaded, self._start_method), (), {})
        future: cf.Future[bool] = self._enqueue(CALL, payload, None, counted=False).future
        return future

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> cf.Future[T]:
        """Run ``fn(*args, **kwargs)`` in a worker; ``modelpool.current_model()`` inside it
        returns that worker's model. Same crash, timeout and retry rules as ``predict``."""
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, got {fn!r}")
        return self._request(CALL, (portable(fn, self._start_method), args, kwargs), None)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """Like ``concurrent.futures.Executor.map``: results in order, ``timeout`` (seconds)
        for the whole map. ``chunksize`` > 1 sends items in chunks (fewer round trips); a
        crash or timeout then fails the whole chunk it was in."""
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be an int >= 1, got {chunksize!r}")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        chunk_fn = functools.partial(_run_chunk, portable(fn, self._start_method))
        chunks = _chunked(zip(*iterables, strict=False), chunksize)
        results = super().map(chunk_fn, chunks, timeout=timeout)
        return itertools.chain.from_iterable(results)

    # ------------------------------------------------------------------ introspection

    def stats(self) -> PoolStats:
        """A snapshot: per worker pid, state, requests served, restarts, last exit, RSS."""
        workers: list[WorkerStats] = self._supervisor.stats()
        return PoolStats(
            model=self._model_name,
            workers=workers,
            events=self._supervisor.events(),
            start_method=self._start_method,
            threads_per_worker=self._settings.threads,
            **self._supervisor.counts(),
            **self._supervisor.telemetry(),
        )

    @property
    def model_class(self) -> type | None:
        """The model's class (imported in this process to read its signature), or None."""
        return self._model_class

    @property
    def start_method(self) -> str:
        return self._start_method

    @property
    def threads_per_worker(self) -> int:
        return self._settings.threads

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._started else "new"
        return (
            f"<modelpool.Pool {self._model_name!r} workers={self._settings.workers} "
            f"{self._start_method} {state}>"
        )


def _tag(request_id: str | None) -> str | None:
    if request_id is not None and not isinstance(request_id, str):
        raise TypeError(f"request_id must be a string or None, got {request_id!r}")
    return request_id


def _what(kind: int) -> str:
    return "the function or its arguments" if kind == CALL else "the inputs"


def _message(kind: int, rid: int, payload: Any, tag: str | None) -> tuple[int, int, Any]:
    """The message sent to a worker: a predict with a request id carries it along."""
    if tag is not None and kind == PREDICT:
        return (PREDICT_TAGGED, rid, (tag, payload))
    return (kind, rid, payload)
