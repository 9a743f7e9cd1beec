"""Every error modelpool raises, in one tree.

Misuse (you asked for something that cannot work) is kept apart from breakage (something failed
while working), in the manner of trio's ``ClosedResourceError`` / ``BrokenResourceError``::

    ModelpoolError
    ├── PoolClosedError            the pool was shut down; calls after shutdown()
    ├── ModelSpecError             the model (or function) cannot be used: bad import string,
    │                              not importable by workers, no predict()
    ├── UnsafeForkError            start_method="fork" refused: the parent holds CUDA, TensorFlow
    │                              or live threads, which do not survive fork
    ├── InputValidationError       inputs do not match the model's declared signature (ValueError)
    ├── BatchError                 with batching on, predict's outputs do not have one row per
    │                              input row, so they cannot be split back (ValueError)
    ├── PoolOverloadedError        the queue is full; try again later
    └── WorkerError                breakage in a worker process
        ├── ModelSetupError        setup() raised, timed out or the worker died while loading
        ├── WorkerCrashedError     the worker died while serving a request
        ├── RequestTimeoutError    the request missed its deadline (also a TimeoutError)
        ├── TransportError         a message could not be carried between the pool and a worker
        │                          (shared memory full, a failed write, an answer out of step);
        │                          never the model's fault
        └── RemoteError            the worker raised an exception that could not be sent back as
                                   itself; carries its type name, message and traceback text

An exception raised by user code in ``predict`` (or a submitted function) reaches the caller as
itself, with the worker's traceback attached as ``__cause__`` (a ``RemoteTraceback``).

Exceptions here know nothing of HTTP; the server maps them to status codes in one place.
"""

from __future__ import annotations

__all__ = [
    "BatchError",
    "InputValidationError",
    "ModelSetupError",
    "ModelSpecError",
    "ModelpoolError",
    "PoolClosedError",
    "PoolOverloadedError",
    "RemoteError",
    "RemoteTraceback",
    "RequestTimeoutError",
    "TransportError",
    "UnsafeForkError",
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

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_crashed,
            (self.args[0], self.pid, self.exitcode, self.signal_name, self.likely_cause),
        )


def _rebuild_crashed(
    message: str,
    pid: int | None,
    exitcode: int | None,
    signal_name: str | None,
    likely_cause: str | None,
) -> WorkerCrashedError:
    return WorkerCrashedError(
        message, pid=pid, exitcode=exitcode, signal_name=signal_name, likely_cause=likely_cause
    )


class RequestTimeoutError(WorkerError, TimeoutError):
    """The request did not finish before its deadline (counted from submission)."""


class TransportError(WorkerError):
    """A request or its answer could not be carried between the pool and a worker: no room in
    shared memory, a failed write, or an answer that does not belong to the request. Nothing
    here is the model's doing; the message says whether the worker was replaced."""


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
