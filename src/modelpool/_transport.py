"""What crosses the pipe between the pool and a worker, and how.

A message is a small pickle (protocol 5) plus the raw buffers of the arrays in it, sent out of
band so they are never copied into the pickle. The receiver reads each buffer into fresh memory
it owns, so every array it rebuilds is writable (no "array is not writeable" surprise in torch).

Frame on the wire (each part one ``Connection.send_bytes``)::

    header:  uint32 n | n x uint64 buffer sizes | pickle bytes
    then n buffers, in order

Exceptions cross as ``RemoteException``: the pickled exception when it survives a round trip,
always with its type name, message and traceback text, so the parent can rebuild it or fall back
to ``RemoteError``.
"""

from __future__ import annotations

import dataclasses
import pickle
import struct
import traceback
from multiprocessing.connection import Connection
from typing import Any

from ._exceptions import RemoteError, RemoteTraceback

__all__ = ["DecodeError", "Frame", "RemoteException", "encode", "recv", "send", "send_frame"]

_COUNT = struct.Struct("<I")
_SIZE = struct.Struct("<Q")


#: An encoded message: the header (counts, sizes, pickle) and the out-of-band buffers.
Frame = tuple[bytes, list[memoryview]]


class DecodeError(Exception):
    """A complete message arrived but could not be unpickled here; ``remote`` says why."""

    def __init__(self, remote: RemoteException) -> None:
        super().__init__(remote.message)
        self.remote = remote


def encode(message: Any) -> Frame:
    """Pickle ``message``, keeping contiguous buffers out of band (not copied).

    Raises whatever pickle raises; nothing has been written anywhere yet when it does.
    """
    buffers: list[pickle.PickleBuffer] = []
    body = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    if not buffers:
        return b"\x00\x00\x00\x00" + body, []
    raws = [b.raw() for b in buffers]
    head = _COUNT.pack(len(raws)) + b"".join(_SIZE.pack(r.nbytes) for r in raws)
    return head + body, raws


def send_frame(conn: Connection, frame: Frame) -> None:
    """Write an encoded message."""
    head, raws = frame
    conn.send_bytes(head)
    for raw in raws:
        conn.send_bytes(raw)


def send(conn: Connection, message: Any) -> None:
    """Encode and write ``message``."""
    send_frame(conn, encode(message))


def recv(conn: Connection) -> Any:
    """Receive one message; buffers land in memory owned by the receiver (writable).

    Raises ``EOFError``/``OSError`` when the peer is gone, ``DecodeError`` when a whole message
    arrived but cannot be unpickled (the stream stays in step).
    """
    head = conn.recv_bytes()
    (count,) = _COUNT.unpack_from(head)
    if count == 0:
        return _loads(memoryview(head)[4:], ())
    offset = 4
    buffers = []
    for _ in range(count):
        (size,) = _SIZE.unpack_from(head, offset)
        offset += 8
        buf = bytearray(size)
        if size:
            conn.recv_bytes_into(buf)
        else:
            conn.recv_bytes()
        buffers.append(buf)
    return _loads(memoryview(head)[offset:], buffers)


def _loads(body: memoryview, buffers: Any) -> Any:
    try:
        return pickle.loads(body, buffers=buffers)
    except Exception as exc:
        raise DecodeError(RemoteException.capture(exc)) from exc


@dataclasses.dataclass
class RemoteException:
    """An exception raised in a worker, in a form that always crosses the pipe."""

    pickled: bytes | None
    type_name: str
    message: str
    traceback: str

    @classmethod
    def capture(cls, exc: BaseException) -> RemoteException:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        pickled: bytes | None
        try:
            pickled = pickle.dumps(exc, protocol=5)
            pickle.loads(pickled)  # exceptions are rebuilt by calling the class: prove it works
        except Exception:
            pickled = None
        return cls(pickled, _type_name(type(exc)), str(exc), tb)

    def rebuild(self) -> BaseException:
        """The original exception (with the remote traceback as ``__cause__``) or a
        ``RemoteError`` when it cannot be rebuilt here."""
        exc: BaseException | None = None
        if self.pickled is not None:
            try:
                exc = pickle.loads(self.pickled)
            except Exception:
                exc = None
        if not isinstance(exc, BaseException):
            exc = RemoteError(self.type_name, self.message, self.traceback)
        exc.__cause__ = RemoteTraceback(self.traceback)
        return exc


def _type_name(tp: type) -> str:
    module = tp.__module__
    return tp.__qualname__ if module == "builtins" else f"{module}.{tp.__qualname__}"
