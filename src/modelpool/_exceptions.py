"""Every error modelpool raises, in one tree.

Misuse (you asked for something that cannot work) is kept apart from breakage (something failed
while working: ``WorkerError``), in the manner of trio's ``ClosedResourceError`` /
``BrokenResourceError``; the HTTP client's errors are a branch of their own. One line each on when
it is raised (docs/errors.md has what to do about each)::

    ModelpoolError
    ├── PoolClosedError            the pool was shut down; calls after shutdown()
    ├── ModelSpecError             the model (or function) cannot be used: bad import string,
    │                              not importable by workers, no predict()
    ├── UnsafeForkError            start_method="fork" refused: the parent holds CUDA, TensorFlow
    │                              or live threads, which do not survive fork
    ├── InputValidationError       inputs do not match the model's declared signature (ValueError)
    ├── BatchError                 with batching on, predict's outputs do not have one row per
    │                              input row, so they cannot be split back (ValueError)
    ├── PoolOverloadedError        the queue is full (max_queue); try again later
    ├── SerializationError         a value could not be pickled or unpickled on its way to or
    │                              from a worker: an input, a function's arguments, an answer
    │                              (TypeError)
    ├── ConfigError                a YAML file, `serve` flags or Celery install() arguments are
    │                              invalid (ValueError)
    ├── DatabaseError              the user and key database cannot be used: unreachable, its
    │                              schema behind this version (run `modelpool db upgrade`), or a
    │                              user or key that does not exist
    ├── CodecError                 a body is not a valid Open Inference Protocol request or
    │   │                          response (ValueError): the server answers 400
    │   └── BodyTooLarge           a (decompressed) body is over the server's limit: 413
    ├── UnsupportedDatatypeError   an array's dtype has no protocol datatype (complex, datetime):
    │                              an input to Client.infer, or a model's output (TypeError)
    ├── ServerError                (Client) the server answered an error status, or could not be
    │   │                          reached (status 0)
    │   └── ServerTimeoutError     (Client) a 504, or no answer within the client's timeout
    │                              (also a TimeoutError)
    └── WorkerError                breakage in a worker process
        ├── ModelSetupError        setup() raised, timed out or the worker died while loading
        ├── WorkerCrashedError     the worker died while serving a request
        │   └── PoisonTaskError    (Celery) a task's worker process died on every delivery; it is
        │                          not delivered again
        ├── RequestTimeoutError    the request missed its deadline (also a TimeoutError)
        ├── TransportError         a message could not be carried between the pool and a worker
        │   │                      (a failed write, an answer out of step); never the model's
        │   │                      fault
        │   ├── PlacementError     no room in shared memory for a message's arrays: nothing was
        │   │                      sent, the worker keeps serving (also a MemoryError)
        │   └── ProtocolError      an answer that does not belong to the request in flight (a
        │                          bug in modelpool): the worker is replaced
        └── RemoteError            the worker raised an exception that could not be sent back as
                                   itself; carries its type name, message and traceback text

An exception raised by user code in ``predict`` (or a submitted function) reaches the caller as
itself, with the worker's traceback attached as ``__cause__`` (a ``RemoteTraceback``).

Exceptions here know nothing of HTTP; the server maps them to status codes in one place.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BatchError",
    "BodyTooLarge",
    "CodecError",
    "ConfigError",
    "DatabaseError",
    "InputValidationError",
    "ModelSetupError",
    "ModelSpecError",
    "ModelpoolError",
    "PlacementError",
    "PoisonTaskError",
    "PoolClosedError",
    "PoolOverloadedError",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "RequestTimeoutError",
    "SerializationError",
    "ServerError",
    "ServerTimeoutError",
    "TransportError",
    "UnsafeForkError",
    "UnsupportedDatatypeError",
    "WorkerCrashedError",
    "WorkerError",
]


class ModelpoolError(Exception):
    """Base class of every error raised by modelpool."""


class PoolClosedError(ModelpoolError):
    """The pool has been shut down and takes no more work."""


class ModelSpecError(ModelpoolError):
    """The model or function given to the pool cannot be used by its workers."""


class UnsafeForkError(ModelpoolError):
    """``start_method="fork"`` was refused because forking this process now is known to break."""


class InputValidationError(ModelpoolError, ValueError):
    """The inputs do not match the model's declared ``inputs`` signature.

    ``str(exc)`` is for Python callers (with a NumPy hint where one helps). ``problem`` states
    the same fact without the model's name or NumPy advice, in protocol terms (``FP32``, not
    ``float32``), for callers of other languages: the server answers
    ``model 'NAME': <problem>``. ``None`` when raised without it (e.g. by a model itself).
    """

    def __init__(self, message: str, *, problem: str | None = None) -> None:
        super().__init__(message)
        self.problem = problem  # (pickled in __dict__: subclasses keep their own type)


class BatchError(ModelpoolError, ValueError):
    """With batching on, the model's outputs cannot be split back into one answer per request
    (an output whose first dimension is not the batch size, or not a dict of arrays)."""


class PoolOverloadedError(ModelpoolError):
    """The pool's queue is full; the request was not accepted. Retry later."""


class SerializationError(ModelpoolError, TypeError):
    """A value could not cross between the pool and a worker: an input or a function's
    arguments that cannot be pickled (raised in the caller, nothing was sent), a message one
    side cannot unpickle (a class that only one of the two processes can import), or an
    answer the model returned that cannot be pickled. The pickle error is the ``__cause__``."""


class ConfigError(ModelpoolError, ValueError):
    """The configuration is invalid; the message names the file, the field and the fix."""


class DatabaseError(ModelpoolError):
    """The user and key database (``modelpool.auth``) cannot do what was asked: it cannot be
    reached, its schema is behind this version of modelpool, or the user or key named does not
    exist. The message says which, and what to do."""


class WorkerError(ModelpoolError):
    """Something broke inside a worker process."""


class ModelSetupError(WorkerError):
    """A worker could not load the model: ``setup()`` raised, timed out, or the worker died."""


class WorkerCrashedError(WorkerError):
    """The worker serving a request died before answering.

    Attributes give the facts: ``pid``, ``exitcode`` (negative for a signal, as in
    ``multiprocessing``), ``signal_name`` (e.g. ``"SIGSEGV"``, or ``None``) and ``likely_cause``.
    """

    def __init__(
        self,
        message: str,
        *,
        pid: int | None = None,
        exitcode: int | None = None,
        signal_name: str | None = None,
        likely_cause: str | None = None,
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.signal_name = signal_name
        self.likely_cause = likely_cause
        # No __reduce__: BaseException's rebuilds ``cls(message)`` and restores the facts from
        # ``__dict__``, so subclasses (PoisonTaskError) pickle with their own type and facts.


class PoisonTaskError(WorkerCrashedError):
    """(Celery) A task's worker process died every time it ran, and it will not be run again.

    ``deliveries`` is how many times it was delivered. Raised by ``AsyncResult.get()``.
    """

    def __init__(self, message: str, *, deliveries: int | None = None, **facts: Any) -> None:
        super().__init__(message, **facts)
        self.deliveries = deliveries


class RequestTimeoutError(WorkerError, TimeoutError):
    """The request did not finish before its deadline (counted from submission)."""


class TransportError(WorkerError):
    """A request or its answer could not be carried between the pool and a worker: no room in
    shared memory, a failed write, or an answer that does not belong to the request. Nothing
    here is the model's doing; the message says whether the worker was replaced."""


class PlacementError(TransportError, MemoryError):
    """Large buffers could not be placed in shared memory (no room to grow); nothing was sent."""


class ProtocolError(TransportError):
    """An answer that does not belong to the request in flight (a bug; the worker is dropped)."""


class RemoteError(WorkerError):
    """An exception raised in a worker that could not be sent back as itself.

    ``type_name`` is the original exception's qualified type name, ``remote_message`` its
    message and ``remote_traceback`` the worker's formatted traceback.
    """

    def __init__(self, type_name: str, remote_message: str, remote_traceback: str) -> None:
        super().__init__(
            f"{type_name}: {remote_message} (raised in a worker; the exception could not be "
            "sent back as itself, so it arrives as RemoteError)"
        )
        self.type_name = type_name
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[object, ...]:
        return (RemoteError, (self.type_name, self.remote_message, self.remote_traceback))


class RemoteTraceback(Exception):
    """Holds a worker's traceback text; attached as ``__cause__`` of errors from workers."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb.rstrip()}\n"""'


# -- the Open Inference Protocol: its codec (modelpool._protocol) and modelpool.Client ------


class CodecError(ModelpoolError, ValueError):
    """A body is not a valid Open Inference Protocol request or response; the message says how
    to fix it. The server answers it with 400 (413 for ``BodyTooLarge``); ``Client`` raises a
    malformed answer as a ``ServerError``."""


class BodyTooLarge(CodecError):
    """The (decompressed) body is larger than the server accepts."""


class UnsupportedDatatypeError(ModelpoolError, TypeError):
    """An array's dtype has no Open Inference Protocol datatype (complex, datetime, ...)."""


class ServerError(ModelpoolError):
    """(``modelpool.Client``) The server answered with an error status, or could not be
    reached (``status`` 0).

    ``message`` is the server's ``error`` text (or what went wrong locally); ``url`` the URL
    requested.
    """

    def __init__(self, status: int, message: str, *, url: str = "") -> None:
        where = f" from {url}" if url else ""
        text = f"HTTP {status}{where}: {message}" if status else message
        super().__init__(text)
        self.status = status
        self.message = message
        self.url = url

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_server_error, (type(self), self.status, self.message, self.url))


class ServerTimeoutError(ServerError, TimeoutError):
    """(``modelpool.Client``) The server answered 504, or gave no answer within the client's
    ``timeout``."""


def _rebuild_server_error(
    cls: type[ServerError], status: int, message: str, url: str
) -> ServerError:
    return cls(status, message, url=url)
