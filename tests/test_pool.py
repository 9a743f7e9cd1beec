"""The pool's basic contract: start, predict, apredict, stats, shutdown, errors for misuse;
submit and map as a ``concurrent.futures.Executor``; multiprocessing's helper processes at
the end of a script."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import modelpool
from _models import Doubler, Echo, FrozenDoubler, Raiser, WhoAmI
from _reaping import adopted, left_behind, orphans_adopted
from _waiting import wait_for


@pytest.mark.parametrize("rows", [2, 8192], ids=["pipe", "shared-memory"])
def test_predict_roundtrip_and_writable_results(rows: int) -> None:
    """The answer is right and writable although the model's output is read-only in the worker
    (an array that is writable there arrives writable anyway), and it is the caller's own:
    writing into it changes no other answer, and no later answer overwrites it."""
    x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)  # 8192 rows: 128 KiB, an arena
    with modelpool.Pool(FrozenDoubler, workers=1) as pool:
        first = pool.predict({"x": x})["y"]
        np.testing.assert_array_equal(first, x * 2)
        assert first.flags.writeable
        first += 1  # in place; a read-only array raises "output array is read-only"
        second = pool.predict({"x": x})["y"]  # the same worker, the same arenas
        np.testing.assert_array_equal(second, x * 2)
        np.testing.assert_array_equal(first, x * 2 + 1)


def test_import_string_and_bare_array_for_single_input() -> None:
    x = np.ones((3, 4), dtype=np.float32)
    with modelpool.Pool("_models:Doubler") as pool:
        np.testing.assert_array_equal(pool.predict(x)["y"], x * 2)


def test_apredict_from_successive_event_loops() -> None:
    with modelpool.Pool(Echo, workers=2) as pool:

        async def many() -> list[int]:
            outs = await asyncio.gather(*(pool.apredict({"i": np.array(i)}) for i in range(20)))
            return [int(o["i"]) for o in outs]

        assert asyncio.run(many()) == list(range(20))
        assert asyncio.run(many()) == list(range(20))  # a second loop on the same pool


def test_predict_from_many_threads() -> None:
    results: dict[int, int] = {}
    with modelpool.Pool(Echo, workers=2) as pool:

        def call(i: int) -> None:
            results[i] = int(pool.predict({"i": np.array(i)})["i"])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == {i: i for i in range(16)}


def test_worker_info_and_stats() -> None:
    with modelpool.Pool(WhoAmI, workers=2, seed=123, threads_per_worker=1) as pool:
        info = pool.predict(None)["info"]
        assert isinstance(info, modelpool.WorkerInfo)
        assert info.index in (0, 1)
        assert info.generation == 0
        assert info.threads == 1
        stats = pool.stats()
        assert [w.index for w in stats.workers] == [0, 1]
        for w in stats.workers:
            assert w.pid
            assert w.state == "idle"
            assert w.restarts == 0
            assert w.last_exit is None
            assert w.rss
            assert w.rss > 1_000_000
            assert w["pid"] == w.pid  # also readable as a mapping
        assert sum(w.served for w in stats.workers) == 1
        assert stats["queued"] == 0
    assert modelpool.worker_info() is None  # not in a worker


def test_start_wait_false_then_predict() -> None:
    pool = modelpool.Pool(Echo, workers=1).start(wait=False)
    try:
        assert pool.predict({"a": np.array(1)})["a"] == 1
    finally:
        pool.shutdown()


def test_calls_after_shutdown_raise_pool_closed() -> None:
    pool = modelpool.Pool(Echo).start()
    pool.shutdown()
    with pytest.raises(modelpool.PoolClosedError):
        pool.predict({"a": np.array(1)})
    with pytest.raises(modelpool.PoolClosedError):
        pool.submit(print)
    with pytest.raises(modelpool.PoolClosedError):
        pool.start()
    pool.shutdown()  # idempotent


def test_the_server_seam_start_predict_probe_terminate() -> None:
    """What a server embedding a pool uses: start_predict (its future and the worker's pid),
    probe (through a worker, not counted as served) and terminate."""
    with modelpool.Pool(WhoAmI, workers=1) as pool:
        started = pool.start_predict("x", request_id="r-1")
        assert started.future.result(timeout=60)["pid"] == started.worker_pid
        assert pool.probe().result(timeout=60) is True
        assert pool.stats()["workers"][0].served == 1  # the probe is not counted
        pool.terminate()
        with pytest.raises(modelpool.PoolClosedError):
            pool.start_predict("x")
        with pytest.raises(modelpool.PoolClosedError):
            pool.probe()
        pool.terminate()  # again: nothing left to do
    unstarted = modelpool.Pool(Doubler)
    with pytest.raises(modelpool.InputValidationError):  # raised here, not in a future
        unstarted.start_predict({"x": np.zeros((1, 3), np.float32)})
    unstarted.terminate()  # never started: nothing to kill


def test_shutdown_of_never_started_pool() -> None:
    pool = modelpool.Pool(Echo)
    pool.shutdown()
    with pytest.raises(modelpool.PoolClosedError):
        pool.predict({"a": np.array(1)})


def test_user_exception_keeps_type_and_remote_traceback() -> None:
    with modelpool.Pool(Raiser) as pool:
        with pytest.raises(ValueError, match="bad value 42") as info:
            pool.predict("value")
        cause = info.value.__cause__
        assert isinstance(cause, modelpool.RemoteTraceback)
        assert "bad value 42" in cause.tb
        assert "_models.py" in cause.tb
        assert pool.predict("fine") == "ok"  # the worker is still serving


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"workers": 0}, ValueError),
        ({"workers": 1.5}, TypeError),
        ({"timeout": -1}, ValueError),
        ({"retries": -1}, ValueError),
        ({"start_method": "teleport"}, ValueError),
        ({"max_memory_per_worker": "lots"}, ValueError),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        modelpool.Pool(Echo, **kwargs)  # type: ignore[arg-type]


def test_public_names_are_sorted_and_complete() -> None:
    assert modelpool.__all__ == sorted(modelpool.__all__)
    import types

    public = {
        n
        for n in dir(modelpool)
        if not n.startswith("_") and not isinstance(getattr(modelpool, n), types.ModuleType)
    }
    public |= {"Client", "ServerError", "ServerTimeoutError"}  # imported on first use
    assert public == set(modelpool.__all__) - {"__version__"}
    for name in modelpool.__all__:
        assert getattr(modelpool, name) is not None


@pytest.mark.parametrize("devices", ["cuda:0", ["tpu:0"], ["cuda:x"]])
def test_devices_misuse_is_refused(devices: object) -> None:
    with pytest.raises((TypeError, ValueError), match="cuda"):
        modelpool.Pool(Echo, devices=devices)  # type: ignore[arg-type]


# ---------------------------------------------------- as a concurrent.futures.Executor: submit, map


def _square(x: int) -> int:
    return x * x


def _add(x: int, y: int) -> int:
    return x + y


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
    """``timeout`` bounds the whole map, as in ``concurrent.futures``: three items of 0.4 s on
    one worker take 1.2 s, so a 1 s timeout expires although no item comes near it alone."""
    import time

    with modelpool.Pool(workers=1) as pool:
        results = pool.map(time.sleep, [0.4, 0.4, 0.4], timeout=1.0)
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


# ---------------------------------------------------------- more misuse, and the end of the process


@pytest.mark.parametrize(
    ("text", "size"), [("1.5GB", int(1.5 * 1024**3)), ("512MiB", 512 * 1024**2), (1000, 1000)]
)
def test_memory_limits_parse(text: object, size: int) -> None:
    pool = modelpool.Pool(Echo, max_memory_per_worker=text)  # type: ignore[arg-type]
    assert pool._settings.max_memory_per_worker == size


def test_predict_on_a_pool_without_model_fails_in_the_caller() -> None:
    with modelpool.Pool(workers=1) as pool:
        with pytest.raises(modelpool.ModelSpecError, match="without a model"):
            pool.predict({})
        assert pool.submit(os.getpid).result() > 0


def test_dropped_pool_does_not_hang_interpreter_exit(tmp_path: Path) -> None:
    script = tmp_path / "drop.py"
    script.write_text(
        "import modelpool, os\n"
        "if __name__ == '__main__':\n"
        "    pool = modelpool.Pool(workers=2).start()\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    del pool\n"
    )
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    worker = int(done.stdout.split()[0])
    wait_for(lambda: not _alive(worker), 30, "the dropped pool's workers to exit")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


SCRIPT = textwrap.dedent(
    """
    import json, multiprocessing, psutil
    from modelpool import Pool
    from modelpool.demo import MODEL
    from modelpool._atexit import stop_process_helpers

    def children():
        return {p.pid for p in psutil.Process().children(recursive=True)}

    if __name__ == "__main__":
        with Pool(MODEL, workers=1) as pool:
            first = children()
            assert not stop_process_helpers(), "a running pool still needs them"
        helpers = children()  # the workers are gone; the helpers stay for the next pool
        with Pool(MODEL, workers=1) as pool:
            second = children()
        print(json.dumps({"first": sorted(first), "second": sorted(second),
                          "helpers": sorted(helpers)}))
    """
)


def test_a_script_with_pools_leaves_no_process_behind() -> None:
    watched: set[int] = set()
    with orphans_adopted(watched):
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        seen = json.loads(done.stdout)
        helpers = set(seen["helpers"])
        assert len(helpers) == 2, seen  # fork server and resource tracker
        assert helpers < set(seen["first"])  # shared by both pools
        assert helpers < set(seen["second"])
        watched |= set(seen["first"]) | set(seen["second"])
        assert not [p for p in watched if adopted(p)], left_behind(watched)
        assert not left_behind(watched)
