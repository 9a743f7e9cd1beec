"""Prometheus text exposition for ``GET /metrics`` (no client library needed).

Counted per request by the server: requests by model and status code, errors by model and
code, latency histograms. Read from each pool when scraped: queue depth, in-flight requests,
batch sizes, workers by state, worker restarts and exits by reason, worker RSS.
"""

from __future__ import annotations

import bisect
import collections
import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["LATENCY_BUCKETS", "NOT_REPLACED", "Metrics"]

#: seconds; fine at the low end, where a small model's answers are
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: exit reasons after which no replacement is started (scale-down, pool shutdown): the exits
#: that are not restarts, here and on the status page's charts (``_history``)
NOT_REPLACED = frozenset({"stopped", "shutdown"})


def _labels(**labels: object) -> str:
    def escape(value: object) -> str:
        return str(value).replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Histogram:
    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += n
        self.sum += value * n

    def lines(self, name: str, **labels: object) -> Iterable[str]:
        total = 0
        for bound, count in zip((*self.buckets, math.inf), self.counts, strict=True):
            total += count
            yield f"{name}_bucket{_labels(**labels, le=_number(bound))} {total}"
        yield f"{name}_sum{_labels(**labels)} {_number(self.sum)}"
        yield f"{name}_count{_labels(**labels)} {total}"


class Metrics:
    """Request counters and latency histograms, plus a renderer for the whole exposition."""

    def __init__(self) -> None:
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.latency: dict[str, _Histogram] = {}

    def to_json(self) -> dict[str, Any]:
        """The counters, for another process to add up (``add_json``)."""
        return {
            "requests": [[model, code, n] for (model, code), n in self.requests.items()],
            "latency": {
                model: {"counts": h.counts, "sum": h.sum} for model, h in self.latency.items()
            },
        }

    def add_json(self, data: Mapping[str, Any]) -> None:
        """Add counters written by ``to_json`` (another front's) to these."""
        for model, code, n in data.get("requests", ()):
            self.requests[str(model), int(code)] += int(n)
        for model, h in (data.get("latency") or {}).items():
            mine = self.latency.get(model)
            if mine is None:
                mine = self.latency[model] = _Histogram(LATENCY_BUCKETS)
            if len(h["counts"]) == len(mine.counts):
                mine.counts = [a + int(b) for a, b in zip(mine.counts, h["counts"], strict=True)]
                mine.sum += float(h["sum"])

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Metrics:
        metrics = cls()
        metrics.add_json(data)
        return metrics

    def observe(self, model: str, code: int, seconds: float) -> None:
        self.requests[model, code] += 1
        histogram = self.latency.get(model)
        if histogram is None:
            histogram = self.latency[model] = _Histogram(LATENCY_BUCKETS)
        histogram.observe(seconds)

    def render(self, pools: Mapping[str, Mapping[str, Any]], ready: Mapping[str, bool]) -> str:
        """The exposition text; ``pools`` maps model name -> ``Pool.stats()``."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        family("modelpool_requests_total", "counter", "Inference requests by model and status.")
        for (model, code), n in sorted(self.requests.items()):
            out.append(f"modelpool_requests_total{_labels(model=model, code=code)} {n}")
        family("modelpool_request_errors_total", "counter", "Inference requests not answered 200.")
        for (model, code), n in sorted(self.requests.items()):
            if code != 200:
                out.append(f"modelpool_request_errors_total{_labels(model=model, code=code)} {n}")
        family(
            "modelpool_request_duration_seconds",
            "histogram",
            "Inference request latency, from the request read to the answer written.",
        )
        for model, histogram in sorted(self.latency.items()):
            out.extend(histogram.lines("modelpool_request_duration_seconds", model=model))

        family("modelpool_model_ready", "gauge", "1 while the model is ready to serve.")
        for model in pools:
            out.append(f"modelpool_model_ready{_labels(model=model)} {int(ready.get(model, 0))}")
        family("modelpool_queue_depth", "gauge", "Requests waiting for a worker.")
        for model, stats in pools.items():
            out.append(f"modelpool_queue_depth{_labels(model=model)} {stats['queued']}")
        family("modelpool_in_flight", "gauge", "Requests being run by a worker.")
        for model, stats in pools.items():
            out.append(f"modelpool_in_flight{_labels(model=model)} {stats['in_flight']}")
        family("modelpool_batch_size", "histogram", "Rows per batch run (batching models).")
        for model, stats in pools.items():
            if stats["batch_sizes"]:
                histogram = _Histogram(BATCH_BUCKETS)
                for rows, n in stats["batch_sizes"].items():
                    histogram.observe(rows, n)
                out.extend(histogram.lines("modelpool_batch_size", model=model))
        family("modelpool_workers", "gauge", "Worker processes by state.")
        for model, stats in pools.items():
            states = collections.Counter(w.state for w in stats["workers"])
            for state, n in sorted(states.items()):
                out.append(f"modelpool_workers{_labels(model=model, state=state)} {n}")
        family("modelpool_worker_restarts_total", "counter", "Worker processes replaced.")
        for model, stats in pools.items():
            # from the exit totals, which only grow: a slot removed by scaling down takes its
            # per-worker restart count with it, and a counter must never go down
            exits = stats["exit_reasons"]
            restarts = sum(n for why, n in exits.items() if why not in NOT_REPLACED)
            out.append(f"modelpool_worker_restarts_total{_labels(model=model)} {restarts}")
        family("modelpool_worker_exits_total", "counter", "Worker exits by reason.")
        for model, stats in pools.items():
            for reason, n in sorted(stats["exit_reasons"].items()):
                out.append(f"modelpool_worker_exits_total{_labels(model=model, reason=reason)} {n}")
        family("modelpool_worker_rss_bytes", "gauge", "Resident memory of each worker.")
        for model, stats in pools.items():
            for w in stats["workers"]:
                if w.rss is not None:
                    labels = _labels(model=model, worker=w.index, pid=w.pid)
                    out.append(f"modelpool_worker_rss_bytes{labels} {w.rss}")
        family("modelpool_worker_requests_total", "counter", "Requests served by each worker.")
        for model, stats in pools.items():
            for w in stats["workers"]:
                if w.pid is not None:
                    labels = _labels(model=model, worker=w.index, pid=w.pid)
                    out.append(f"modelpool_worker_requests_total{labels} {w.served}")
        return "\n".join(out) + "\n"
