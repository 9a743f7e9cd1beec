"""modelpool's Celery integration (``integrations/celery``) against a real Redis and real
``celery worker`` processes; at the end, ``install()``, ``predict()`` and the worker bootstep's
checks without either. (Its serializer: test_celery_codec.py.)

Starting a worker costs seconds, so each kind lives for the whole module, on its own queue:
``threads`` (``--pool=threads``, worker_lost="redeliver", max_deliveries=2), ``pair`` (two
threads workers sharing a queue, worker_lost="fail", an app module that starts a runtime thread
at import), ``prefork`` (redeliver, max_deliveries=2, worker_proc_alive_timeout=1 s) and
``prefork_fail``. Models leave one file per call in ``marks``, so a test sees which process ran
what, and can kill it mid-task.
"""

from __future__ import annotations

import gc
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil
import pytest
from _celery_worker import CeleryWorker, new_queue

from _deps import deferred_module
from _waiting import wait_for
from modelpool import (
    ModelpoolError,
    ModelSetupError,
    ModelSpecError,
    PoisonTaskError,
    UnsafeForkError,
    WorkerCrashedError,
)
from modelpool.config import ConfigError

if TYPE_CHECKING:
    from celery import Celery

# Celery and what comes with it are optional: imported by the tests that use them, and the
# fixtures that start Redis and the workers check for them (tests/integrations/conftest.py)
celery = deferred_module("celery")
celery_app = deferred_module("_celery_app", "celery", "msgpack")
mp_celery = deferred_module("modelpool.integrations.celery", "celery", "msgpack")
billiard_exceptions = deferred_module("billiard.exceptions", "celery")
kombu_exceptions = deferred_module("kombu.exceptions", "celery")

TIMEOUT = 30.0
Factory = Callable[..., CeleryWorker]


class Setup:
    """Running worker(s) on one queue, a client app for that queue, the models' marks."""

    def __init__(self, app: Celery, workers: list[CeleryWorker], marks: Path) -> None:
        self.app = app
        self.workers = workers
        self.marks = marks

    def run(self, model: str, inputs: Any) -> Any:
        return mp_celery.predict(self.app, model, inputs).get(timeout=TIMEOUT)

    def calls(self, prefix: str) -> list[int]:
        """Pids of the processes that started a ``prefix`` call, oldest first."""
        found = sorted(self.marks.glob(f"{prefix}-*"), key=lambda p: int(p.name.split("-")[2]))
        return [int(p.name.split("-")[1]) for p in found]

    def wait_calls(self, prefix: str, n: int) -> list[int]:
        deadline = time.monotonic() + TIMEOUT
        while len(calls := self.calls(prefix)) < n:
            assert time.monotonic() < deadline, f"{prefix}: {len(calls)} call(s) seen, not {n}"
            time.sleep(0.01)
        return calls

    def reset(self) -> None:
        shutil.rmtree(self.marks)
        self.marks.mkdir()


_MODELS: dict[str, dict[str, Any]] = {
    "affine": {"model": "_celery_models:Affine", "workers": 2},
    "slow": {"model": "_celery_models:Slow"},
    "poison": {"model": "_celery_models:Poison", "retries": 1},
    "fails": {"model": "_celery_models:Fails"},
    "tfstyle": {"model": "_tfstyle:Model"},
    "slow_setup": {"model": "_celery_models:SlowSetup", "options": {"seconds": 2.0}},
    "broken": {"model": "_celery_models:BrokenSetup"},
}

#: kind -> (models, install() options, worker options)
_KINDS: dict[str, tuple[list[str], dict[str, Any], dict[str, Any]]] = {
    "threads": (
        ["affine", "slow", "poison", "fails", "tfstyle"],
        {"max_deliveries": 2},
        {},
    ),
    "pair": (
        ["slow", "tfstyle"],
        {"worker_lost": "fail"},
        {"count": 2, "concurrency": 1, "env": {"MODELPOOL_TEST_IMPORT_AT_TOP": "1"}},
    ),
    "prefork": (
        ["affine", "slow", "poison", "tfstyle", "slow_setup", "broken"],
        {"max_deliveries": 2},
        {"pool": "prefork", "env": {"MODELPOOL_TEST_ALIVE_TIMEOUT": "1"}},
    ),
    "prefork_fail": (["slow"], {"worker_lost": "fail"}, {"pool": "prefork"}),
}


def _config(names: list[str], marks: Path) -> dict[str, Any]:
    models = {}
    for name in names:
        settings = dict(_MODELS[name])
        if name in ("affine", "slow", "poison"):
            settings["options"] = {"marks": str(marks)}
        models[name] = settings
    return {"models": models}


@pytest.fixture(scope="module")
def fleet(
    worker_factory: Factory, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[list[CeleryWorker], dict[str, Any], str, Path]]:
    """Every worker of the module, started at once (their start-up overlaps)."""
    out = {}
    for kind, (names, install, options) in _KINDS.items():
        marks = tmp_path_factory.mktemp(f"marks-{kind}")
        queue = new_queue()
        config = _config(names, marks)
        options = dict(options)
        count = options.pop("count", 1)
        env = {**options.pop("env", {})}
        env.update({f"MODELPOOL_TEST_{k.upper()}": str(v) for k, v in install.items()})
        workers = [
            worker_factory(config, queue, name=f"{kind}{i}", env=env, **options)
            for i in range(count)
        ]
        out[kind] = (workers, config, queue, marks)
    return out


def _setup(fleet: dict[str, Any], kind: str) -> Iterator[Setup]:
    workers, config, queue, marks = fleet[kind]
    for worker in workers:
        worker.wait_ready()
    app = celery_app.make_app(workers[0].broker, config, queue, **_KINDS[kind][1])
    try:
        yield Setup(app, workers, marks)
    finally:
        app.close()


@pytest.fixture(scope="module")
def threads(fleet: dict[str, Any]) -> Iterator[Setup]:
    yield from _setup(fleet, "threads")


@pytest.fixture(scope="module")
def pair(fleet: dict[str, Any]) -> Iterator[Setup]:
    yield from _setup(fleet, "pair")


@pytest.fixture(scope="module")
def prefork(fleet: dict[str, Any]) -> Iterator[Setup]:
    yield from _setup(fleet, "prefork")


@pytest.fixture(scope="module")
def prefork_fail(fleet: dict[str, Any]) -> Iterator[Setup]:
    yield from _setup(fleet, "prefork_fail")


def _check_affine(setup: Setup) -> list[dict[str, Any]]:
    inputs = [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(5, dtype=np.int64),
        np.linspace(0, 1, 7)[::2],  # not contiguous
    ]
    # all in flight at once
    results = [mp_celery.predict(setup.app, "affine", {"x": x}) for x in inputs * 3]
    outs = [r.get(timeout=TIMEOUT) for r in results]
    for x, out in zip(inputs * 3, outs, strict=True):
        np.testing.assert_array_equal(out["y"], x * 2 + 1)
        assert out["y"].dtype == x.dtype
        assert all(a.flags.writeable for a in out.values()), "outputs arrive writable"
        assert out["writable"][0], "inputs arrive writable in the model"
        assert out["omp_threads"][0] >= 1, "thread limits applied before the model loaded"
    return outs


# --------------------------------------------------------------------------- --pool=threads


def test_threads_results_are_correct_and_writable(threads: Setup) -> None:
    outs = _check_affine(threads)
    pids = {int(o["pid"][0]) for o in outs}
    workers = {p.pid for p in threads.workers[0].children()}
    assert pids <= workers, "predict ran in modelpool's workers, not in the celery process"
    seeds = {int(o["pid"][0]): int(o["seed"][0]) for o in outs}
    assert len(set(seeds.values())) == len(seeds), "each worker has its own seed"


def test_model_errors_and_unknown_models_reach_the_caller(threads: Setup) -> None:
    with pytest.raises(ValueError, match="bad input: the model refuses it"):
        threads.run("fails", {"x": np.ones(1)})
    with pytest.raises(ModelSpecError, match=r"no model named 'nope'.*it serves: affine"):
        threads.run("nope", {"x": np.ones(1)})


@pytest.mark.parametrize("serializer", ["pickle", "json"])
def test_other_content_types_are_refused_and_not_run(threads: Setup, serializer: str) -> None:
    threads.reset()
    result = threads.app.send_task(
        "modelpool.predict", ("affine", {"x": [1.0]}), serializer=serializer
    )
    refused = r"accepts only application/x-modelpool-msgpack"
    with pytest.raises(kombu_exceptions.ContentDisallowed, match=refused):
        result.get(timeout=TIMEOUT)
    assert threads.calls("affine") == []
    assert "refused task" in threads.workers[0].log


def test_threads_state_before_fork_model_works(threads: Setup) -> None:
    out = threads.run("tfstyle", {"x": np.arange(4)})
    np.testing.assert_array_equal(out["y"], np.arange(4) * 3)


def test_threads_worker_killed_mid_task_is_redelivered(threads: Setup) -> None:
    threads.reset()
    result = mp_celery.predict(threads.app, "slow", {"x": np.array([1.0])})
    (first,) = threads.wait_calls("start", 1)
    os.kill(first, signal.SIGKILL)
    out = result.get(timeout=TIMEOUT)
    np.testing.assert_array_equal(out["y"], [1.0])
    calls = threads.calls("start")
    assert len(calls) == 2, "run once more, on the replacement worker"
    assert calls[1] != first


def test_threads_poison_task_is_not_redelivered_forever(threads: Setup) -> None:
    threads.reset()
    with pytest.raises(
        PoisonTaskError, match=r"delivered 2 time\(s\) .*\(max_deliveries=2\)"
    ) as info:
        threads.run("poison", {"x": np.ones(1)})
    assert "SIGKILL" in str(info.value)
    # 2 deliveries x (1 try + retries=1 inside the pool); then nothing more
    assert len(threads.calls("poison")) == 4
    time.sleep(0.5)  # no event to wait for: time in which a wrong redelivery would show
    assert len(threads.calls("poison")) == 4
    _check_affine(threads)  # the worker kept serving


# --------------------------------------------------------------------------- two workers


def test_two_workers_share_a_queue(pair: Setup) -> None:
    pair.reset()
    results = [mp_celery.predict(pair.app, "slow", {"x": np.array([0.3])}) for _ in range(6)]
    ran_in = {int(r.get(timeout=TIMEOUT)["pid"][0]) for r in results}
    trees = [{p.pid for p in w.children()} for w in pair.workers]
    assert all(ran_in & tree for tree in trees), f"both workers did work: {ran_in}, {trees}"


def test_threads_pool_even_with_a_runtime_thread_in_the_parent(pair: Setup) -> None:
    """The app module of ``pair`` imports ``_tfstyle`` (its runtime thread starts in the celery
    process); under --pool=threads the model still runs, in a forkserver-started worker."""
    out = pair.run("tfstyle", {"x": np.arange(3)})
    np.testing.assert_array_equal(out["y"], [0, 3, 6])


def test_threads_worker_lost_fail_fails_with_the_signal(pair: Setup) -> None:
    pair.reset()
    result = mp_celery.predict(pair.app, "slow", {"x": np.array([2.0])})
    (pid,) = pair.wait_calls("start", 1)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashedError, match="SIGKILL") as info:
        result.get(timeout=TIMEOUT)
    assert not isinstance(info.value, PoisonTaskError)
    time.sleep(0.3)  # no event to wait for: time in which a wrong rerun would show
    assert pair.calls("start") == [pid], "not run again"


# --------------------------------------------------------------------------- --pool=prefork


def test_prefork_results_hygiene_and_state_before_fork_model(prefork: Setup) -> None:
    outs = _check_affine(prefork)
    children = {p.pid for p in prefork.workers[0].children()}
    assert {int(o["pid"][0]) for o in outs} <= children, "ran in the prefork children"
    seeds = {int(o["pid"][0]): int(o["seed"][0]) for o in outs}
    assert len(set(seeds.values())) == len(seeds), "each child has its own seed"
    out = prefork.run("tfstyle", {"x": np.arange(4)})  # imported after the fork: works
    np.testing.assert_array_equal(out["y"], np.arange(4) * 3)


def test_prefork_slow_model_load_is_not_killed_by_proc_alive_timeout(prefork: Setup) -> None:
    """slow_setup takes 2 s to load; the worker's worker_proc_alive_timeout is 1 s."""
    out = prefork.run("slow_setup", {"x": np.ones(2)})
    np.testing.assert_array_equal(out["y"], [2.0, 2.0])
    assert "Timed out waiting for UP message" not in prefork.workers[0].log


def test_prefork_model_that_cannot_load_fails_its_tasks_only(prefork: Setup) -> None:
    with pytest.raises(ModelSetupError, match=r"model 'broken' .* weights\.pt is missing"):
        prefork.run("broken", {"x": np.ones(1)})
    np.testing.assert_array_equal(prefork.run("slow_setup", {"x": np.ones(1)})["y"], [2.0])


def test_prefork_child_killed_mid_task_is_redelivered(prefork: Setup) -> None:
    prefork.reset()
    result = mp_celery.predict(prefork.app, "slow", {"x": np.array([1.0])})
    (first,) = prefork.wait_calls("start", 1)
    os.kill(first, signal.SIGKILL)
    np.testing.assert_array_equal(result.get(timeout=TIMEOUT)["y"], [1.0])
    calls = prefork.calls("start")
    assert len(calls) == 2
    assert calls[1] != first


def test_prefork_poison_task_is_not_redelivered_forever(prefork: Setup) -> None:
    prefork.reset()
    with pytest.raises(PoisonTaskError, match=r"delivered 2 time\(s\) .*\(max_deliveries=2\)"):
        prefork.run("poison", {"x": np.ones(1)})
    assert len(prefork.calls("poison")) == 2
    time.sleep(0.5)  # no event to wait for: time in which a wrong redelivery would show
    assert len(prefork.calls("poison")) == 2
    _check_affine(prefork)


def test_prefork_worker_lost_fail(prefork_fail: Setup) -> None:
    prefork_fail.reset()
    result = mp_celery.predict(prefork_fail.app, "slow", {"x": np.array([2.0])})
    (pid,) = prefork_fail.wait_calls("start", 1)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(billiard_exceptions.WorkerLostError, match="SIGKILL"):
        result.get(timeout=TIMEOUT)
    time.sleep(0.3)  # no event to wait for: time in which a wrong rerun would show
    assert prefork_fail.calls("start") == [pid], "not run again"


def _lone_worker(redis_url: str, tmp_path: Path, models: str, **options: Any) -> CeleryWorker:
    config = tmp_path / "models.yaml"
    config.write_text(models)
    return CeleryWorker("lone", config, new_queue(), redis_url, tmp_path / "w.log", **options)


def test_threads_worker_exits_when_a_model_cannot_load(redis_url: str, tmp_path: Path) -> None:
    worker = _lone_worker(
        redis_url, tmp_path, "models:\n  broken:\n    model: _celery_models:BrokenSetup\n"
    )
    try:
        assert worker.wait_exit() != 0
    finally:
        worker.stop()
    assert "ModelSetupError: model 'broken' could not load in this Celery worker" in worker.log
    assert "weights.pt is missing" in worker.log
    assert " ready." not in worker.log, "no task was taken"


_USER_TASKS = """
import os
from celery import Celery
from modelpool.integrations import celery as modelpool_celery

broker = os.environ["MODELPOOL_TEST_BROKER"]
app = Celery("inference", broker=broker, backend=broker)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    task_default_queue=os.environ["MODELPOOL_TEST_QUEUE"],
)
modelpool_celery.install(app, "models.yaml")
"""

_USER_MODELS = """
import modelpool

class TorchLinear(modelpool.Model):
    def setup(self):
        self.weight = 2.0

    def predict(self, inputs):
        return {"y": inputs["x"] * self.weight}
"""


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_model_module_beside_the_app_module_loads(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pool: str
) -> None:
    """What users do: ``models.py`` beside ``tasks.py``, ``model: models:TorchLinear``, and
    ``celery -A tasks worker`` in that directory (the ``celery`` command: the directory is
    on ``sys.path`` only while Celery imports ``tasks``). The models load as ``modelpool
    serve`` loads them, relative to the working directory, also in modelpool's workers."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "tasks.py").write_text(_USER_TASKS)
    (project / "models.py").write_text(_USER_MODELS)
    config = project / "models.yaml"
    config.write_text("models:\n  linear:\n    model: models:TorchLinear\n")
    queue = new_queue()
    worker = CeleryWorker(
        "beside",
        config,
        queue,
        redis_url,
        tmp_path / "w.log",
        pool=pool,
        app="tasks",
        cwd=project,
        console_script=True,
    )
    try:
        worker.wait_ready()
        monkeypatch.chdir(project)  # the client runs there too, and install() checks the models
        app = celery_app.make_app(redis_url, "models.yaml", queue)
        try:
            out = mp_celery.predict(app, "linear", {"x": np.arange(3.0)}).get(timeout=TIMEOUT)
        finally:
            app.close()
        np.testing.assert_array_equal(out["y"], [0.0, 2.0, 4.0])
    finally:
        worker.stop()


def test_warm_shutdown_finishes_the_running_task(redis_url: str, tmp_path: Path) -> None:
    """SIGTERM: Celery lets the running task finish before modelpool stops the pools."""
    models = (
        f"models:\n  slow:\n    model: _celery_models:Slow\n    options: {{marks: {tmp_path}}}\n"
    )
    worker = _lone_worker(redis_url, tmp_path, models).wait_ready()
    app = celery_app.make_app(worker.broker, worker.config_path, worker.queue)
    try:
        result = mp_celery.predict(app, "slow", {"x": np.array([1.0])})
        deadline = time.monotonic() + TIMEOUT
        while not list(tmp_path.glob("start-*")):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        worker.terminate()
        np.testing.assert_array_equal(result.get(timeout=TIMEOUT)["y"], [1.0])
        assert worker.wait_exit() == 0
    finally:
        worker.stop()
        app.close()


def test_sigterm_while_the_models_load_stops_the_threads_worker_now(
    redis_url: str, tmp_path: Path
) -> None:
    """Celery's SIGTERM handler only sets a flag, which it reads once the worker has started:
    a model that loads for minutes would keep the worker from stopping that long. The load is
    abandoned instead: its workers are stopped and reaped, and the worker exits at once."""
    models = (
        "models:\n  big:\n    model: _celery_models:SlowSetup\n"
        f"    options: {{seconds: 600, marks: {tmp_path}}}\n"
    )
    worker = _lone_worker(redis_url, tmp_path, models)
    try:
        wait_for(lambda: list(tmp_path.glob("setup-*")), TIMEOUT, "the model's setup() to begin")
        loading = [p.pid for p in worker.children()]
        assert loading, "the model loads in a modelpool worker"
        worker.terminate()
        assert worker.wait_exit(timeout=30) == 0
    finally:
        worker.stop()  # (and every process it started is gone)
    assert not any(psutil.pid_exists(pid) for pid in loading)
    assert "told to stop while the models were loading" in worker.log
    assert " ready." not in worker.log, "no task was taken"


def test_prefork_refuses_to_fork_after_a_runtime_started_in_the_parent(
    redis_url: str, tmp_path: Path
) -> None:
    """The app module imports ``_tfstyle`` at top level: its runtime thread runs in the parent
    before the pool forks. The worker refuses to start, naming the thread and the fix."""
    worker = _lone_worker(
        redis_url,
        tmp_path,
        "models:\n  tfstyle:\n    model: _tfstyle:Model\n",
        pool="prefork",
        env={"MODELPOOL_TEST_IMPORT_AT_TOP": "1"},
    )
    try:
        assert worker.wait_exit() != 0
    finally:
        worker.stop()
    log = worker.log
    assert "UnsafeForkError: modelpool refuses to start this Celery worker with" in log
    assert "tfstyle-runtime" in log
    assert "--pool=threads" in log
    assert "ForkPoolWorker" not in log, "no child was forked"


# --------------------------------------------------------------------------- without a broker


HERE = Path(__file__).resolve().parent
CONFIG = {"models": {"affine": {"model": "_celery_models:Affine", "workers": 2}}}


def _app(tmp_path: Path, **options: Any) -> Celery:
    app = celery.Celery("unit", broker="memory://", backend="cache+memory://", set_as_current=False)
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
    app = celery.Celery("unit", broker="memory://", set_as_current=False)
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
    app = celery.Celery("unit", broker="memory://", set_as_current=False)
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
    app = celery.Celery("unit", broker="memory://", set_as_current=False)
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
    bare = celery.Celery("bare", broker="memory://", set_as_current=False)
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


def test_threads_step_freezes_what_lives_as_long_as_the_worker(tmp_path: Path) -> None:
    """Once the pools run, the worker's objects are out of the collector's full passes and
    of the interpreter's exit (with TensorFlow imported, seconds of collection at exit on a
    loaded machine: docs/celery.md)."""
    step = _step(_app(tmp_path), "celery.concurrency.thread")
    gc.unfreeze()  # (in case something this process ran before froze)
    try:
        step.start(None)
        assert gc.get_freeze_count() > 10_000  # (this process: pytest, numpy, celery, ...)
        assert mp_celery._HOST is not None
    finally:
        mp_celery._on_worker_exit()
        gc.unfreeze()


def test_redelivery_needs_a_result_backend_that_counts(tmp_path: Path) -> None:
    app = celery.Celery("rpc", broker="memory://", backend="rpc://", set_as_current=False)
    mp_celery.install(app, CONFIG)
    with pytest.raises(ConfigError, match="cannot count; configure a Redis result backend"):
        _step(app, "celery.concurrency.thread")
    app = celery.Celery("rpc", broker="memory://", backend="rpc://", set_as_current=False)
    mp_celery.install(app, CONFIG, worker_lost="fail")
    assert _step(app, "celery.concurrency.thread").kind == "threads"


def test_prefork_is_refused_when_this_process_cannot_fork_safely(tmp_path: Path) -> None:
    app = _app(tmp_path)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="some-sdk-flusher")
    thread.start()
    gc.unfreeze()
    try:
        with pytest.raises(UnsafeForkError, match=r"some-sdk-flusher.*--pool=threads"):
            _step(app, "celery.concurrency.prefork")
        # the worker exits with the error: its heap is frozen, so the exit does not collect
        # it (seconds with TensorFlow loaded)
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
        stop.set()
        thread.join()
