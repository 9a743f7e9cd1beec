"""Shared-memory arenas (``_shm``): the allocator and the reader's release on real memfds;
then with a pool: big arrays go through them and regions are reused, a finished request
pins none, an arena that cannot grow fails one request only, and no process holds a
worker's arenas once it crashed or the pool shut down."""

from __future__ import annotations

import os

import numpy as np
import psutil
import pytest

import modelpool
from _models import Crashy, Echo
from _waiting import wait_for
from modelpool import _shm

#: what /proc shows for an arena, as a descriptor's link or a mapping's path
ARENA = "/memfd:modelpool-"


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


def test_big_arrays_go_through_shared_memory_and_memory_is_reused() -> None:
    x = np.random.default_rng(0).random(4_000_000)  # 32 MB
    with modelpool.Pool(Echo) as pool:
        for _ in range(5):
            out = pool.predict({"x": x})
            np.testing.assert_array_equal(out["x"], x)
            del out
        worker = pool._supervisor.fleet.workers[0]
        # two 32 MB slots at most per direction: regions are reused once their arrays died
        assert worker.channel.out_arena.size <= 80 * 2**20
        assert worker.channel.in_arena.size <= 80 * 2**20
        kept = [pool.predict({"x": x})["x"] for _ in range(3)]  # results kept alive...
        kept[0][:] = -1  # ...are owned by the caller: writing one changes no other
        for other in kept[1:]:
            np.testing.assert_array_equal(other, x)


def test_finished_requests_do_not_pin_shared_memory_until_their_deadline() -> None:
    x = np.ones(1_000_000)  # 8 MB: through the arenas
    with modelpool.Pool(Echo, workers=1, timeout=600) as pool:
        for _ in range(20):
            pool.predict({"x": x})
            pool.submit(np.copy, x).result()
        worker = pool._supervisor.fleet.workers[0]
        assert worker.channel.in_arena.size <= 40 * 2**20
        assert worker.channel.out_arena.size <= 40 * 2**20
        assert len(pool._supervisor.deadlines) == 0


def test_arena_that_cannot_grow_fails_the_request_not_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with modelpool.Pool(Echo) as pool:
        pid = pool.stats().workers[0].pid

        def no_room(self: object, needed: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(_shm.Arena, "_grow", no_room)
        with pytest.raises(MemoryError, match="shared memory"):
            pool.predict({"x": np.ones(1_000_000)})
        monkeypatch.undo()
        assert pool.predict({"x": np.ones(3)})["x"].sum() == 3
        assert pool.stats().workers[0].pid == pid


def test_no_shared_memory_left_after_crash_or_shutdown() -> None:
    """Arenas are memfds, never in /dev/shm: what could leak is a descriptor or a mapping. Each
    worker's two arenas are held by that worker and the pool's process alone; once the worker
    crashed, or the pool shut down, no process of this test holds them, open or mapped."""
    x = np.ones(1_000_000)  # 8 MB: through the arenas, both ways
    before = set().union(*_arenas_held().values())  # an earlier test's: not this one's business

    def check_held_by_their_workers_only() -> dict[int, set[int]]:
        held = {pid: arenas - before for pid, arenas in _arenas_held().items()}
        workers = {w.pid: held.get(w.pid, set()) for w in pool.stats().workers}
        assert len(workers) == 2, pool.stats()
        a, b = workers.values()
        assert len(a) == 2, held  # in and out: the worker's own two, no one else's
        assert len(b) == 2, held
        assert a.isdisjoint(b), held
        assert held[os.getpid()] == a | b, held  # the pool's side of each, and nothing more
        others = [pid for pid, arenas in held.items() if arenas and pid not in workers]
        assert others == [os.getpid()], held  # not the fork server, not the resource tracker
        return workers

    with modelpool.Pool(Crashy, workers=2) as pool:
        for _ in range(4):
            np.testing.assert_array_equal(pool.submit(np.copy, x).result(timeout=60), x)
        first = check_held_by_their_workers_only()
        with pytest.raises(modelpool.WorkerCrashedError) as info:
            pool.predict({"x": x, "die": "sigkill"}, timeout=60)  # dies with its input mapped
        gone = first[info.value.pid]
        wait_for(
            lambda: (
                info.value.pid not in _pids(pool)
                and [w.state for w in pool.stats().workers] == ["idle", "idle"]
            ),
            30,
            "the crashed worker's replacement",
        )
        np.testing.assert_array_equal(pool.submit(np.copy, x).result(timeout=60), x)
        then = check_held_by_their_workers_only()
        assert gone.isdisjoint(set().union(*then.values()))
        assert not [pid for pid, arenas in _arenas_held().items() if arenas & gone]
    left = {pid: arenas - before for pid, arenas in _arenas_held().items()}
    assert not any(left.values()), left


def _pids(pool: modelpool.Pool) -> set[int]:
    return {w.pid for w in pool.stats().workers if w.pid is not None}


def _arenas_held() -> dict[int, set[int]]:
    """pid -> the memfd arenas (their inode numbers) that process holds, open or mapped, for
    this process and each of its descendants."""
    held = {}
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            held[proc.pid] = _arenas_of(proc.pid)
        except (FileNotFoundError, ProcessLookupError):
            continue  # it exited meanwhile
    return held


def _arenas_of(pid: int) -> set[int]:
    found = set()
    fds = f"/proc/{pid}/fd"
    for fd in os.listdir(fds):
        try:
            if os.readlink(f"{fds}/{fd}").startswith(ARENA):
                found.add(os.stat(f"{fds}/{fd}").st_ino)
        except FileNotFoundError:
            continue  # closed meanwhile
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)  # address perms offset dev inode path
            if len(fields) == 6 and fields[5].startswith(ARENA):
                found.add(int(fields[4]))
    return found
