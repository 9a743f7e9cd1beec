"""The environment checks of ``modelpool doctor``: each returns findings, and records what it
measured in ``facts``. Frameworks are imported in a child (``_probe``), never here."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.metadata
import json
import mmap
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from modelpool import __version__, _hygiene
from modelpool._settings import default_start_method

from ._report import Finding

__all__ = ["SHM_LOW", "check_environment", "run_probe"]

#: /dev/shm below this is flagged (Docker gives 64 MiB unless told otherwise)
SHM_LOW = 256 * 1024 * 1024
#: open files below this are flagged: every worker holds pipes and shared-memory descriptors,
#: and the server one descriptor per connection
NOFILE_LOW = 4096
#: locked memory below this is flagged when a GPU is present (pinned host buffers)
MEMLOCK_LOW = 64 * 1024 * 1024
#: the packages whose versions matter in a report
VERSIONS = (
    "numpy",
    "torch",
    "tensorflow",
    "tensorflow-cpu",
    "onnxruntime",
    "opencv-python-headless",
    "opencv-python",
    "scikit-learn",
    "threadpoolctl",
    "celery",
    "aiohttp",
    "uvloop",
)
PROBE_TIMEOUT = 180.0
_MARK = "MODELPOOL-DOCTOR "


class ProbeError(Exception):
    """The probe child failed, hung or said nothing usable."""


def run_probe(args: list[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m modelpool.doctor._probe ARGS`` and return its JSON answer."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "modelpool.doctor._probe", *args],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            env=dict(os.environ if env is None else env),
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise ProbeError(
            f"the probe process did not finish in {PROBE_TIMEOUT:.0f} s (a hang at import "
            "or in setup?)"
        ) from None
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_MARK):
            answer: dict[str, Any] = json.loads(line[len(_MARK) :])
            return answer
    how = f"exit status {done.returncode}"
    if done.returncode < 0:
        how = f"killed by signal {-done.returncode} (a crash in native code?)"
    tail = "\n".join(done.stderr.strip().splitlines()[-15:])
    raise ProbeError(f"the probe process ended without an answer ({how}); its last words:\n{tail}")


def _start_method(facts: dict[str, Any]) -> list[Finding]:
    import multiprocessing

    ours = default_start_method()
    theirs = multiprocessing.get_start_method(allow_none=True) or (
        "fork" if sys.platform.startswith("linux") and sys.version_info < (3, 14) else "spawn"
    )
    facts["start_method"] = {"modelpool": ours, "multiprocessing_default": theirs}
    found = [
        Finding(
            "start-method",
            "info",
            f"modelpool starts workers with {ours} (a pool's start_method: changes it); plain "
            f"multiprocessing here uses {theirs}",
            "fork copies the parent's threads' locks but not the threads: a parent that used "
            "OpenMP, TensorFlow or CUDA before forking has children that hang or fail"
            if theirs == "fork"
            else "",
        )
    ]
    return found


def _cores(facts: dict[str, Any], environ: Mapping[str, str]) -> list[Finding]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    usable = _hygiene.usable_cores()
    facts["cores"] = {"cpu_count": os.cpu_count(), "affinity": affinity, "usable": usable}
    found = [
        Finding(
            "cores",
            "ok",
            f"{usable} usable core(s) ({os.cpu_count()} in the machine, {affinity} in this "
            "process's CPU affinity, after any cgroup CPU quota)",
        )
    ]
    if usable < affinity:
        found.append(
            Finding(
                "cores",
                "warning",
                f"a CPU quota allows {usable} core(s) but {affinity} are visible",
                "libraries size their thread pools by the visible cores, so every process "
                "runs more threads than the quota pays for and stalls at the quota's edge",
                "modelpool's workers get usable cores / workers each; for other processes "
                f"export OMP_NUM_THREADS={usable} (or less)",
            )
        )
    for name in _hygiene.THREAD_ENV_VARS:
        value = environ.get(name)
        if value is None:
            continue
        facts.setdefault("thread_env", {})[name] = value
        if value.isdigit() and int(value) > usable:
            found.append(
                Finding(
                    "thread-env",
                    "warning",
                    f"{name}={value} is more than the {usable} usable core(s)",
                    f"each process runs {value} threads: with several workers the cores are "
                    "oversubscribed (measured: 2 workers x 2 threads on 2 cores, 1.4-6x slower "
                    "than x 1)",
                    f"unset {name} (modelpool then gives each worker usable cores / workers), "
                    "or set a pool's threads_per_worker",
                )
            )
    return found


def _frameworks(probe: dict[str, Any], usable: int) -> list[Finding]:
    found: list[Finding] = []
    for name, info in probe.get("imported", {}).items():
        if "error" in info:
            found.append(
                Finding(
                    "import",
                    "warning",
                    f"importing {name} fails: {info['error']}",
                    "a model that imports it cannot load",
                    f"reinstall it (pip install --force-reinstall {name})",
                )
            )
    found += openmp_findings(probe.get("openmp", {}), "importing the installed frameworks")
    pools = probe.get("pools", {})
    sizes = (
        {f"torch intra-op threads ({pools['torch']})": pools["torch"]} if "torch" in pools else {}
    )
    if "cv2" in pools:
        sizes[f"OpenCV threads ({pools['cv2']})"] = pools["cv2"]
    for pool in pools.get("native", []):
        label = f"{pool.get('internal_api')} threads ({pool.get('num_threads')})"
        sizes[label] = pool.get("num_threads") or 0
    over = [label for label, n in sizes.items() if isinstance(n, int) and n > usable]
    if over:
        found.append(
            Finding(
                "thread-pools",
                "warning",
                f"default thread pools larger than the {usable} usable core(s): " + ", ".join(over),
                "outside modelpool's workers (a DataLoader worker, a Celery prefork child, "
                "your own processes) these defaults oversubscribe the cores",
                "modelpool sets each worker's budget; elsewhere use "
                "modelpool.integrations.torch.worker_init_fn, or OMP_NUM_THREADS and "
                "cv2.setNumThreads",
            )
        )
    elif sizes:
        found.append(Finding("thread-pools", "ok", "default thread pools: " + ", ".join(sizes)))
    if probe.get("cuda_initialised"):
        found.append(
            Finding(
                "cuda",
                "hazard",
                "importing the installed frameworks initialises CUDA",
                "a process that has initialised CUDA cannot fork children that use it "
                "('Cannot re-initialize CUDA in forked subprocess')",
                "find what initialises CUDA at import (a sitecustomize, a plugin) and defer it",
            )
        )
    return found


def openmp_findings(runtimes: Mapping[str, list[str]], when: str) -> list[Finding]:
    """Findings for the OpenMP runtimes loaded ``when``: family -> files."""
    if len(runtimes) > 1:
        listed = "; ".join(f"{family}: {', '.join(files)}" for family, files in runtimes.items())
        return [
            Finding(
                "openmp",
                "hazard",
                f"{len(runtimes)} different OpenMP runtimes are loaded by {when} ({listed})",
                "two OpenMP runtimes in one process fight over threads: crashes ('OMP: Error "
                "#15'), deadlocks, or both pools at full size at once",
                "install the frameworks from one channel (all pip wheels, or all conda), or "
                "serve the models that need each runtime in separate pools",
            )
        ]
    for family, files in runtimes.items():
        if len(files) > 1:
            return [
                Finding(
                    "openmp",
                    "info",
                    f"{len(files)} copies of {family} are loaded by {when}: {', '.join(files)}",
                    "each copy has its own thread pool and its own settings: limits set on "
                    "one do not reach the other",
                    "modelpool limits every copy it finds in its workers (threadpoolctl); "
                    "elsewhere, prefer OMP_NUM_THREADS, which every copy reads",
                )
            ]
        return [Finding("openmp", "ok", f"one OpenMP runtime ({family}) loaded by {when}")]
    return []


def _shared_memory(facts: dict[str, Any]) -> list[Finding]:
    found = []
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        facts["dev_shm"] = None
        found.append(
            Finding(
                "dev-shm",
                "hazard",
                "/dev/shm is missing",
                "multiprocessing's locks and semaphores and torch's DataLoader live there",
                "mount a tmpfs on /dev/shm (Docker: --shm-size=1g; Kubernetes: an emptyDir "
                "with medium: Memory)",
            )
        )
    else:
        size, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        facts["dev_shm"] = {"size": size, "free": free}
        level = "warning" if size < SHM_LOW else "ok"
        found.append(
            Finding(
                "dev-shm",
                level,
                f"/dev/shm is {size / 2**20:.0f} MiB ({free / 2**20:.0f} MiB free)",
                "Docker's default is 64 MiB: torch's DataLoader workers and multiprocessing "
                "fail with 'No space left on device' or a bus error once it fills"
                if level == "warning"
                else "",
                "Docker: --shm-size=1g; Kubernetes: an emptyDir with medium: Memory on "
                "/dev/shm (modelpool's own data path uses memfd, not /dev/shm)"
                if level == "warning"
                else "",
            )
        )
    facts["memfd"] = _memfd_works()
    found.append(
        Finding("memfd", "ok", "memfd shared memory works (modelpool's data path)")
        if facts["memfd"] is True
        else Finding(
            "memfd",
            "warning",
            f"memfd shared memory is not available ({facts['memfd']})",
            "modelpool then sends tensors through pipes: large inputs and outputs cost copies",
            "run on Linux 3.17 or later, without a seccomp profile that blocks memfd_create",
        )
    )
    return found


def _memfd_works() -> bool | str:
    create = getattr(os, "memfd_create", None)
    if create is None:
        return "os.memfd_create does not exist on this platform"
    try:
        fd = create("modelpool-doctor", getattr(os, "MFD_CLOEXEC", 0))
    except OSError as exc:
        return f"memfd_create failed: {exc}"
    try:
        os.ftruncate(fd, 1 << 20)
        with mmap.mmap(fd, 1 << 20) as m:
            m[:5] = b"hello"
        return True
    except OSError as exc:
        return f"mapping a memfd failed: {exc}"
    finally:
        os.close(fd)


def _limits(facts: dict[str, Any], gpu: bool) -> list[Finding]:
    found = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    facts["open_files"] = {"soft": soft, "hard": hard}
    if soft != resource.RLIM_INFINITY and soft < NOFILE_LOW:
        raise_to = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
        found.append(
            Finding(
                "open-files",
                "warning",
                f"open files are limited to {soft} (ulimit -n; hard limit {raise_to})",
                "every worker holds pipes and shared-memory descriptors and the server one per "
                "connection: a busy server fails with 'Too many open files'",
                f"ulimit -n {min(65536, hard) if hard != resource.RLIM_INFINITY else 65536} "
                "before starting (systemd: LimitNOFILE=; Docker: --ulimit nofile=65536)",
            )
        )
    else:
        found.append(Finding("open-files", "ok", f"open files: {soft} allowed"))
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    facts["locked_memory"] = {"soft": soft, "hard": hard}
    shown = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft / 2**20:.1f} MiB"
    if gpu and soft != resource.RLIM_INFINITY and soft < MEMLOCK_LOW:
        found.append(
            Finding(
                "locked-memory",
                "warning",
                f"locked memory is limited to {shown} on a machine with a GPU",
                "pinned host buffers (DataLoader pin_memory, CUDA host allocations) need it",
                "ulimit -l unlimited (Docker: --ulimit memlock=-1)",
            )
        )
    else:
        found.append(Finding("locked-memory", "ok", f"locked memory: {shown}"))
    return found


def _pdeathsig(facts: dict[str, Any]) -> list[Finding]:
    works = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            signal_number = ctypes.c_int(0)
            works = libc.prctl(2, ctypes.byref(signal_number), 0, 0, 0) == 0  # PR_GET_PDEATHSIG
    facts["pdeathsig"] = works
    if works:
        return [Finding("pdeathsig", "ok", "PR_SET_PDEATHSIG is available")]
    return [
        Finding(
            "pdeathsig",
            "warning",
            "PR_SET_PDEATHSIG is not available (not Linux)",
            "workers then notice a killed parent only through their pipe watchdog",
            "",
        )
    ]


def _gpu(facts: dict[str, Any], environ: Mapping[str, str]) -> tuple[bool, list[Finding]]:
    devices = sorted(d for d in os.listdir("/dev") if d.startswith("nvidia") and d[6:].isdigit())
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    facts["gpu"] = {"devices": devices, "CUDA_VISIBLE_DEVICES": visible}
    if not devices:
        return False, [Finding("gpu", "info", "no NVIDIA GPU device files (/dev/nvidia*)")]
    summary = f"{len(devices)} NVIDIA GPU(s)"
    if visible is not None:
        summary += f"; CUDA_VISIBLE_DEVICES={visible!r} in this environment"
    return True, [
        Finding(
            "gpu",
            "info",
            summary,
            "modelpool gives each worker its device through CUDA_VISIBLE_DEVICES (a model's "
            "device: option) before anything imports",
        )
    ]


def _versions(facts: dict[str, Any]) -> list[Finding]:
    versions = {"python": platform.python_version(), "modelpool": __version__}
    for name in VERSIONS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    facts["versions"] = versions
    shown = ", ".join(f"{k} {v}" for k, v in versions.items())
    return [Finding("versions", "info", shown)]


def check_environment(
    facts: dict[str, Any],
    *,
    import_frameworks: bool = True,
    environ: Mapping[str, str] | None = None,
) -> list[Finding]:
    """Every environment check; ``import_frameworks`` runs the frameworks probe (seconds)."""
    environ = os.environ if environ is None else environ
    found = _versions(facts) + _start_method(facts) + _cores(facts, environ)
    gpu, gpu_found = _gpu(facts, environ)
    found += gpu_found + _shared_memory(facts) + _limits(facts, gpu) + _pdeathsig(facts)
    if import_frameworks:
        try:
            probe = run_probe(["frameworks"])
        except ProbeError as exc:
            found.append(Finding("frameworks", "hazard", f"importing the frameworks: {exc}"))
        else:
            facts["frameworks"] = probe
            found += _frameworks(probe, facts["cores"]["usable"])
    return found
