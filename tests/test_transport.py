"""What crosses between the pool and a worker (``_transport``): the framing, on a real
socketpair; then what a pool's messages carry: every dtype and layout, torch tensors,
read-only arrays made writable, thousands of buffers, exceptions and results that cannot
travel, and a write that fails. (The arenas under it: test_shm.py.)"""

from __future__ import annotations

import os
import socket
import struct
import threading

import numpy as np
import pytest

import modelpool
from _deps import deferred_module
from _models import Echo, Raiser
from _waiting import wait_for
from modelpool import _transport

torch = deferred_module("torch")  # optional: imported by the test that uses it


@pytest.fixture(params=[False, True], ids=["read", "poll"])
def wires(request):  # type: ignore[no-untyped-def]
    a, b = socket.socketpair()
    poll = request.param  # how a blocking read waits
    yield (
        _transport._Wire(a.fileno(), wait_in_poll=poll),
        _transport._Wire(b.fileno(), wait_in_poll=poll),
        a,
        b,
    )
    a.close()
    b.close()


@pytest.mark.parametrize("size", [0, 1, 100, 65_535, 65_536, 1_000_000])
def test_messages_of_every_size_arrive_whole(wires, size: int) -> None:  # type: ignore[no-untyped-def]
    left, right, _, _ = wires
    payload = os.urandom(size)
    sender = threading.Thread(
        target=left.send, args=([payload[: size // 2], payload[size // 2 :]],)
    )
    sender.start()
    assert bytes(right.recv()) == payload
    sender.join()


def test_two_messages_in_one_read_and_one_split_across_reads(wires) -> None:  # type: ignore[no-untyped-def]
    _, right, a, _ = wires
    frame = lambda body: struct.pack("<Q", len(body)) + body  # noqa: E731
    a.sendall(frame(b"first") + frame(b"second")[:5])  # the second arrives in pieces
    assert bytes(right.recv()) == b"first"
    a.sendall(frame(b"second")[5:])
    assert bytes(right.recv()) == b"second"


def test_end_of_file_is_eof_error(wires) -> None:  # type: ignore[no-untyped-def]
    _, right, a, _ = wires
    a.sendall(struct.pack("<Q", 10) + b"abc")
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(EOFError, match="closed the connection"):
        right.recv()


@pytest.mark.parametrize("size", [10, 200_000])
def test_non_blocking_recv_keeps_a_partial_message(wires, size: int) -> None:  # type: ignore[no-untyped-def]
    _, right, a, _ = wires
    body = os.urandom(size)
    framed = struct.pack("<Q", size) + body
    assert right.recv(block=False) is None  # nothing yet
    a.sendall(framed[:3])
    assert right.recv(block=False) is None  # not even the length
    a.sendall(framed[3 : size // 2])
    assert right.recv(block=False) is None  # half a message: kept, not lost
    a.sendall(framed[size // 2 :])
    got = None
    while got is None:
        got = right.recv(block=False)
    assert bytes(got) == body


def test_shutdown_wakes_a_blocked_reader_even_if_the_peer_end_stays_open(wires) -> None:  # type: ignore[no-untyped-def]
    _, right, _, _ = wires  # the left end stays open and silent
    errors: list[BaseException] = []

    def read() -> None:
        try:
            right.recv()
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    wait_for(lambda: _blocked_reading(reader), 60, "the reader to block on the socket")
    right.shutdown()
    reader.join(5)
    assert not reader.is_alive()
    assert isinstance(errors[0], EOFError)


def test_readable_may_be_asked_while_another_thread_waits_to_read(wires) -> None:  # type: ignore[no-untyped-def]
    """The supervisor asks ``readable()`` while a caller thread waits for its answer (a poll
    object polled by two threads at once raises RuntimeError)."""
    left, right, _, _ = wires
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(bytes(right.recv())))
    reader.start()
    wait_for(lambda: _blocked_reading(reader), 60, "the reader to block on the socket")
    assert not right.readable()
    left.send([b"hello"])
    reader.join(30)
    assert got == [b"hello"]


def _blocked_reading(thread: threading.Thread) -> bool:
    """Whether ``thread`` sleeps in the kernel waiting to read a Unix socket (in the read, or
    in poll with ``wait_in_poll``: see ``_Wire._read_into``)."""
    with open(f"/proc/self/task/{thread.native_id}/wchan") as f:
        return f.read() in ("unix_stream_read_generic", "poll_schedule_timeout.constprop.0")


@pytest.mark.parametrize("pieces", [1023, 1024, 1025, 3_000, 10_001])
def test_a_message_of_more_pieces_than_iov_max_arrives_whole(wires, pieces: int) -> None:  # type: ignore[no-untyped-def]
    """writev takes at most IOV_MAX (1024 here) buffers: more used to fail with EINVAL."""
    left, right, _, _ = wires
    parts = [bytes([i % 256]) * 40 for i in range(pieces)]
    sender = threading.Thread(target=left.send, args=(parts,))
    sender.start()
    assert bytes(right.recv()) == b"".join(parts)
    sender.join()


# ---------------------------------------------------------------- what a pool's messages carry


ALL_DTYPES = [
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
]


@pytest.mark.parametrize("size", [3, 200_000])  # through the pipe, and through shared memory
def test_every_dtype_round_trips_writable(size: int) -> None:
    """Read-only at the caller (a writable array would arrive writable anyway), each comes back
    equal, of its dtype and writable."""
    arrays = {np.dtype(t).name: (np.arange(size) % 2).astype(t) for t in ALL_DTYPES}
    for array in arrays.values():
        array.flags.writeable = False
    with modelpool.Pool(Echo) as pool:
        out = pool.predict(arrays)
    for name, array in arrays.items():
        assert out[name].dtype == array.dtype, name
        np.testing.assert_array_equal(out[name], array)
        assert out[name].flags.writeable, name


def test_odd_arrays_round_trip() -> None:
    big = np.arange(1_000_000, dtype=np.float64)
    arrays = {
        "strings": np.array(["a", "bc", ""], dtype=object),
        "bytes": np.array([b"\x00\x01", b""], dtype=object),
        "unicode": np.array(["héllo", "wörld"]),
        "empty": np.zeros((0, 5), dtype=np.float32),
        "strided": big[::3],
        "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        "scalar": np.array(3.5),
        "readonly": np.frombuffer(b"\x01\x02\x03\x04", dtype=np.uint8),
    }
    with modelpool.Pool(Echo) as pool:
        out = pool.predict(arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(out[name], array)
        assert out[name].dtype == array.dtype
        assert out[name].flags.writeable, name


def test_torch_tensors_come_back_as_tensors() -> None:
    tensors = {
        "f32": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "bf16": torch.ones(300_000, dtype=torch.bfloat16),
        "int": torch.tensor([1, 2, 3]),
        "noncontig": torch.arange(20.0)[::2],
        "grad": torch.ones(3, requires_grad=True),
    }
    with modelpool.Pool(Echo) as pool:
        out = pool.predict(tensors)
    for name, tensor in tensors.items():
        assert isinstance(out[name], torch.Tensor), name
        assert out[name].dtype == tensor.dtype
        assert torch.equal(out[name], tensor.detach())


@pytest.mark.parametrize("size", [5, 100_000], ids=["pipe", "shared-memory"])
def test_inputs_arrive_writable_in_the_worker(size: int) -> None:
    """A read-only input (``np.frombuffer`` over bytes, as tritonclient's ``as_numpy`` gives)
    arrives writable in the worker, over the worker's own memory: the caller's bytes stay."""
    raw = np.arange(size, dtype=np.float64).tobytes()
    x = np.frombuffer(raw, dtype=np.float64)
    assert not x.flags.writeable
    with modelpool.Pool(Echo) as pool:
        writeable, out = pool.submit(_add_one_in_place, x).result(timeout=60)
    assert writeable is True
    np.testing.assert_array_equal(out, np.arange(size) + 1)
    assert raw == np.arange(size, dtype=np.float64).tobytes()


def _add_one_in_place(a: np.ndarray) -> tuple[bool, np.ndarray]:
    writeable = bool(a.flags.writeable)
    a += 1  # raises ValueError on a read-only array
    return writeable, a


@pytest.mark.parametrize("n", [3_000, 10_000])
def test_thousands_of_small_tensors_in_and_out(n: int) -> None:
    """Each array is one buffer of the message: thousands of them used to fail with a bare
    ``OSError: [Errno 22] Invalid argument`` from writev (more than IOV_MAX pieces)."""
    inputs = {f"in{i}": np.full(3, i, np.float32) for i in range(n)}
    with modelpool.Pool(Echo) as pool:
        out = pool.predict(inputs)
        batched = modelpool.Pool(Echo, max_batch_size=8)
        with batched:
            out_batched = batched.predict(inputs)
    for answer in (out, out_batched):
        assert len(answer) == n
        np.testing.assert_array_equal(answer[f"in{n - 1}"], np.full(3, n - 1, np.float32))
        assert answer["in0"].flags.writeable


def test_unpicklable_exception_arrives_as_remote_error() -> None:
    with modelpool.Pool(Raiser) as pool:
        with pytest.raises(modelpool.RemoteError) as info:
            pool.predict("unpicklable")
        assert info.value.type_name == "_models.Unpicklable"
        assert "1-2" in info.value.remote_message
        assert "Traceback" in info.value.remote_traceback
        assert pool.predict("fine") == "ok"


def test_result_that_cannot_be_encoded_fails_only_that_request() -> None:
    with modelpool.Pool(Raiser) as pool:
        with pytest.raises(TypeError, match="cannot be sent back"):
            pool.predict("lock")
        assert pool.predict("fine") == "ok"


@pytest.mark.parametrize("path", ["predict", "batched", "submit"])
def test_a_local_transport_failure_is_a_modelpool_error_never_the_models(
    monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """A write that fails in this process (here EINVAL, as writev gives past IOV_MAX) fails the
    request with TransportError, replaces the worker, and the pool keeps serving."""
    from modelpool import _transport

    real = _transport._Wire.send
    failed: list[int] = []

    def send_once_then_fail(self: _transport._Wire, parts: list, total: int | None = None) -> None:
        if not failed:
            failed.append(1)
            raise OSError(22, "Invalid argument")
        real(self, parts, total)

    batch = 8 if path == "batched" else 1
    with modelpool.Pool(Echo, workers=1, max_batch_size=batch) as pool:
        pid = pool.stats().workers[0].pid
        monkeypatch.setattr(_transport._Wire, "send", send_once_then_fail)
        call = (
            (lambda: pool.submit(abs, -1).result(timeout=60))
            if path == "submit"
            else (lambda: pool.predict({"x": np.ones((1, 2), np.float32)}))
        )
        with pytest.raises(modelpool.TransportError, match="could not exchange") as info:
            call()
        assert isinstance(info.value.__cause__, OSError)
        assert pool.predict({"x": np.ones((1, 2), np.float32)})["x"].shape == (1, 2)
        assert pool.stats().workers[0].pid != pid  # out of step: replaced
