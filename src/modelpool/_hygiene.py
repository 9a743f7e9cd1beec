"""What a worker does to itself before it loads a model, and the parent's fork-safety check.

Parent side: ``usable_cores``, ``resolve_threads``, ``thread_env``, ``derive_seed``,
``fork_hazards``, ``import_path``. Worker side: ``ignore_sigint``, ``die_with_parent``,
``apply_env``, ``apply_sys_path``, ``limit_thread_pools``, ``limit_when_imported``,
``seed_rngs``, ``yield_on_wakeup``. Nothing here runs at import time.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import math
import os
import random
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

__all__ = [
    "THREAD_ENV_VARS",
    "apply_env",
    "apply_sys_path",
    "derive_seed",
    "device_env",
    "die_with_parent",
    "fork_hazards",
    "ignore_sigint",
    "import_path",
    "limit_blas_and_openmp",
    "limit_onnxruntime",
    "limit_tensorflow",
    "limit_thread_pools",
    "limit_when_imported",
    "resolve_threads",
    "seed_rngs",
    "thread_env",
    "usable_cores",
    "yield_on_wakeup",
]

#: Environment variables read by native thread pools when they initialise.
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "BLIS_NUM_THREADS",
    # TensorFlow's runtime, when it starts, for a pool whose size its config leaves at 0
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
)

#: Prefix of the names of modelpool's own threads (not counted as fork hazards).
THREAD_PREFIX = "modelpool-"

_PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------- parent side


def _cgroup_cpu_limit() -> float | None:
    """CPU quota of this process's cgroup in cores, or None when unlimited or unknown."""
    try:  # cgroup v2
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota_us = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period_us = int(f.read())
        if quota_us > 0 and period_us > 0:
            return quota_us / period_us
    except (OSError, ValueError):
        pass
    return None


def usable_cores() -> int:
    """Cores this process may use: CPU affinity, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    try:
        value = int(environ.get(name, ""))
    except ValueError:
        return None
    return value if value > 0 else None


def resolve_threads(
    threads_per_worker: int | None, workers: int, environ: Mapping[str, str] | None = None
) -> int:
    """Threads each worker may use.

    An explicit ``threads_per_worker`` wins; else an ``OMP_NUM_THREADS`` the user exported;
    else usable cores // workers, at least 1.
    """
    if threads_per_worker is not None:
        return threads_per_worker
    exported = _env_int(os.environ if environ is None else environ, "OMP_NUM_THREADS")
    if exported is not None:
        return exported
    return max(1, usable_cores() // max(1, workers))


def device_env(device: str | int) -> dict[str, str]:
    """The variables that give a worker one device: ``"cuda:1"`` or ``1`` -> GPU 1 only (it
    appears as ``cuda:0`` inside the worker), ``"cpu"`` -> no GPU visible, ``"cuda"`` -> all."""
    text = str(device).strip().lower()
    if text == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    if text in ("cuda", "gpu"):
        return {}
    number = text.split(":", 1)[1] if text.startswith(("cuda:", "gpu:")) else text
    if not number.isdigit():
        raise ValueError(
            f"device {device!r} is not understood; use 'cuda:N', N, 'cuda' (all GPUs) or 'cpu'"
        )
    return {"CUDA_VISIBLE_DEVICES": number}


def thread_env(
    threads: int, *, explicit: bool, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """All thread-limit variables a worker sets before importing the model.

    An explicit ``threads_per_worker`` overrides everything; otherwise a value the user exported
    is passed on as it is (explicitly: a forkserver's workers inherit the environment the fork
    server had when it started, not the pool's current one).
    """
    environ = os.environ if environ is None else environ
    env = {}
    for name in THREAD_ENV_VARS:
        exported = _env_int(environ, name)
        ours = _tf_interop(threads) if name == "TF_NUM_INTEROP_THREADS" else threads
        env[name] = str(ours if explicit or exported is None else exported)
    return env


def _tf_interop(threads: int) -> int:
    """TensorFlow's inter-op pool for a budget of ``threads``: it runs independent ops side by
    side, each using the intra-op pool (the budget), so a small one: 1, or 2 from 2 threads."""
    return min(threads, 2)


#: threadpoolctl library (internal API) -> the variable that sets its size.
_POOL_VARS = {
    "openmp": "OMP_NUM_THREADS",
    "openblas": "OPENBLAS_NUM_THREADS",
    "mkl": "MKL_NUM_THREADS",
    "blis": "BLIS_NUM_THREADS",
}


def import_path() -> tuple[str, ...]:
    """This process's ``sys.path`` for a worker it starts now: ``""`` (the current directory,
    e.g. under ``python -m``) spelled out, since the worker may start elsewhere."""
    try:
        cwd = os.getcwd()
    except OSError:  # the directory was removed
        cwd = ""
    return tuple(dict.fromkeys(p or cwd for p in sys.path if isinstance(p, str) and (p or cwd)))


def derive_seed(base: int, index: int, generation: int) -> int:
    """A 32-bit seed, distinct per (base, worker index, generation) and reproducible."""
    digest = hashlib.blake2b(f"{base}:{index}:{generation}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def _native_threads() -> int:
    """OS threads of this process that are not Python threads."""
    try:
        tasks = len(os.listdir("/proc/self/task"))
    except OSError:
        return 0
    return max(0, tasks - threading.active_count())


def _openmp_loaded() -> bool:
    if not any(name in sys.modules for name in ("numpy", "torch", "sklearn", "cv2")):
        return False
    with contextlib.suppress(Exception):
        from threadpoolctl import threadpool_info

        return any(info.get("user_api") == "openmp" for info in threadpool_info())
    return False


def _tensorflow_started() -> bool:
    """TensorFlow's runtime has started here (its eager context exists: a model, a tensor or
    a tf.function was made), as far as its internals tell; False when they cannot tell."""
    context = sys.modules.get("tensorflow.python.eager.context")
    if context is None:
        return False
    with contextlib.suppress(Exception):
        return context.context_safe() is not None
    return False


def _tensorflow_hazard() -> str:
    # Measured with tensorflow-cpu 2.21: a child forked after a Keras model was built hangs
    # in its first predict(), every time; forked after the import alone, it works (the
    # runtime starts in the child). Imported alone is refused too: whatever runs before the
    # fork may start the runtime, and nothing tells the children.
    fix = (
        "import TensorFlow only where the model loads (in the model's module or its setup(), "
        "which run in each worker), not in the process that forks"
    )
    if _tensorflow_started():
        return (
            "TensorFlow's runtime has started in this process (a model or tensor was made): "
            "its threads do not survive fork, and a forked child's predict() waits for them "
            f"forever; {fix}"
        )
    return (
        "TensorFlow is imported in this process: once its runtime starts (the first model or "
        "tensor made), a forked child's predict() waits forever for threads that do not "
        f"survive fork; {fix}"
    )


def fork_hazards() -> list[str]:
    """Reasons why forking this process now would break its children (empty = safe enough)."""
    reasons = []
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            if torch.cuda.is_initialized():
                reasons.append(
                    "CUDA is initialised in this process; a forked child cannot use it "
                    "('Cannot re-initialize CUDA in forked subprocess')"
                )
    if "tensorflow" in sys.modules:
        reasons.append(_tensorflow_hazard())
    others = [
        t.name
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.name.startswith(THREAD_PREFIX)
    ]
    if others:
        reasons.append(
            f"{len(others)} other Python thread(s) are running ({', '.join(others[:5])}); a "
            "lock one of them holds at fork stays locked forever in the child"
        )
    native = _native_threads()
    if native and _openmp_loaded():
        # We cannot tell OpenMP's threads from others (OpenBLAS's are fork-safe), so with an
        # OpenMP runtime loaded, any native thread counts: a false alarm costs a start method,
        # a miss costs a hang (GCC bug 60035, pytorch#17199).
        reasons.append(
            f"an OpenMP runtime is loaded and {native} native thread(s) are running (e.g. "
            "after a torch computation); forked children can hang in its thread barrier"
        )
    return reasons


# --------------------------------------------------------------------------- worker side


def ignore_sigint() -> None:
    """Ctrl+C belongs to the parent: workers ignore SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def yield_on_wakeup() -> None:
    """Run this worker under ``SCHED_BATCH`` (Linux; no privilege needed, nice unchanged): a
    worker woken by a request does not preempt the process that sent it (the server's front,
    whose next reads and writes are what keeps every worker fed), it runs when that one
    yields or on another core. Measured on the server: +10 % req/s and a lower p99 on 2 CPUs
    (docs/benchmarks.md). Elsewhere, nothing."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is not None:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, policy, os.sched_param(0))


def die_with_parent(lifeline: Connection) -> None:
    """Exit this worker as soon as the pool's process is gone, however it went.

    Two mechanisms: PR_SET_PDEATHSIG (Linux; fires when the OS parent dies, which under
    forkserver is the fork server, itself gone right after the pool's process), and a thread
    that waits for end-of-file on ``lifeline``, a pipe whose only writer is the pool's process.
    """
    if sys.platform.startswith("linux"):
        libc_name = ctypes.util.find_library("c")
        if libc_name:
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL(libc_name, use_errno=True)
                libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    def watch() -> None:
        with contextlib.suppress(Exception):
            lifeline.poll(None)  # readable only at EOF: the pool never writes
        os._exit(70)

    threading.Thread(target=watch, name=f"{THREAD_PREFIX}lifeline", daemon=True).start()


def apply_env(env: Mapping[str, str]) -> None:
    """Make this worker's environment ``env`` exactly (before the model's modules import)."""
    for name in [n for n in os.environ if n not in env]:
        del os.environ[name]
    os.environ.update(env)


def apply_sys_path(entries: Sequence[str]) -> None:
    """Make ``entries`` (the pool's ``sys.path``) this worker's module search path, keeping
    after them any of its own not among them."""
    if entries:
        sys.path[:] = [*entries, *(p for p in sys.path if p not in entries)]


def limit_blas_and_openmp(threads: int, env: Mapping[str, str]) -> dict[str, int]:
    """Limit the BLAS and OpenMP runtimes loaded in this process (threadpoolctl), each by its
    own variable in ``env`` (else ``threads``); return the limit per threadpoolctl API."""
    limits = {api: int(env.get(var, threads)) for api, var in _POOL_VARS.items()}
    with contextlib.suppress(Exception):
        from threadpoolctl import ThreadpoolController

        controller = ThreadpoolController()
        for api, n in limits.items():
            selected = controller.select(internal_api=api)
            if selected:
                selected.limit(limits=n)
    return limits


#: OpenCV was loaded when this worker started: it came with the fork (``limit_thread_pools``).
_cv2_inherited = False


def limit_thread_pools(threads: int, env: Mapping[str, str], *, at_start: bool = False) -> None:
    """Limit thread pools already loaded when a worker starts: BLAS/OpenMP (threadpoolctl, each
    by its own variable in ``env``), torch (by ``OMP_NUM_THREADS``), OpenCV (sequential, see
    below), ONNX Runtime (``limit_onnxruntime``), TensorFlow (``limit_tensorflow``, if its
    runtime has not started), numexpr (by ``NUMEXPR_NUM_THREADS``). Those loaded later:
    ``limit_when_imported``.

    ``at_start``: the worker is starting, so what is loaded came with the fork. OpenCV loaded
    then came from a process that may have run it on threads.
    Its pool still lists those threads, which the fork did not copy, and resizing the pool
    waits for them forever (``setNumThreads(1)`` hangs at once; measured with
    opencv-python-headless 4.x). ``setNumThreads(0)`` makes OpenCV sequential without
    touching them; an OpenCV imported after the worker started gets the budget instead."""
    global _cv2_inherited
    limits = limit_blas_and_openmp(threads, env)
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            if torch.get_num_threads() != limits["openmp"]:
                torch.set_num_threads(limits["openmp"])
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        _cv2_inherited = _cv2_inherited or at_start
        with contextlib.suppress(Exception):
            cv2.setNumThreads(0 if _cv2_inherited else threads)
    onnxruntime = sys.modules.get("onnxruntime")
    if onnxruntime is not None:
        with contextlib.suppress(Exception):
            limit_onnxruntime(onnxruntime, threads)
    tensorflow = sys.modules.get("tensorflow")
    if tensorflow is not None:
        limit_tensorflow(tensorflow, threads, env)
    numexpr = sys.modules.get("numexpr")
    if numexpr is not None:
        with contextlib.suppress(Exception):
            numexpr.set_num_threads(int(env.get("NUMEXPR_NUM_THREADS", threads)))


class _AfterImport:
    """A meta-path finder that runs ``after(module)`` right after ``name`` is imported."""

    def __init__(self, name: str, after: Any) -> None:
        self.name = name
        self.after = after

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        import importlib.util

        try:  # one shot; also keeps find_spec below from recursing
            sys.meta_path.remove(self)
        except ValueError:  # another thread got here first: it runs ``after``
            return None
        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None)
        exec_module = getattr(loader, "exec_module", None)
        if spec is None or exec_module is None:
            return spec
        after = self.after

        def exec_then(module: Any) -> None:
            exec_module(module)
            with contextlib.suppress(Exception):
                after(module)

        loader.exec_module = exec_then  # type: ignore[union-attr]
        return spec


def _late_hooks(seed: int, threads: int, env: Mapping[str, str]) -> dict[str, Any]:
    """Library -> what to do to it as soon as it is imported (see ``limit_when_imported``)."""
    omp = int(env.get("OMP_NUM_THREADS", threads))

    def torch(module: Any) -> None:
        module.manual_seed(seed)
        module.set_num_threads(omp)

    def cv2(module: Any) -> None:
        # OpenCV's own pool (pthreads, TBB...) reads none of the variables: set it directly
        module.setNumThreads(threads)

    def numexpr(module: Any) -> None:
        module.set_num_threads(int(env.get("NUMEXPR_NUM_THREADS", threads)))

    def onnxruntime(module: Any) -> None:
        limit_onnxruntime(module, threads)

    def tensorflow(module: Any) -> None:
        limit_tensorflow(module, threads, env)

    return {
        "torch": torch,
        "cv2": cv2,
        "numexpr": numexpr,
        "onnxruntime": onnxruntime,
        "tensorflow": tensorflow,
    }


def limit_tensorflow(module: Any, threads: int, env: Mapping[str, str]) -> None:
    """Size TensorFlow's intra-op pool (``TF_NUM_INTRAOP_THREADS``, else the budget) and its
    inter-op pool (``TF_NUM_INTEROP_THREADS``, else 1 or 2). Its runtime reads them once, when
    it starts: a runtime already started keeps its pools (TensorFlow raises RuntimeError; it
    read the same variables from the worker's environment when it started)."""
    intra = int(env.get("TF_NUM_INTRAOP_THREADS", threads))
    inter = int(env.get("TF_NUM_INTEROP_THREADS", _tf_interop(threads)))
    with contextlib.suppress(Exception):
        config = module.config.threading
        with contextlib.suppress(RuntimeError):
            config.set_intra_op_parallelism_threads(intra)
        with contextlib.suppress(RuntimeError):
            config.set_inter_op_parallelism_threads(inter)


def limit_onnxruntime(module: Any, threads: int) -> None:
    """Give every ``InferenceSession`` made from now on ``threads`` intra-op threads (and one
    inter-op thread) unless its ``SessionOptions`` set a number. ONNX Runtime reads no
    variable: each session sizes its own pool to the machine's cores."""
    cls = getattr(module, "InferenceSession", None)
    init = getattr(cls, "__init__", None)
    if cls is None or init is None or getattr(init, "_modelpool_threads", None) is not None:
        return
    make_options = module.SessionOptions

    def __init__(
        self: Any, path_or_bytes: Any, sess_options: Any = None, *a: Any, **kw: Any
    ) -> None:
        options = kw.pop("sess_options", sess_options)
        if options is None:
            options = make_options()
        if options.intra_op_num_threads == 0:  # (0: ORT's "every core")
            options.intra_op_num_threads = threads
        if options.inter_op_num_threads == 0:
            options.inter_op_num_threads = 1
        init(self, path_or_bytes, options, *a, **kw)

    __init__._modelpool_threads = threads  # type: ignore[attr-defined]
    cls.__init__ = __init__


def limit_when_imported(seed: int, threads: int, env: Mapping[str, str]) -> None:
    """Libraries not loaded yet are limited (and torch seeded) the moment they are imported,
    wherever that happens later: in ``predict``, a submitted function or a Celery task.

    torch: seeded, threads by ``OMP_NUM_THREADS``; OpenCV: the budget (it reads no variable);
    numexpr: ``NUMEXPR_NUM_THREADS``; ONNX Runtime: the budget for each session made after
    (``limit_onnxruntime``); TensorFlow: intra-op pool the budget, inter-op 1 or 2
    (``limit_tensorflow``). BLAS and OpenMP runtimes loaded later read their variables, set
    by ``apply_env``, when they load.
    """
    waiting = {f.name for f in sys.meta_path if isinstance(f, _AfterImport)}
    for name, after in _late_hooks(seed, threads, env).items():
        if name not in sys.modules and name not in waiting:
            sys.meta_path.insert(0, _AfterImport(name, after))


def seed_rngs(seed: int, *, only_new: frozenset[str] = frozenset()) -> frozenset[str]:
    """Seed ``random``, NumPy's global RNG and torch (when loaded); return what was seeded.

    With ``only_new``, libraries already seeded (named there) are left alone.
    """
    seeded = set(only_new)
    if "random" not in only_new:
        random.seed(seed)
        seeded.add("random")
    numpy: Any = sys.modules.get("numpy")
    if numpy is not None and "numpy" not in only_new:
        numpy.random.seed(seed)
        seeded.add("numpy")
    torch: Any = sys.modules.get("torch")
    if torch is not None and "torch" not in only_new:
        with contextlib.suppress(Exception):
            torch.manual_seed(seed)
            seeded.add("torch")
    return frozenset(seeded)
