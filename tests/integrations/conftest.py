"""Fixtures for the Celery tests: a real ``redis-server`` on a free port (one per session) and
real ``celery worker`` processes (``CeleryWorker``), each stopped and checked for leftovers."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from _celery_worker import LONG_LIVED, CeleryWorker, descendants, tree_of

from _deps import need_module, need_program


@pytest.fixture(autouse=True)
def no_leaked_children() -> Iterator[None]:
    """The suite's leak check (tests/conftest.py), except for the trees of the long-lived
    workers in ``LONG_LIVED``, which their own fixture checks when it stops them."""
    before = {p.pid for p in descendants()}
    yield
    deadline = time.monotonic() + 10.0
    while True:
        spared = tree_of(LONG_LIVED)
        left = [
            p
            for p in descendants()
            if p.pid not in before and p.pid not in spared and p.is_running()
        ]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"leaked child processes: {[(p.pid, p.status()) for p in left]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A private ``redis-server`` (no persistence) for the whole session."""
    need_module("celery")
    redis = need_module("redis")
    server = need_program("redis-server", "redis-server")
    port = _free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 10.0
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port}") from None
                time.sleep(0.02)
        yield url
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def worker_factory(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., CeleryWorker]]:
    """Start celery workers that live until the end of the test module."""
    workers: list[CeleryWorker] = []
    tmp = tmp_path_factory.mktemp("celery")

    def start(
        config: dict[str, Any], queue: str, *, name: str | None = None, **kwargs: Any
    ) -> CeleryWorker:
        name = name or f"w{len(workers)}"
        config_path = tmp / f"{queue}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        worker = CeleryWorker(name, config_path, queue, redis_url, tmp / f"{name}.log", **kwargs)
        workers.append(worker)
        LONG_LIVED.add(worker.proc.pid)
        return worker

    try:
        yield start
    finally:
        errors = []
        for worker in workers:
            worker.terminate()  # all at once: each takes a second or two to stop
        for worker in workers:
            try:
                worker.stop()
            except AssertionError as exc:
                errors.append(str(exc))
            finally:
                LONG_LIVED.discard(worker.proc.pid)
        assert not errors, "\n".join(errors)
