"""The pool's basic contract: start, predict, apredict, stats, shutdown, errors for misuse."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

import modelpool
from _models import Doubler, Echo, Raiser, WhoAmI


def test_predict_roundtrip_and_writable_results() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with modelpool.Pool(Doubler, workers=2) as pool:
        out = pool.predict({"x": x})
        np.testing.assert_array_equal(out["y"], x * 2)
        assert out["y"].flags.writeable
        assert out["y"].flags.owndata or out["y"].base is not None


def test_import_string_and_bare_array_for_single_input() -> None:
    x = np.ones((3, 4), dtype=np.float32)
    with modelpool.Pool("_models:Doubler") as pool:
        np.testing.assert_array_equal(pool.predict(x)["y"], x * 2)


def test_inputs_arrive_writable_in_the_worker() -> None:
    class_ref = "_models:Echo"
    with modelpool.Pool(class_ref) as pool:
        out = pool.submit(_writable_in_worker, np.arange(5)).result()
    assert out is True


def _writable_in_worker(a: np.ndarray) -> bool:
    return bool(a.flags.writeable)


def test_options_reach_model_without_super_init() -> None:
    with modelpool.Pool(WhoAmI, options={"alpha": 1}) as pool:
        assert pool.predict(None)["options"] == {"alpha": 1}


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


def test_input_validation_in_caller() -> None:
    with modelpool.Pool(Doubler) as pool:
        with pytest.raises(modelpool.InputValidationError, match="FP32"):
            pool.predict({"x": np.ones((1, 4), dtype=np.float64)})
        with pytest.raises(modelpool.InputValidationError, match=r"shape \[-1, 4\]"):
            pool.predict({"x": np.ones((1, 3), dtype=np.float32)})
        with pytest.raises(modelpool.InputValidationError, match="no input named 'z'"):
            pool.predict({"x": np.ones((1, 4), dtype=np.float32), "z": np.ones(1)})
        with pytest.raises(modelpool.InputValidationError, match="missing input 'x'"):
            pool.predict({})


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


def test_every_error_subclasses_modelpool_error() -> None:
    from modelpool import _exceptions

    for name in _exceptions.__all__:
        cls = getattr(_exceptions, name)
        if name != "RemoteTraceback":
            assert issubclass(cls, modelpool.ModelpoolError), name
    assert issubclass(modelpool.RequestTimeoutError, TimeoutError)


def _visible_devices() -> tuple[int, str | None]:
    import os

    info = modelpool.worker_info()
    assert info is not None
    return info.index, os.environ.get("CUDA_VISIBLE_DEVICES")


def test_devices_spread_over_workers_through_cuda_visible_devices() -> None:
    with modelpool.Pool(None, workers=3, devices=["cuda:0", 1, "cpu"]) as pool:
        seen: dict[int, str | None] = {}
        for _ in range(200):
            index, visible = pool.submit(_visible_devices).result()
            seen[index] = visible
            if len(seen) == 3:
                break
    assert seen == {0: "0", 1: "1", 2: ""}


@pytest.mark.parametrize("devices", ["cuda:0", ["tpu:0"], ["cuda:x"]])
def test_devices_misuse_is_refused(devices: object) -> None:
    with pytest.raises((TypeError, ValueError), match="cuda"):
        modelpool.Pool(Echo, devices=devices)  # type: ignore[arg-type]


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
