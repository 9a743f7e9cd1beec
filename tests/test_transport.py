"""The framing and arenas under the pool, on a real socketpair and real memfds."""

from __future__ import annotations

import os
import socket
import struct
import threading

import numpy as np
import pytest

from modelpool import _shm, _transport


@pytest.fixture
def wires():  # type: ignore[no-untyped-def]
    a, b = socket.socketpair()
    yield _transport._Wire(a.fileno()), _transport._Wire(b.fileno()), a, b
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
    reader.join(0.2)
    assert reader.is_alive()  # blocked: the peer (left) is open and silent
    right.shutdown()
    reader.join(5)
    assert not reader.is_alive()
    assert isinstance(errors[0], EOFError)


def test_arena_allocator_reuses_freed_regions_first_fit() -> None:
    arena = _shm.Arena.create("test")
    try:
        a = arena.write(memoryview(bytes(1000)))
        b = arena.write(memoryview(bytes(5000)))
        assert (a, b) == (0, 1024)
        arena.free(a)
        assert arena.write(memoryview(bytes(900))) == 0  # fits the hole
        assert arena.write(memoryview(bytes(900))) >= 1024 + 5000  # does not overlap b
        size = arena.size
        arena.write(memoryview(bytes(3 * size)))  # grows
        assert arena.size >= 4 * size
    finally:
        arena.close()


def test_reader_reports_a_region_only_after_its_arrays_die() -> None:
    writer = _shm.Arena.create("w")
    reader = _shm.Arena(os.dup(writer.fd))
    try:
        data = np.arange(1000, dtype=np.float64)
        offset = writer.write(memoryview(data).cast("B"))
        array = np.frombuffer(reader.read(offset, data.nbytes, writer.size), dtype=np.float64)
        view = array[10:20]
        del array
        assert list(reader.released) == []  # a view still uses the region
        np.testing.assert_array_equal(view, data[10:20])
        del view
        assert list(reader.released) == [offset]
    finally:
        writer.close()
        reader.close()


@pytest.mark.parametrize("pieces", [1023, 1024, 1025, 3_000, 10_001])
def test_a_message_of_more_pieces_than_iov_max_arrives_whole(wires, pieces: int) -> None:  # type: ignore[no-untyped-def]
    """writev takes at most IOV_MAX (1024 here) buffers: more used to fail with EINVAL."""
    left, right, _, _ = wires
    parts = [bytes([i % 256]) * 40 for i in range(pieces)]
    sender = threading.Thread(target=left.send, args=(parts,))
    sender.start()
    assert bytes(right.recv()) == b"".join(parts)
    sender.join()
