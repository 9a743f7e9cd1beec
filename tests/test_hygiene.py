"""What a worker does to itself before it loads a model, and the parent's fork-safety check
(``_hygiene``): devices through CUDA_VISIBLE_DEVICES, the environment and ``sys.path`` as
they are at spawn, ``fork`` refused while threads run. The failure table's hygiene rows (H1,
H6, H7, H14, H16) are reproduced, with and without modelpool, in test_hazards.py."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import modelpool
from _models import Echo


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


def test_fork_refused_with_live_threads() -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="someone-elses-thread")
    thread.start()
    try:
        pool = modelpool.Pool(Echo, start_method="fork")
        with pytest.raises(modelpool.UnsafeForkError, match="someone-elses-thread"):
            pool.start()
    finally:
        stop.set()
        thread.join()


def test_environment_at_spawn_reaches_forkserver_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    with modelpool.Pool(workers=1) as pool:  # makes sure the fork server is running already
        pool.submit(os.getpid).result()
    monkeypatch.setenv("MODELPOOL_TEST_LATE_VAR", "late")
    with modelpool.Pool(workers=1) as pool:
        assert pool.submit(os.environ.get, "MODELPOOL_TEST_LATE_VAR").result() == "late"


def test_sys_path_at_spawn_reaches_forkserver_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model module the pool's process can import (its directory added to ``sys.path``
    after the fork server started, as ``modelpool serve`` and the Celery worker add the
    working directory) imports in the workers too."""
    with modelpool.Pool(workers=1) as pool:  # makes sure the fork server is running already
        pool.submit(os.getpid).result()
    (tmp_path / "late_path_model.py").write_text(
        "import modelpool\n\n"
        "class Model(modelpool.Model):\n"
        "    def predict(self, inputs):\n"
        "        return __file__\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with modelpool.Pool("late_path_model:Model", workers=1) as pool:
        assert pool.predict({}) == str(tmp_path / "late_path_model.py")
