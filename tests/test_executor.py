"""Pool as a concurrent.futures.Executor: submit, map (chunksize), initializer, by-value
functions, current_model(), and the data path's types (dtypes, strings, torch, big arrays)."""

from __future__ import annotations

import functools
import os
import threading

import numpy as np
import pytest
import torch

import modelpool
from _models import Echo, WhoAmI


def _square(x: int) -> int:
    return x * x


def _add(x: int, y: int) -> int:
    return x + y


def _model_name() -> str:
    return type(modelpool.current_model()).__name__


_INIT_VALUE: list[str] = []


def _init(value: str) -> None:
    _INIT_VALUE.append(value)


def _read_init() -> list[str]:
    return list(_INIT_VALUE)


def test_pool_without_model_is_an_executor() -> None:
    with modelpool.Pool(workers=2) as pool:
        assert pool.submit(_add, 2, y=3).result() == 5
        assert list(pool.map(_square, range(10))) == [i * i for i in range(10)]
        assert list(pool.map(_add, range(5), range(5))) == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("chunksize", [1, 3, 7, 100])
def test_map_chunksize_keeps_order(chunksize: int) -> None:
    with modelpool.Pool(workers=2) as pool:
        got = list(pool.map(_square, range(23), chunksize=chunksize))
    assert got == [i * i for i in range(23)]


def test_map_rejects_bad_chunksize() -> None:
    with modelpool.Pool(workers=1) as pool, pytest.raises(ValueError, match="chunksize"):
        pool.map(_square, [1], chunksize=0)


def test_map_timeout_covers_the_whole_map() -> None:
    import time

    with modelpool.Pool(workers=1) as pool:
        results = pool.map(time.sleep, [0.2, 0.2, 5], timeout=1.0)
        with pytest.raises(TimeoutError):
            list(results)


def test_map_crash_fails_that_item_only() -> None:
    with modelpool.Pool(workers=2) as pool:
        futures = [
            pool.submit(os._exit, 3) if i == 2 else pool.submit(_square, i) for i in range(5)
        ]
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result(timeout=20))
            except modelpool.WorkerCrashedError:
                outcomes.append("crashed")
        assert outcomes == [0, 1, "crashed", 9, 16]


def test_initializer_runs_in_every_worker_before_work() -> None:
    with modelpool.Pool(workers=2, initializer=_init, initargs=("hello",)) as pool:
        assert pool.submit(_read_init).result() == ["hello"]


def test_failing_initializer_is_a_setup_error() -> None:
    pool = modelpool.Pool(workers=1, initializer=_init, initargs=())  # wrong arity: TypeError
    with pytest.raises(modelpool.ModelSetupError, match="TypeError"):
        pool.start()


def test_current_model_in_submitted_function() -> None:
    with modelpool.Pool(Echo) as pool:
        assert pool.submit(_model_name).result() == "Echo"
    with pytest.raises(modelpool.ModelSpecError, match="outside a modelpool worker"):
        modelpool.current_model()


def _undecorated(fn):  # type: ignore[no-untyped-def]
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]  # no functools.wraps
        return fn(*args, **kwargs) + 1

    return wrapper


@_undecorated
def _decorated(x: int) -> int:
    return x * 10


def test_functions_that_cannot_be_imported_go_by_value() -> None:
    offset = 5

    def closure(x: int) -> int:
        return x + offset

    with modelpool.Pool(workers=1) as pool:
        assert pool.submit(_decorated, 2).result() == 21
        assert pool.submit(lambda x: x * 3, 4).result() == 12
        assert pool.submit(closure, 1).result() == 6
        assert pool.submit(functools.partial(_add, 1), 2).result() == 3
        assert list(pool.map(lambda x: -x, range(4), chunksize=2)) == [0, -1, -2, -3]


def test_function_that_cannot_travel_names_itself() -> None:
    lock = threading.Lock()

    def uses_lock() -> bool:
        return lock.locked()

    with modelpool.Pool(workers=1) as pool:
        with pytest.raises(modelpool.ModelSpecError, match="uses_lock") as info:
            pool.submit(uses_lock)
        assert "top level of a module" in str(info.value)


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
    arrays = {np.dtype(t).name: (np.arange(size) % 2).astype(t) for t in ALL_DTYPES}
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


def test_big_arrays_go_through_shared_memory_and_memory_is_reused() -> None:
    x = np.random.default_rng(0).random(4_000_000)  # 32 MB
    with modelpool.Pool(Echo) as pool:
        for _ in range(5):
            out = pool.predict({"x": x})
            np.testing.assert_array_equal(out["x"], x)
            del out
        worker = pool._supervisor._workers[0]
        # two 32 MB slots at most per direction: regions are reused once their arrays died
        assert worker.channel.out_arena.size <= 80 * 2**20
        assert worker.channel.in_arena.size <= 80 * 2**20
        kept = [pool.predict({"x": x})["x"] for _ in range(3)]  # results kept alive...
        kept[0][:] = -1  # ...are owned by the caller: writing one changes no other
        for other in kept[1:]:
            np.testing.assert_array_equal(other, x)


def test_no_shared_memory_left_after_crash_or_shutdown() -> None:
    before = shm_segments()
    with modelpool.Pool(WhoAmI) as pool:
        pool.predict({"x": np.ones(1_000_000)})
        pid = pool.predict(None)["pid"]
        os.kill(pid, 9)
        while pid in {w.pid for w in pool.stats().workers} or pool.stats().workers[0].pid is None:
            threading.Event().wait(0.02)
        assert pool.predict(None)["pid"] != pid
    # arenas are memfds: nothing named, nothing to leak. Segments that other processes made
    # meanwhile (parallel test workers, other programs) and still hold are theirs, not ours.
    left = shm_segments() - before - _held_by_others()
    assert not left, left


def test_script_read_from_stdin_can_use_a_pool() -> None:
    """H9 variant: ``python - < script.py`` has ``__main__.__file__ == '<stdin>'``, which
    multiprocessing would try to re-run in every worker (FileNotFoundError)."""
    import subprocess
    import sys

    script = (
        "import modelpool\n"
        "def double(x):\n"
        "    return 2 * x\n"
        "with modelpool.Pool(workers=2) as pool:\n"
        "    print(list(pool.map(double, range(4))), pool.submit(lambda: 7).result())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-"], input=script, capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, 2, 4, 6] 7"


def test_closures_are_pickled_with_their_current_state() -> None:
    state = {"n": 1}

    def read() -> int:
        return state["n"]

    with modelpool.Pool(workers=1) as pool:
        assert pool.submit(read).result() == 1
        state["n"] = 11
        assert pool.submit(read).result() == 11


def _current_model_in_setup() -> None:
    modelpool.current_model()


def test_current_model_while_loading_says_so() -> None:
    pool = modelpool.Pool(Echo, initializer=_current_model_in_setup)
    with pytest.raises(modelpool.ModelSetupError, match="still loading"):
        pool.start()


def test_arena_that_cannot_grow_fails_the_request_not_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from modelpool import _shm

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


def shm_segments() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def _held_by_others() -> set[str]:
    """/dev/shm names mapped by a live process outside this one and its children."""
    import psutil

    mine = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
    names = set()
    for proc in psutil.process_iter():
        if proc.pid in mine:
            continue
        try:
            maps = proc.memory_maps(grouped=True)
        except (psutil.Error, OSError):
            continue
        names |= {m.path[len("/dev/shm/") :] for m in maps if m.path.startswith("/dev/shm/")}
    return names
