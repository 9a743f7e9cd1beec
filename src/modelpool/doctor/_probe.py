"""What runs in the doctor's child processes, reported as one JSON object on stdout.

``python -m modelpool.doctor._probe frameworks``: import the installed frameworks the way a
model's process would, then report the native libraries, thread pools and CUDA state they left.

``python -m modelpool.doctor._probe model TARGET OPTIONS_JSON THREADS``: load ``TARGET`` the
way a pool's worker does (the worker's thread budget and seeds, then import, construct,
``setup()``), measuring each step, and call ``predict`` on inputs built from its
``TensorSpec``s when it declares them.

A child, so that nothing it imports or starts stays in the doctor's process, and a hang or a
crash of the model is reported instead of suffered.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import sys
import threading
import time
import traceback
from typing import Any

#: frameworks whose import the doctor tries (those installed), in this order
FRAMEWORKS = ("numpy", "torch", "cv2", "sklearn", "onnxruntime", "tensorflow")
#: an OpenMP runtime's file name -> its family (two families in one process is the hazard)
_OPENMP = re.compile(r"/lib(gomp|iomp5|omp)(?:[-.][^/]*)?\.so[^/]*$")
_FAMILY = {"gomp": "GNU libgomp", "iomp5": "Intel libiomp5", "omp": "LLVM libomp"}


def mapped_libraries() -> list[str]:
    """The shared libraries mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            fields = [line.split(None, 5) for line in f]
    except OSError:
        return []
    paths = {f[5].strip() for f in fields if len(f) == 6 and f[5].startswith("/")}
    return sorted(p for p in paths if ".so" in os.path.basename(p))


def openmp_runtimes(libraries: list[str]) -> dict[str, list[str]]:
    """OpenMP runtimes among ``libraries``: family -> the files of it loaded."""
    found: dict[str, list[str]] = {}
    for path in libraries:
        match = _OPENMP.search(path)
        if match and "omptarget" not in path:
            found.setdefault(_FAMILY[match.group(1)], []).append(path)
    return found


def _threads() -> tuple[int, list[str]]:
    """OS threads of this process, and the names of its Python threads."""
    try:
        count = len(os.listdir("/proc/self/task"))
    except OSError:
        count = threading.active_count()
    return count, [t.name for t in threading.enumerate()]


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _thread_pools() -> dict[str, Any]:
    """Thread pool sizes of the libraries loaded now."""
    pools: dict[str, Any] = {}
    try:
        from threadpoolctl import threadpool_info

        pools["native"] = [
            {k: info.get(k) for k in ("user_api", "internal_api", "num_threads", "filepath")}
            for info in threadpool_info()
        ]
    except Exception:  # (threadpoolctl missing or confused: the rest still says enough)
        pools["native"] = []
    torch = sys.modules.get("torch")
    if torch is not None:
        pools["torch"] = torch.get_num_threads()
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        pools["cv2"] = cv2.getNumThreads()
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        try:
            pools["tensorflow"] = tf.config.threading.get_intra_op_parallelism_threads()
        except Exception:
            pass
    return pools


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_initialized())
    except Exception:
        return False


def frameworks() -> dict[str, Any]:
    from modelpool import _hygiene

    threads_before = _threads()[0]
    imported: dict[str, Any] = {}
    for name in FRAMEWORKS:
        if importlib.util.find_spec(name) is None:
            continue
        started = time.perf_counter()
        try:
            module = importlib.import_module(name)
        except Exception as exc:
            imported[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        imported[name] = {
            "version": str(getattr(module, "__version__", "?")),
            "import_s": round(time.perf_counter() - started, 3),
        }
    libraries = mapped_libraries()
    return {
        "imported": imported,
        "openmp": openmp_runtimes(libraries),
        "pools": _thread_pools(),
        "threads_started": _threads()[0] - threads_before,
        "cuda_initialised": _cuda_initialised(),
        "fork_hazards": _hygiene.fork_hazards(),
    }


def _example(spec: Any) -> Any:
    """An input for ``spec``: ones of its dtype (text for BYTES), any size (-1) taken as 1."""
    import numpy as np

    shape = tuple(1 if d < 0 else d for d in spec.shape)
    if spec.datatype == "BYTES":
        return np.full(shape, b"modelpool doctor", dtype=object)
    return np.ones(shape, dtype=spec.dtype)


def _picklable(cls: Any) -> str | None:
    """Why ``cls`` cannot be sent to a worker by reference (module + name), or None."""
    module, qualname = getattr(cls, "__module__", None), getattr(cls, "__qualname__", "")
    if module == "__main__":
        return "it is defined in __main__, which a spawned or forkserver worker cannot import"
    if "<locals>" in qualname:
        return f"{qualname} is defined inside a function; define it at module level"
    try:
        found = pickle.loads(pickle.dumps(cls))
    except Exception as exc:
        return f"pickling it by reference fails: {type(exc).__name__}: {exc}"
    if found is not cls:
        return f"pickle finds a different object under {module}.{qualname}"
    return None


def model(target: str, options: dict[str, Any], threads: int) -> dict[str, Any]:
    from modelpool import _hygiene
    from modelpool._importer import import_from_string

    out: dict[str, Any] = {"target": target, "options": options, "threads": threads}
    env = _hygiene.thread_env(threads, explicit=True)
    os.environ.update(env)  # (the budget, as a worker gets it before anything imports)
    _hygiene.limit_when_imported(0, threads, env)
    _hygiene.seed_rngs(0)
    libraries_before = set(mapped_libraries())
    threads_before, names_before = _threads()
    rss_before = _rss()
    step = "import"
    try:
        started = time.perf_counter()
        cls = import_from_string(target)
        out["import_s"] = round(time.perf_counter() - started, 3)
        out["import_rss"] = _rss() - rss_before
        count, names = _threads()
        out["import_threads"] = count - threads_before
        out["import_thread_names"] = [n for n in names if n not in names_before]
        out["import_cuda_initialised"] = _cuda_initialised()
        out["import_fork_hazards"] = _hygiene.fork_hazards()
        out["not_picklable"] = _picklable(cls)
        _hygiene.limit_thread_pools(threads, env)
        step = "setup"
        started = time.perf_counter()
        instance = cls(**options)
        setup = getattr(instance, "setup", None)
        if setup is not None:
            setup()
        out["setup_s"] = round(time.perf_counter() - started, 3)
        out["pools_after_setup"] = _thread_pools()  # (what the model set, if anything)
        _hygiene.limit_thread_pools(threads, env)  # (as a worker does after setup)
        out["rss"] = _rss()
        out["threads_started"] = _threads()[0] - threads_before
        libraries = mapped_libraries()
        out["libraries"] = sorted(set(libraries) - libraries_before)
        out["openmp"] = openmp_runtimes(libraries)
        out["pools"] = _thread_pools()
        out["cuda_initialised"] = _cuda_initialised()
        specs = getattr(instance, "inputs", None) or getattr(cls, "inputs", None)
        if specs:
            step = "predict"
            inputs = {spec.name: _example(spec) for spec in specs}
            started = time.perf_counter()
            outputs = instance.predict(inputs)
            out["predict_s"] = round(time.perf_counter() - started, 4)
            out["predict_outputs"] = _describe(outputs)
        else:
            out["predict_skipped"] = "the model declares no inputs (TensorSpecs)"
        teardown = getattr(instance, "teardown", None)
        if teardown is not None:
            step = "teardown"
            teardown()
    except BaseException as exc:
        out["failed"] = {
            "step": step,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=-8),
        }
    return out


def _describe(outputs: Any) -> Any:
    if isinstance(outputs, dict):
        return {str(k): _describe(v) for k, v in outputs.items()}
    shape, dtype = getattr(outputs, "shape", None), getattr(outputs, "dtype", None)
    if shape is not None:
        return {"shape": list(shape), "dtype": str(dtype)}
    return {"type": type(outputs).__name__}


def main(argv: list[str]) -> None:
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # (what the frameworks and the model print goes to stderr)
    if argv[:1] == ["frameworks"]:
        result = frameworks()
    elif argv[:1] == ["model"] and len(argv) == 4:
        sys.path.insert(0, os.getcwd())  # models next to the command, as `serve` finds them
        result = model(argv[1], json.loads(argv[2]), int(argv[3]))
    else:
        raise SystemExit(f"usage: {sys.argv[0]} frameworks | model TARGET OPTIONS THREADS")
    real_stdout.write("\nMODELPOOL-DOCTOR " + json.dumps(result, default=str) + "\n")
    real_stdout.flush()
    os._exit(0)  # (a model's non-daemon threads must not keep the probe alive)


if __name__ == "__main__":
    main(sys.argv[1:])
