"""``modelpool doctor`` on the environment: each problem it reports is made for real (a small
/dev/shm, a low open-file limit, too many threads for the cores) and found."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys

import pytest

from _cli import ENV, TESTS
from _deps import IN_CI, need_module, need_program
from doctor._doctor import findings, levels, run_doctor

EVERY_CHECK = {
    "versions",
    "start-method",
    "cores",
    "gpu",
    "dev-shm",
    "memfd",
    "open-files",
    "locked-memory",
    "pdeathsig",
}


def test_a_healthy_environment_passes_every_check() -> None:
    code, report = run_doctor("--no-frameworks")
    assert {f["check"] for f in report["findings"]} >= EVERY_CHECK
    assert levels(report, "memfd") == {"ok"}
    assert levels(report, "pdeathsig") == {"ok"}
    assert report["facts"]["start_method"]["modelpool"] == "forkserver"
    assert report["facts"]["versions"]["modelpool"] == __import__("modelpool").__version__
    # this machine (and CI's) is set up right: nothing above "info" unless the suite runs
    # under a small limit itself
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 4096:
        assert code == 0, report["findings"]


def _root_mount_namespace() -> tuple[str, ...]:
    unshare = need_program("unshare", "util-linux")
    if os.geteuid() != 0:
        message = "mounting a small /dev/shm needs root (CI runs as root)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return (unshare, "--mount", "--propagation", "private")


def test_docker_sized_dev_shm_is_a_warning() -> None:
    prefix = _root_mount_namespace()
    shell = shutil.which("sh") or "/bin/sh"
    # a 64 MiB tmpfs over /dev/shm in a private mount namespace: Docker's default size
    script = 'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "$@"'
    code, report = run_doctor("--no-frameworks", prefix=(*prefix, shell, "-c", script, "sh"))
    (shm,) = findings(report, "dev-shm")
    assert shm["level"] == "warning"
    assert "64 MiB" in shm["summary"]
    assert "--shm-size" in shm["fix"]
    assert report["facts"]["dev_shm"]["size"] == 64 * 2**20
    assert code == 1


def test_a_low_open_file_limit_is_a_warning() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    code, report = run_doctor("--no-frameworks", preexec_fn=low)
    (limit,) = findings(report, "open-files")
    assert limit["level"] == "warning"
    assert "256" in limit["summary"]
    assert "ulimit -n" in limit["fix"]
    assert report["facts"]["open_files"]["soft"] == 256
    assert code == 1


def test_more_threads_than_usable_cores_is_a_warning() -> None:
    need_module("torch")
    need_module("cv2")

    def one_core() -> None:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    code, report = run_doctor(env={"OMP_NUM_THREADS": "4"}, preexec_fn=one_core)
    assert report["facts"]["cores"]["usable"] == 1
    (env,) = findings(report, "thread-env")
    assert env["level"] == "warning"
    assert "OMP_NUM_THREADS=4" in env["summary"]
    # the frameworks, imported in the doctor's child, size their pools past the one core
    (pools,) = findings(report, "thread-pools")
    assert pools["level"] == "warning", pools
    imported = report["facts"]["frameworks"]["imported"]
    assert {"numpy", "torch", "cv2"} <= set(imported)
    assert code == 1


def test_usage_errors_say_what_to_write() -> None:
    code, _ = run_doctor_usage("not-an-import-string")
    assert code == 2
    code, _ = run_doctor_usage("_doctor_models:Clean", "--option", "novalue")
    assert code == 2


def run_doctor_usage(*args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "modelpool.cli", "doctor", *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=str(TESTS),
        timeout=60,
    )
    assert "Error:" in done.stderr, done.stderr
    return done.returncode, done.stderr
