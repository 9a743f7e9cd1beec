"""The Prometheus exposition, from fake pool statistics (the real server is tested end to end)."""

from __future__ import annotations

from typing import Any

from modelpool import WorkerStats
from modelpool.server._metrics import Metrics


def _stats(workers: list[WorkerStats], exits: dict[str, int]) -> dict[str, Any]:
    return {
        "workers": workers,
        "queued": 3,
        "in_flight": 1,
        "batch_sizes": {1: 2, 5: 1},
        "exit_reasons": exits,
    }


def _value(text: str, prefix: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(line.rsplit(" ", 1)[1])


def test_exposition_has_every_family_with_correct_values() -> None:
    m = Metrics()
    m.observe("m", 200, 0.002)
    m.observe("m", 200, 0.2)
    m.observe("m", 503, 0.001)
    worker = WorkerStats(0, 1, 123, "idle", 7, 1, "pid 9: killed by SIGKILL", 50_000_000)
    text = m.render({"m": _stats([worker], {"SIGKILL": 1})}, {"m": True})
    assert _value(text, 'modelpool_requests_total{model="m",code="200"}') == 2
    assert _value(text, 'modelpool_request_errors_total{model="m",code="503"}') == 1
    assert _value(text, 'modelpool_request_duration_seconds_bucket{model="m",le="0.001"}') == 1
    assert _value(text, 'modelpool_request_duration_seconds_bucket{model="m",le="0.0025"}') == 2
    assert _value(text, 'modelpool_request_duration_seconds_bucket{model="m",le="+Inf"}') == 3
    assert _value(text, 'modelpool_request_duration_seconds_count{model="m"}') == 3
    assert _value(text, 'modelpool_queue_depth{model="m"}') == 3
    assert _value(text, 'modelpool_batch_size_bucket{model="m",le="4"}') == 2
    assert _value(text, 'modelpool_batch_size_sum{model="m"}') == 7
    assert _value(text, 'modelpool_worker_exits_total{model="m",reason="SIGKILL"}') == 1
    assert _value(text, 'modelpool_worker_rss_bytes{model="m",worker="0",pid="123"}') == 5e7
    assert _value(text, 'modelpool_model_ready{model="m"}') == 1
    assert _value(text, 'modelpool_workers{model="m",state="idle"}') == 1
    for line in text.splitlines():
        assert line.startswith(("#", "modelpool_")), line


def test_restarts_never_go_down_when_a_slot_is_scaled_away() -> None:
    m = Metrics()
    busy = [WorkerStats(i, 1, 100 + i, "idle", 1, 1, None, None) for i in range(2)]
    first = m.render({"m": _stats(busy, {"recycled": 2})}, {})
    after = m.render({"m": _stats(busy[:1], {"recycled": 2, "stopped": 1})}, {})
    key = 'modelpool_worker_restarts_total{model="m"}'
    assert _value(after, key) >= _value(first, key) == 2


def test_label_values_are_escaped() -> None:
    m = Metrics()
    m.observe('we"ird\\name\n', 200, 0.1)
    text = m.render({}, {})
    assert 'model="we\\"ird\\\\name\\n"' in text
