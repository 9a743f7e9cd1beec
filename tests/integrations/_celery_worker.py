"""A real ``celery worker`` in a subprocess, for the tests (used by conftest.py and the tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
SRC = HERE.parent.parent / "src"
_STDLIB_HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")

#: pids of the celery workers that outlive a test (module-scoped); their process trees are
#: checked when they stop, not after every test (they replace killed children on purpose)
LONG_LIVED: set[int] = set()


def descendants(root: psutil.Process | None = None) -> list[psutil.Process]:
    out = []
    for child in (root or psutil.Process()).children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except (psutil.Error, OSError):
            cmd = ""
        if not any(h in cmd for h in _STDLIB_HELPERS):
            out.append(child)
    return out


def tree_of(pids: set[int]) -> set[int]:
    tree = set(pids)
    for pid in pids:
        try:
            tree.update(p.pid for p in psutil.Process(pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return tree


class CeleryWorker:
    """``celery -A _celery_app worker`` in a subprocess, logging to ``log_path``.

    ``app`` and ``cwd`` start another app module from another directory. ``console_script``
    starts it as the ``celery`` command does (``python -P``: the working directory is not on
    ``sys.path``, as it is under ``python -m``), with only modelpool's sources on PYTHONPATH.
    """

    def __init__(
        self,
        name: str,
        config_path: Path,
        queue: str,
        broker: str,
        log_path: Path,
        pool: str = "threads",
        concurrency: int = 2,
        env: dict[str, str] | None = None,
        app: str = "_celery_app",
        cwd: Path = HERE,
        console_script: bool = False,
    ) -> None:
        self.name = name
        self.broker = broker
        self.config_path = config_path
        self.queue = queue
        self.log_path = log_path
        environment = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(SRC)] if console_script else [str(HERE), str(SRC)]),
            "MODELPOOL_TEST_BROKER": broker,
            "MODELPOOL_TEST_CONFIG": str(config_path),
            "MODELPOOL_TEST_QUEUE": queue,
            # a worker that does not stop is sent SIGABRT: its threads' stacks go to the log
            "PYTHONFAULTHANDLER": "1",
            **(env or {}),
        }
        command = [
            sys.executable,
            *(["-P"] if console_script else []),
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            f"--queues={queue}",
            f"--hostname={name}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel=INFO",
        ]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=cwd
            )
        self.process = psutil.Process(self.proc.pid)
        self._tree: list[psutil.Process] | None = None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> CeleryWorker:
        deadline = time.monotonic() + timeout
        while " ready." not in self.log:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"celery worker {self.name} did not start:\n{self.log}")
            time.sleep(0.05)
        return self

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"celery worker {self.name} did not exit:\n{self.log}") from None

    def children(self) -> list[psutil.Process]:
        """Its live descendants that run tasks or models: prefork children, or modelpool's
        workers (forked by the fork server, so they share its command line)."""
        out = []
        for p in self.process.children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
                if p.status() == psutil.STATUS_ZOMBIE or "resource_tracker" in cmd:
                    continue
                if "forkserver" in cmd and p.ppid() == self.proc.pid:
                    continue  # the fork server itself
            except psutil.Error:
                continue
            out.append(p)
        return out

    def terminate(self) -> None:
        """Ask for a warm shutdown (SIGTERM), remembering the processes it has now."""
        if self._tree is None:
            try:
                self._tree = self.process.children(recursive=True)
            except psutil.NoSuchProcess:
                self._tree = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown; then every process it started must be gone."""
        self.terminate()
        tree = self._tree or []
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # (faulthandler: where it is stuck, logged)
            try:
                self.proc.wait(10.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            for p in tree:
                if p.is_running():
                    p.kill()
            raise AssertionError(
                f"celery worker {self.name} ignored SIGTERM:\n{self.log}"
            ) from None
        _, alive = psutil.wait_procs(tree, timeout=10.0)
        for p in alive:
            p.kill()
        assert not alive, f"celery worker {self.name} left processes behind: {alive}\n{self.log}"


def new_queue() -> str:
    return f"q-{uuid.uuid4().hex[:10]}"
