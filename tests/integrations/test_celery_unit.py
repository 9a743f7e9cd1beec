"""The ``modelpool`` serializer, ``install()``, ``predict()`` and the worker bootstep's checks,
without a broker or a worker process."""

from __future__ import annotations

import datetime
import decimal
import os
import pickle
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from _deps import need_module

need_module("celery")
need_module("msgpack")

from celery import Celery  # noqa: E402
from kombu import serialization  # noqa: E402
from kombu.exceptions import ContentDisallowed  # noqa: E402

from modelpool import ModelpoolError, UnsafeForkError  # noqa: E402
from modelpool.config import ConfigError  # noqa: E402
from modelpool.integrations import _celery_codec as codec  # noqa: E402
from modelpool.integrations import celery as mp_celery  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIG = {"models": {"affine": {"model": "_celery_models:Affine", "workers": 2}}}

DTYPES = [
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64", "longdouble", "complex64", "complex128", ">i4", ">f8",
    "datetime64[ns]", "datetime64[D]", "timedelta64[s]", "S5", "U7", "V3",
]  # fmt: skip


def _roundtrip(value: Any) -> Any:
    return codec.loads(codec.dumps(value))


def _example(dtype: str) -> np.ndarray[Any, Any]:
    base = np.arange(12).reshape(3, 4)
    if dtype.startswith("V"):
        return np.frombuffer(bytes(range(36)), dtype=dtype).reshape(3, 4).copy()
    return base.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_round_trips_writable(dtype: str) -> None:
    array = _example(dtype)
    array.flags.writeable = False  # read-only at the sender, like np.frombuffer's arrays
    out = _roundtrip({"x": array})["x"]
    assert (out.dtype, out.shape) == (array.dtype, array.shape)
    assert out.tobytes() == array.tobytes()
    assert out.flags.writeable
    out[...] = out[0, 0]  # writable for real


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12.0).reshape(3, 4).T,  # Fortran order
        np.arange(20)[::3],  # not contiguous
        np.zeros((0, 5), dtype=np.float32),  # zero-size
        np.array(2.5),  # 0-d
        np.array([(1, [2.0, 3.0], (4, b"ab"))], dtype=[
            ("a", "<i4"), ("b", "<f8", (2,)), ("c", [("d", "u1"), ("e", "S2")])
        ]),  # structured, nested
    ],
    ids=["fortran", "strided", "zero-size", "0-d", "structured"],
)  # fmt: skip
def test_layouts_round_trip(array: np.ndarray[Any, Any]) -> None:
    out = _roundtrip(array)
    assert (out.dtype, out.shape) == (array.dtype, array.shape)
    assert out.tobytes() == np.ascontiguousarray(array).tobytes()
    assert out.flags.writeable
    assert out.flags.c_contiguous


def test_object_arrays_carry_strings_bytes_and_none() -> None:
    array = np.array(["text", b"\x00bytes", None, 7, [1, 2]], dtype=object).reshape(5, 1)
    out = _roundtrip(array)
    assert (out.dtype, out.shape) == (object, (5, 1))
    assert out.flags.writeable
    assert out.ravel().tolist() == ["text", b"\x00bytes", None, 7, [1, 2]]
    assert _roundtrip(np.array([], dtype=object)).shape == (0,)


def test_scalars_and_celery_metadata_types_come_back_as_themselves() -> None:
    values = [
        np.float32(1.5), np.int64(-3), np.bool_(True), np.datetime64("2024-01-02"),
        datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC),
        datetime.date(2024, 5, 6), datetime.time(7, 8), uuid.uuid4(), decimal.Decimal("1.10"),
        {"nested": [1, "two", b"three", None, 4.5]}, {3: "int keys"},
    ]  # fmt: skip
    out = _roundtrip(values)
    assert out == values
    assert [type(v) for v in out] == [type(v) for v in values]
    assert _roundtrip((1, 2)) == [1, 2]  # tuples become lists, as with JSON


def test_other_objects_are_refused_with_their_name() -> None:
    class Opaque:
        pass

    with pytest.raises(TypeError, match=r"Opaque cannot travel .* \(no pickle\)"):
        codec.dumps({"x": Opaque()})
    with pytest.raises(TypeError, match="object fields"):
        codec.dumps(np.zeros(2, dtype=[("a", object)]))


def test_registered_with_kombu_and_only_our_content_type_is_decoded() -> None:
    codec.register()
    content_type, encoding, body = serialization.dumps({"x": np.ones(3)}, serializer="modelpool")
    assert (content_type, encoding) == (codec.CONTENT_TYPE, "binary")
    out = serialization.loads(body, content_type, encoding, accept=[codec.CONTENT_TYPE])
    assert out["x"].flags.writeable
    assert out["x"].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ContentDisallowed):
        serialization.loads(body, content_type, encoding, accept=["application/json"])


def _app(tmp_path: Path, **options: Any) -> Celery:
    app = Celery("unit", broker="memory://", backend="cache+memory://", set_as_current=False)
    mp_celery.install(app, CONFIG, **options)
    return app


def test_install_registers_the_task_and_the_serializer(tmp_path: Path) -> None:
    app = _app(tmp_path)
    task = app.tasks[mp_celery.TASK_NAME]
    assert task.serializer == "modelpool"
    assert task.acks_late
    assert task.reject_on_worker_lost
    assert "modelpool" in app.conf.accept_content
    assert "pickle" not in app.conf.accept_content
    assert app.conf.result_serializer == "modelpool"
    assert not _app(tmp_path, worker_lost="fail").tasks[mp_celery.TASK_NAME].reject_on_worker_lost


def test_install_survives_a_later_config_from_object(tmp_path: Path) -> None:
    app = Celery("unit", broker="memory://", set_as_current=False)
    mp_celery.install(app, CONFIG)
    app.config_from_object({"accept_content": ["json"], "result_accept_content": ["json"]})
    assert app.conf.accept_content == ["json", "modelpool"]
    assert app.conf.result_accept_content == ["json", "modelpool"]
    assert app.conf.result_serializer == "modelpool"
    app.config_from_object({"accept_content": ["json"]}, force=True)  # reloaded again
    assert app.conf.accept_content == ["json", "modelpool"]


def test_poison_error_pickles_with_its_facts() -> None:
    error = mp_celery.PoisonTaskError("boom", deliveries=3, pid=12, signal_name="SIGKILL")
    again = pickle.loads(pickle.dumps(error))
    assert isinstance(again, mp_celery.PoisonTaskError)
    assert (again.args, again.deliveries, again.pid, again.signal_name) == (
        ("boom",),
        3,
        12,
        "SIGKILL",
    )


def test_eager_execution_says_it_needs_a_worker(tmp_path: Path) -> None:
    task = _app(tmp_path).tasks[mp_celery.TASK_NAME]
    with pytest.raises(ModelpoolError, match=r"holds no models .* task_always_eager"):
        task.apply(("affine", {"x": np.ones(2)})).get()


def test_install_reads_a_yaml_file_and_validates(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  affine:\n    model: _celery_models:Affine\n")
    app = Celery("unit", broker="memory://", set_as_current=False)
    mp_celery.install(app, path)
    with pytest.raises(ConfigError, match="no such file"):
        mp_celery.install(app, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="worker_lost='sometimes'"):
        mp_celery.install(app, CONFIG, worker_lost="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_deliveries must be >= 1"):
        mp_celery.install(app, CONFIG, max_deliveries=0)
    with pytest.raises(TypeError, match="config must be"):
        mp_celery.install(app, 42)


def test_install_refuses_a_model_module_no_worker_could_find(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose module is nowhere to be found fails at install(), in the client, instead
    of a worker that exits at start-up while the client waits for its result; nothing is
    imported to check (under prefork install() runs in the parent, before the fork)."""
    config = {"models": {"linear": {"model": "models_nowhere_to_be_found:TorchLinear"}}}
    app = Celery("unit", broker="memory://", set_as_current=False)
    with pytest.raises(
        ConfigError,
        match=r"models\.linear\.model: cannot find module 'models_nowhere_to_be_found'",
    ):
        mp_celery.install(app, config)
    mp_celery.install(app, config, check_models=False)  # a client without the models' code
    # found in the working directory, as a worker started there finds it; not imported
    (tmp_path / "models_nowhere_to_be_found.py").write_text("raise RuntimeError('imported')\n")
    monkeypatch.chdir(tmp_path)
    mp_celery.install(app, config)
    assert "models_nowhere_to_be_found" not in sys.modules


def test_predict_needs_install_and_refuses_other_serializers(tmp_path: Path) -> None:
    bare = Celery("bare", broker="memory://", set_as_current=False)
    with pytest.raises(ModelpoolError, match=r"call modelpool\.integrations\.celery\.install"):
        mp_celery.predict(bare, "affine", {"x": np.ones(2)})
    app = _app(tmp_path)
    for serializer in ("pickle", "json"):
        with pytest.raises(ValueError, match="only with serializer='modelpool'"):
            mp_celery.predict(app, "affine", {"x": np.ones(2)}, serializer=serializer)


_CONTROL = """
import os, concurrent.futures as cf
from modelpool import _hygiene
import _tfstyle                      # the runtime's thread starts here, in the parent
print("hazards:", _hygiene.fork_hazards())
pid = os.fork()                      # what a prefork pool does next
if pid == 0:
    try:
        _tfstyle.RUNTIME.submit(int).result(timeout=1.0)
        os._exit(0)
    except cf.TimeoutError:
        os._exit(42)                 # the work was never picked up: hung
_, status = os.waitpid(pid, 0)
print("child exit:", os.waitstatus_to_exitcode(status))
"""


def test_the_state_before_fork_model_hangs_when_forked_without_modelpool() -> None:
    """The control for the Celery tests: fork after importing ``_tfstyle`` and its runtime never
    runs the child's work (the Keras-in-prefork hang); ``fork_hazards`` names the thread."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-c", _CONTROL], env=env, capture_output=True, text=True, timeout=30
    )
    assert "child exit: 42" in result.stdout, result.stdout + result.stderr
    assert "tfstyle-runtime" in result.stdout


def _pool_cls(module: str) -> type:
    return type("TaskPool", (), {"__module__": module})


def _step(app: Celery, pool_module: str) -> Any:
    worker = SimpleNamespace(app=app, pool_cls=_pool_cls(pool_module), concurrency=2)
    return mp_celery._WorkerStep(worker)


def test_worker_step_refuses_what_it_cannot_run_safely(tmp_path: Path) -> None:
    app = _app(tmp_path)
    with pytest.raises(
        ConfigError, match=r"threads, solo and prefork, not celery\.concurrency\.gevent"
    ):
        _step(app, "celery.concurrency.gevent")
    app.conf.worker_pool_start_method = "spawn"
    with pytest.raises(ConfigError, match="worker_pool_start_method='fork' only, not 'spawn'"):
        _step(app, "celery.concurrency.prefork")
    assert _step(app, "celery.concurrency.thread").kind == "threads"  # loads nothing yet


def test_redelivery_needs_a_result_backend_that_counts(tmp_path: Path) -> None:
    app = Celery("rpc", broker="memory://", backend="rpc://", set_as_current=False)
    mp_celery.install(app, CONFIG)
    with pytest.raises(ConfigError, match="cannot count; configure a Redis result backend"):
        _step(app, "celery.concurrency.thread")
    app = Celery("rpc", broker="memory://", backend="rpc://", set_as_current=False)
    mp_celery.install(app, CONFIG, worker_lost="fail")
    assert _step(app, "celery.concurrency.thread").kind == "threads"


def test_prefork_is_refused_when_this_process_cannot_fork_safely(tmp_path: Path) -> None:
    app = _app(tmp_path)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="some-sdk-flusher")
    thread.start()
    try:
        with pytest.raises(UnsafeForkError, match=r"some-sdk-flusher.*--pool=threads"):
            _step(app, "celery.concurrency.prefork")
    finally:
        stop.set()
        thread.join()
