"""What crosses between the pool and a worker, and how.

A message is a small pickle (protocol 5) plus the raw buffers of the arrays in it, kept out of
band so they are never copied into the pickle. Small buffers follow the pickle on the pipe; large
ones (>= ``_shm.THRESHOLD``) are copied once into the sender's shared-memory arena and only their
offsets travel (see ``_shm``). The receiver rebuilds arrays over memory it owns: fresh buffers
for small ones, arena regions no one else will touch for large ones. Either way every array it
gets is writable (no "array is not writeable" surprise in torch).

Torch CPU tensors travel as their NumPy view (no storage pickling) and are rebuilt as tensors.

One message is one ``send_bytes`` (a second write would wake the peer a second time)::

    u32 n_buffers | u32 n_released | u64 sender's arena size | u64 pickle length
    n_buffers x (u64 size, i64 arena offset or -1 = inline)
    n_released x u64 offsets of the peer's arena regions the sender is done with
    pickle bytes
    inline buffers, back to back

Exceptions cross as ``RemoteException``: the pickled exception when it survives a round trip,
always with its type name, message and traceback text, so the other side can rebuild it or fall
back to ``RemoteError``.
"""

from __future__ import annotations

import collections
import contextlib
import copyreg
import dataclasses
import io
import itertools
import os
import pickle
import select
import socket
import struct
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

from . import _shm
from ._exceptions import (
    PlacementError,
    ProtocolError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
)

__all__ = [
    "Channel",
    "DecodeError",
    "Encoded",
    "PlacementError",
    "ProtocolError",
    "RemoteException",
    "encode",
    "encode_plain",
    "encode_request",
    "unreadable",
]

_HEAD = struct.Struct("<IIQQ")
_BUF = struct.Struct("<Qq")
_REL = struct.Struct("<Q")
_INLINE = -1


class DecodeError(Exception):
    """A complete message arrived but could not be unpickled here; ``remote`` says why.

    Internal: never reaches a caller. Whoever receives it answers the request with
    ``remote`` (the parent, or the worker, which sends it back), as if the other side had
    raised the unpickling error. (``PlacementError`` and ``ProtocolError``, which do reach
    callers, live with every other error in ``_exceptions``.)
    """

    def __init__(self, remote: RemoteException) -> None:
        super().__init__(remote.message)
        self.remote = remote


@dataclasses.dataclass
class Encoded:
    """A pickled message whose out-of-band buffers are not yet placed anywhere."""

    body: bytes
    buffers: list[memoryview]


# ---------------------------------------------------------------------- torch tensors


def _rebuild_tensor(array: Any, dtype_name: str | None) -> Any:
    import torch

    tensor = torch.from_numpy(array)
    return tensor.view(getattr(torch, dtype_name)) if dtype_name else tensor


def _reduce_tensor(tensor: Any) -> tuple[Any, ...]:
    import torch

    if tensor.device.type != "cpu" or tensor.is_sparse or tensor.is_quantized:
        return tensor.__reduce_ex__(5)  # type: ignore[no-any-return]
    t = tensor.detach().contiguous()
    if t.dtype in (torch.bfloat16,):
        return (_rebuild_tensor, (t.view(torch.int16).numpy(), "bfloat16"))
    try:
        return (_rebuild_tensor, (t.numpy(), None))
    except (TypeError, RuntimeError):
        return tensor.__reduce_ex__(5)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------- read-only arrays


def _rebuild_writable(buf: Any, dtype: Any, shape: tuple[int, ...], order: str) -> Any:
    """Rebuild an array that was read-only at the sender as a writable one.

    Pickle marks the buffer of a read-only array read-only, but the memory under it is the
    receiver's own (a fresh bytearray or an arena region), so the array is made over that.
    """
    import numpy as np

    view = memoryview(buf)
    if view.readonly and view.obj is not None:
        view = memoryview(view.obj).cast("B")[: view.nbytes]
    return np.frombuffer(view, dtype=dtype).reshape(shape, order=order)  # type: ignore[call-overload]


def _reduce_array(array: Any) -> Any:
    if array.flags.writeable or array.dtype.hasobject or array.size == 0:
        return array.__reduce_ex__(5)
    if array.flags.c_contiguous:
        order = "C"
    elif array.flags.f_contiguous:
        order = "F"
    else:
        return array.__reduce_ex__(5)  # copied in band: arrives as an owned, writable copy
    return (_rebuild_writable, (pickle.PickleBuffer(array), array.dtype, array.shape, order))


_TABLES: dict[tuple[bool, bool, int], dict[type, Any]] = {}


def _dispatch_table() -> dict[type, Any]:
    numpy = sys.modules.get("numpy")
    torch = sys.modules.get("torch")
    key = (numpy is not None, torch is not None, len(copyreg.dispatch_table))
    table = _TABLES.get(key)
    if table is None:
        table = dict(copyreg.dispatch_table)
        if numpy is not None:
            table[numpy.ndarray] = _reduce_array
        if torch is not None:
            table[torch.Tensor] = _reduce_tensor
        _TABLES[key] = table
    return table


_PLAIN = frozenset({bytes, str, int, float, bool, type(None), pickle.PickleBuffer})


def _plain(obj: Any, depth: int) -> bool:
    """True when plain ``pickle.dumps`` encodes ``obj`` as well as our reducers would: only
    builtins and writable NumPy arrays, looked at ``depth`` containers deep."""
    kind = type(obj)
    if kind in _PLAIN:
        return True
    if kind is tuple and depth > 0:  # the message itself: (kind, id, payload)
        return all(type(item) in _PLAIN or _plain(item, depth - 1) for item in obj)
    if kind.__name__ == "ndarray" and kind.__module__ == "numpy":
        return bool(obj.flags.writeable)
    if depth <= 0:
        return False
    if kind is tuple or kind is list:
        return all(_plain(item, depth - 1) for item in obj)
    if kind is dict:
        return all(type(k) is str and _plain(v, depth - 1) for k, v in obj.items())
    return False


def unreadable(exc: Exception) -> SerializationError:
    """The error for a message that arrived whole but could not be unpickled here."""
    error = SerializationError(
        f"a message between the pool and a worker could not be unpickled on arrival "
        f"({type(exc).__name__}: {exc}). Values sent to or returned from a worker must be "
        "importable in both processes: a class defined in __main__ or created at run time in "
        "only one of them is not."
    )
    error.__cause__ = exc
    return error


def encode_request(message: Any, what: str) -> Encoded:
    """``encode`` for a request the caller made: a value that cannot be pickled is the
    caller's ``SerializationError`` naming ``what`` (nothing was sent)."""
    try:
        return encode(message)
    except Exception as exc:
        raise SerializationError(
            f"{what} could not be pickled to send to a worker ({type(exc).__name__}: {exc}); "
            "nothing was sent. Pass NumPy arrays, tensors or other picklable values."
        ) from exc


def encode_plain(message: Any) -> Encoded:
    """``encode`` for a message made only of builtins and byte buffers (no check)."""
    buffers: list[pickle.PickleBuffer] = []
    body = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    return Encoded(body, [b.raw() for b in buffers])


def encode(message: Any) -> Encoded:
    """Pickle ``message``, keeping contiguous buffers out of band (not copied).

    Raises whatever pickle raises; nothing has been written anywhere yet when it does.
    """
    buffers: list[pickle.PickleBuffer] = []
    if _plain(message, 3):  # the common case, at C speed
        body = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
        return Encoded(body, [b.raw() for b in buffers])
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=5, buffer_callback=buffers.append)
    pickler.dispatch_table = _dispatch_table()
    pickler.dump(message)
    return Encoded(out.getvalue(), [b.raw() for b in buffers])


# ---------------------------------------------------------------------- the channel


_LEN = struct.Struct("<Q")
_CHUNK = 1 << 16
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class _Wire:
    """Length-prefixed messages on a connected socket's descriptor: one write per message and,
    for a small one, one read. (``multiprocessing.Connection`` takes two reads and a Python
    loop per message; on the small-call path that is a measurable share.)

    ``recv(block=False)`` never waits: it returns ``None`` while a message is incomplete and
    keeps what it has read, so the supervisor thread never hangs on a peer that died halfway
    through writing (with the socket still held open by, say, a process the model forked).
    """

    def __init__(self, fd: int, *, wait_in_poll: bool = False) -> None:
        self.fd = fd
        self.wait_in_poll = wait_in_poll
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        # A poll object can be polled by one thread at a time (else RuntimeError), and the
        # supervisor asks ``readable()`` while the reader (a caller thread, the event loop)
        # polls: a blocking read waits on its own, and ``readable()`` asks its own.
        self._waiter = select.poll()
        self._waiter.register(fd, select.POLLIN)
        self._probe = select.poll()
        self._probe.register(fd, select.POLLIN)
        self._buf = bytearray(_CHUNK)  # reused for every message that fits
        self._have = 0  # bytes of self._buf already read
        self._big: bytearray | None = None  # a message larger than the buffer, being read
        self._big_have = 0

    def send(self, parts: list[Any], total: int | None = None) -> None:
        """Write one message made of ``parts`` (``total`` bytes, if the caller knows)."""
        if total is None:
            total = sum(len(p) if type(p) is bytes else memoryview(p).nbytes for p in parts)
        if total < _CHUNK:  # small: one joined write beats building the iovec
            data = memoryview(b"".join([_LEN.pack(total), *parts]))
            while data:
                data = data[os.write(self.fd, data) :]
            return
        views = collections.deque(
            [memoryview(_LEN.pack(total))] + [memoryview(p).cast("B") for p in parts]
        )
        while views:
            # writev takes at most IOV_MAX pieces per call (EINVAL beyond): a message with
            # thousands of small arrays goes out in several calls, still as one message
            sent = os.writev(self.fd, list(itertools.islice(views, _IOV_MAX)))
            while views and sent >= views[0].nbytes:
                sent -= views[0].nbytes
                views.popleft()
            if views and sent:
                views[0] = views[0][sent:]

    def readable(self) -> bool:
        """Bytes (or end of file) are waiting."""
        return bool(self._have or self._big is not None or self._probe.poll(0))

    def _read_into(self, view: memoryview, block: bool) -> int | None:
        # ``wait_in_poll`` (a worker's end): wait in poll(POLLIN), not in a blocking read. A
        # reader blocked in a unix socket's read is also woken each time the peer consumes what
        # this side sent (the kernel's write-space wake-up ignores what the sleeper waits for):
        # a worker waiting for its next request was woken when the front read its answer, a
        # context switch for nothing, under load. For a caller waiting for one answer, the
        # extra poll call costs more than the wake-up it saves (measured), so it reads.
        if block:
            if self.wait_in_poll:
                self._waiter.poll()
        elif not self._poller.poll(0):
            return None
        n = os.readv(self.fd, [view])
        if not n:
            raise EOFError("the other process closed the connection")
        return n

    def recv(self, block: bool = True) -> memoryview | None:
        """The next message, or ``None`` (only with ``block=False``) while it is incomplete.

        A small message is a view into a buffer reused by the next call, so the caller must be
        done with it (decoded, inline buffers copied) before calling again.
        """
        if self._big is not None:
            return self._recv_big(block)
        buf = self._buf
        while self._have < _LEN.size:
            n = self._read_into(memoryview(buf)[self._have :], block)
            if n is None:
                return None
            self._have += n
        (size,) = _LEN.unpack_from(buf)
        end = _LEN.size + size
        if end > len(buf):  # larger than the buffer: read it into its own memory
            self._big = bytearray(size)
            self._big_have = self._have - _LEN.size
            self._big[: self._big_have] = buf[_LEN.size : self._have]
            self._have = 0
            return self._recv_big(block)
        while self._have < end:
            n = self._read_into(memoryview(buf)[self._have :], block)
            if n is None:
                return None
            self._have += n
        have = self._have
        self._have = 0
        if have > end:  # the start of the next message: keep it, in a fresh buffer
            self._buf = bytearray(buf[end:have]) + bytearray(_CHUNK)
            self._have = have - end  # (the old buffer is not reused: the view below is safe)
        return memoryview(buf)[_LEN.size : end]

    def _recv_big(self, block: bool) -> memoryview | None:
        big = self._big
        assert big is not None
        view = memoryview(big)
        while self._big_have < len(big):
            n = self._read_into(view[self._big_have :], block)
            if n is None:
                return None
            self._big_have += n
        self._big = None
        return view

    def shutdown(self) -> None:
        """Wake anyone blocked reading or writing this socket, even if another process still
        holds its other end."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            sock = socket.socket(fileno=os.dup(self.fd))
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.close()


class Channel:
    """One end of a worker's connection with its two arenas (either may be ``None``)."""

    def __init__(
        self,
        conn: Connection,
        out_arena: _shm.Arena | None,
        in_arena: _shm.Arena | None,
        *,
        wait_in_poll: bool = False,
    ) -> None:
        self.conn = conn  # owns the descriptor; its framing is not used
        self.wire = _Wire(conn.fileno(), wait_in_poll=wait_in_poll)
        self.out_arena = out_arena
        self.in_arena = in_arena

    def fileno(self) -> int:
        return self.wire.fd

    def readable(self) -> bool:
        return self.wire.readable()

    def close(self) -> None:
        self.wire.fd = -1  # a late write or read now fails with EBADF, never hits a reused fd
        self.conn.close()
        for arena in (self.out_arena, self.in_arena):
            if arena is not None:
                arena.close()

    def send(self, message: Any) -> None:
        """Encode and send ``message`` (one ``os.write`` for the common small one)."""
        if _plain(message, 3) and not (self.in_arena is not None and self.in_arena.released):
            buffers: list[pickle.PickleBuffer] = []
            body = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
            if not buffers:
                self.send_small(body)
            else:
                self.send_encoded(Encoded(body, [b.raw() for b in buffers]))
            return
        self.send_encoded(encode(message))

    def send_small(self, body: bytes) -> None:
        """Send an encoded message with no out-of-band buffers (one ``os.write``)."""
        released = self.in_arena is not None and self.in_arena.released
        if released or len(body) >= _CHUNK:
            self.send_encoded(Encoded(body, []))
            return
        size = self.out_arena.size if self.out_arena is not None else 0
        head = _HEAD.pack(0, 0, size, len(body))
        self.wire.send([head, body], _HEAD.size + len(body))

    def send_encoded(self, enc: Encoded) -> None:
        """Place large buffers in the arena, then write the header and the small buffers."""
        placed: list[tuple[int, int]] = []
        inline: list[memoryview] = []
        arena = self.out_arena
        try:
            for raw in enc.buffers:
                if arena is not None and raw.nbytes >= _shm.THRESHOLD:
                    placed.append((raw.nbytes, arena.write(raw)))
                else:
                    placed.append((raw.nbytes, _INLINE))
                    inline.append(raw)
        except BaseException as exc:
            for _, offset in placed:  # e.g. no room to grow: nothing was sent, free it all
                if arena is not None and offset != _INLINE:
                    arena.free(offset)
            if isinstance(exc, OSError | MemoryError):
                total = sum(raw.nbytes for raw in enc.buffers)
                raise PlacementError(
                    f"could not place {total} bytes of arrays in shared memory "
                    f"({type(exc).__name__}: {exc}); free memory, or send smaller requests"
                ) from exc
            raise
        released = self._drain_released()
        size = arena.size if arena is not None else 0
        if not placed and not released:  # the common small message
            self.wire.send([_HEAD.pack(0, 0, size, len(enc.body)), enc.body])
            return
        head = bytearray(_HEAD.pack(len(placed), len(released), size, len(enc.body)))
        for n, offset in placed:
            head += _BUF.pack(n, offset)
        for offset in released:
            head += _REL.pack(offset)
        self.wire.send([head, enc.body, *inline])

    def _drain_released(self) -> list[int]:
        arena = self.in_arena
        if arena is None or not arena.released:
            return []
        out = []
        released = arena.released
        while released:
            out.append(released.popleft())
        return out

    def recv(self, block: bool = True) -> Any:
        """Receive one message (``None`` while incomplete, with ``block=False``).

        Raises ``EOFError``/``OSError`` when the peer is gone, ``DecodeError`` when a whole
        message arrived but cannot be unpickled (the stream stays in step).
        """
        head = self.wire.recv(block)
        if head is None:
            return None
        n_buf, n_rel, writer_size, body_len = _HEAD.unpack_from(head)
        pos = _HEAD.size
        specs = []
        for _ in range(n_buf):
            specs.append(_BUF.unpack_from(head, pos))
            pos += _BUF.size
        if n_rel:
            arena = self.out_arena
            for _ in range(n_rel):
                (offset,) = _REL.unpack_from(head, pos)
                pos += _REL.size
                if arena is not None:
                    arena.free(offset)
        body = head[pos : pos + body_len]
        pos += body_len
        buffers: list[Any] = []
        for size, offset in specs:
            if offset == _INLINE:
                buffers.append(bytearray(head[pos : pos + size]))  # writable, owned
                pos += size
            else:
                if self.in_arena is None:
                    raise OSError("peer sent shared memory but this side has no arena")
                buffers.append(self.in_arena.read(offset, size, writer_size))
        try:
            return pickle.loads(body, buffers=buffers)
        except Exception as exc:
            raise DecodeError(RemoteException.capture(unreadable(exc))) from exc


# ---------------------------------------------------------------------- exceptions


@dataclasses.dataclass
class RemoteException:
    """An exception raised on the other side, in a form that always crosses the pipe."""

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
