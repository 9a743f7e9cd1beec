"""``modelpool doctor pkg.mod:Model``: the model loaded in a child the way a worker loads it,
and what that showed, as findings."""

from __future__ import annotations

import json
import os
from typing import Any

from modelpool import _hygiene

from ._environment import ProbeError, openmp_findings, run_probe
from ._report import Finding

__all__ = ["check_model"]


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def check_model(
    target: str, options: dict[str, Any], threads: int, facts: dict[str, Any]
) -> list[Finding]:
    env = {**os.environ, **_hygiene.thread_env(threads, explicit=True)}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        probe = run_probe(["model", target, json.dumps(options), str(threads)], env)
    except ProbeError as exc:
        return [Finding("model-load", "hazard", f"{target}: {exc}")]
    facts["model"] = probe
    failed = probe.get("failed")
    if failed and failed["step"] == "import":
        return [
            Finding(
                "model-import",
                "hazard",
                f"importing {target} fails: {failed['error']}",
                failed["traceback"].strip(),
                "run `python -c 'import MODULE'` in the same environment and fix what it says",
            )
        ]
    found = [_import(target, probe)]
    found += _fork_safety(target, probe)
    if probe.get("not_picklable"):
        found.append(
            Finding(
                "pickle",
                "warning",
                f"the class cannot be sent to a worker by reference: {probe['not_picklable']}",
                "Pool(cls) needs the class importable by module and name in the worker",
                "define it at module level of an importable module, and pass the import "
                "string 'package.module:Class'",
            )
        )
    else:
        found.append(Finding("pickle", "ok", "the class pickles by reference (module + name)"))
    if failed:
        found.append(
            Finding(
                f"model-{failed['step']}",
                "hazard",
                f"{failed['step']} fails: {failed['error']}",
                failed["traceback"].strip(),
                "every worker would fail the same way: fix it before deploying",
            )
        )
        return found
    found.append(_setup(probe))
    found += openmp_findings(probe.get("openmp", {}), "the model")
    found += _pools(probe, threads)
    found.append(_predict(probe))
    return found


def _import(target: str, probe: dict[str, Any]) -> Finding:
    started = probe.get("import_thread_names") or []
    return Finding(
        "model-import",
        "ok",
        f"{target} imports in {probe['import_s']:.2f} s (+{_mib(probe['import_rss'])} "
        f"resident, {probe['import_threads']} thread(s) started"
        + (f": {', '.join(started[:5])}" if started else "")
        + ")",
    )


def _fork_safety(target: str, probe: dict[str, Any]) -> list[Finding]:
    module = target.partition(":")[0]
    if probe.get("import_cuda_initialised"):
        return [
            Finding(
                "fork-safety",
                "hazard",
                f"importing {module} initialises CUDA",
                "any process that imports it holds a CUDA context (GPU memory), and cannot "
                "fork children that use CUDA ('Cannot re-initialize CUDA in forked "
                "subprocess'): Celery prefork, DataLoader workers, multiprocessing with fork",
                "move the CUDA work (model.to('cuda'), torch.cuda calls) from module level "
                "into setup()",
            )
        ]
    hazards = probe.get("import_fork_hazards") or []
    if hazards:
        return [
            Finding(
                "fork-safety",
                "warning",
                f"a process that imports {module} is no longer safe to fork: " + "; ".join(hazards),
                "modelpool's workers start by forkserver and are not affected; Celery "
                "--pool=prefork, DataLoader workers and multiprocessing with fork are",
                "keep the import out of the parent: import inside setup(), and serve with "
                "modelpool (or Celery --pool=threads)",
            )
        ]
    return [Finding("fork-safety", "ok", f"importing {module} leaves the process safe to fork")]


def _setup(probe: dict[str, Any]) -> Finding:
    libraries = probe.get("libraries") or []
    native = sorted({os.path.basename(p) for p in libraries})
    shown = ", ".join(native[:8]) + (f" and {len(native) - 8} more" if len(native) > 8 else "")
    return Finding(
        "model-setup",
        "ok",
        f"constructed and set up in {probe['setup_s']:.2f} s; worker resident memory "
        f"{_mib(probe['rss'])}, {probe['threads_started']} thread(s) started, "
        f"{len(native)} native librar{'y' if len(native) == 1 else 'ies'} loaded"
        + (f" ({shown})" if native else ""),
        "CUDA is in use in the worker, which is fine there (its own CUDA, started after the "
        "worker did); give each worker its own GPU with devices: ['cuda:0', 'cuda:1', ...]"
        if probe.get("cuda_initialised")
        else "",
    )


def _pools(probe: dict[str, Any], threads: int) -> list[Finding]:
    over = _over(probe.get("pools_after_setup", {}), threads)
    if over:
        return [
            Finding(
                "model-threads",
                "info",
                f"setup() sets thread pools past the worker's budget of {threads}: {over}",
                "a modelpool worker sets them back to its budget after setup(); a process "
                "that hosts the class without modelpool keeps them, and oversubscribes",
                "leave thread counts to modelpool (threads_per_worker), or read "
                "modelpool.worker_info().threads",
            )
        ]
    still = _over(probe.get("pools", {}), threads)
    if still:
        return [
            Finding(
                "model-threads",
                "warning",
                f"thread pools exceed the worker's budget of {threads}: {still}",
                "the workers oversubscribe the cores",
                "set threads_per_worker, or limit the library's pool in setup() with "
                "modelpool.worker_info().threads",
            )
        ]
    return [Finding("model-threads", "ok", f"thread pools within the budget of {threads}")]


def _over(pools: dict[str, Any], threads: int) -> str:
    sizes = {"torch": pools.get("torch"), "OpenCV": pools.get("cv2")}
    for pool in pools.get("native", []):
        sizes[str(pool.get("internal_api"))] = pool.get("num_threads")
    return ", ".join(f"{k} {v}" for k, v in sizes.items() if isinstance(v, int) and v > threads)


def _predict(probe: dict[str, Any]) -> Finding:
    if "predict_skipped" in probe:
        return Finding(
            "model-predict",
            "info",
            f"no test predict: {probe['predict_skipped']}",
            "declare inputs = [TensorSpec(...)] on the model to have it checked",
        )
    return Finding(
        "model-predict",
        "ok",
        f"a test predict on inputs built from its TensorSpecs took {probe['predict_s']:.3f} s "
        f"and returned {json.dumps(probe['predict_outputs'])}",
    )
