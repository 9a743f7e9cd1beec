"""The status page's history (``server/_history.py``), without processes: percentiles, rates
from counter deltas, the ring buffer's bound, restarts, the JSON's shape and the sampler."""

from __future__ import annotations

import asyncio
import collections
import random
from types import SimpleNamespace
from typing import Any

import pytest

from modelpool.server import _history
from modelpool.server._history import History, ModelHistory, percentiles
from modelpool.server._metrics import Metrics


def test_percentiles_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    random.Random(0).shuffle(values)
    assert percentiles(values, (0.5, 0.9, 0.99, 1.0)) == [50.0, 90.0, 99.0, 100.0]
    assert percentiles([7.0], (0.5, 0.99)) == [7.0, 7.0]
    assert percentiles([], (0.5, 0.9)) == [None, None]
    assert percentiles(iter([3.0, 1.0, 2.0]), (0.0, 0.5)) == [1.0, 2.0]


def _observe(h: ModelHistory, now: float, **kw: Any) -> _history.Point:
    args: dict[str, Any] = {
        "now": now,
        "wall": 1000.0 + now,
        "requests": {},
        "recent": [],
        "queued": 0,
        "in_flight": 0,
        "states": ["idle"],
        "exit_reasons": {},
    }
    return h.observe(**(args | kw))


def test_rates_and_latency_come_from_the_interval_only() -> None:
    h = ModelHistory(now=0.0)
    recent: collections.deque[float] = collections.deque(maxlen=2000)
    recent.extend([0.001] * 10)  # ten answers of 1 ms in the first second
    p = _observe(h, 1.0, requests={200: 10, 500: 2}, recent=recent)
    assert (p.requests, p.errors) == (12.0, 2.0)
    assert (p.p50, p.p90, p.p99) == (1.0, 1.0, 1.0)
    assert p.t == 1001.0

    # the next two seconds: 4 more answers, slower, and one more error; the 1 ms ones are
    # older than the interval and must not count
    recent.extend([0.010, 0.020, 0.030, 0.040])
    p = _observe(h, 3.0, requests={200: 14, 500: 2, 503: 1}, recent=recent)
    assert (p.requests, p.errors) == (2.5, 0.5)  # 5 answers / 2 s, 1 error / 2 s
    assert (p.p50, p.p90, p.p99) == (20.0, 40.0, 40.0)

    # a quiet second: zero rates and no latency (a gap in the chart, not a zero)
    p = _observe(h, 4.0, requests={200: 14, 500: 2, 503: 1}, recent=recent)
    assert (p.requests, p.errors, p.p50, p.p99) == (0.0, 0.0, None, None)


def test_more_answers_than_the_reservoir_holds_uses_the_latest() -> None:
    h = ModelHistory(now=0.0)
    recent: collections.deque[float] = collections.deque([0.005] * 3, maxlen=3)
    p = _observe(h, 1.0, requests={200: 50}, recent=recent)
    assert p.requests == 50.0
    assert p.p50 == 5.0


def test_ring_buffer_is_bounded() -> None:
    h = ModelHistory(now=0.0, size=5)
    for second in range(1, 13):
        _observe(h, float(second), requests={200: second})
    assert len(h.points) == 5
    assert [p.t for p in h.points] == [1008.0, 1009.0, 1010.0, 1011.0, 1012.0]
    assert all(p.requests == 1.0 for p in h.points)


def test_restarts_are_replaced_exits_in_the_interval() -> None:
    h = ModelHistory(now=0.0)
    assert not _observe(h, 1.0, exit_reasons={"stopped": 1}).restarts  # scale-down: no restart
    p = _observe(h, 2.0, exit_reasons={"stopped": 1, "SIGKILL": 2, "timeout": 1})
    assert p.restarts == {"SIGKILL": 2, "timeout": 1}
    assert not _observe(h, 3.0, exit_reasons={"stopped": 2, "SIGKILL": 2, "timeout": 1}).restarts
    p = _observe(h, 4.0, exit_reasons={"stopped": 2, "SIGKILL": 3, "timeout": 1})
    assert p.restarts == {"SIGKILL": 1}
    restarts = h.columns()["restarts"]
    assert restarts == [
        {"t": 1002.0, "count": 3, "reasons": {"SIGKILL": 2, "timeout": 1}},
        {"t": 1004.0, "count": 1, "reasons": {"SIGKILL": 1}},
    ]


def test_columns_align_and_stack_states_in_a_fixed_order() -> None:
    h = ModelHistory(now=0.0)
    _observe(h, 1.0, states=["starting", "starting"], queued=3)
    _observe(h, 2.0, states=["idle", "busy"], in_flight=1)
    _observe(h, 3.0, states=["busy", "restarting", "zombie"])
    cols = h.columns()
    assert cols["t"] == [1001.0, 1002.0, 1003.0]
    assert list(cols["workers"]) == ["busy", "idle", "starting", "restarting", "zombie"]
    assert cols["workers"]["starting"] == [2, 0, 0]
    assert cols["workers"]["busy"] == [0, 1, 1]
    assert cols["queued"] == [3, 0, 0]
    assert cols["in_flight"] == [0, 1, 0]
    assert set(cols["latency_ms"]) == {"p50", "p90", "p99"}
    for series in (cols["requests_per_s"], cols["errors_per_s"], *cols["latency_ms"].values()):
        assert len(series) == 3


class _FakePool:
    def __init__(self) -> None:
        self.exits: dict[str, int] = {}
        self.states = ["idle", "idle"]

    def stats(self) -> dict[str, Any]:
        workers = [SimpleNamespace(state=s) for s in self.states]
        return {"queued": 1, "in_flight": 0, "workers": workers, "exit_reasons": dict(self.exits)}


def _fake_server(*names: str) -> Any:
    models = {
        n: SimpleNamespace(pool=_FakePool(), recent=collections.deque(maxlen=2000)) for n in names
    }
    return SimpleNamespace(metrics=Metrics(), models=models)


def test_history_samples_what_the_server_keeps() -> None:
    clock = iter([0.0]).__next__
    history = History(interval=1.0, size=10, clock=clock)
    server = _fake_server("a", "b")
    for seconds in (0.002, 0.004):
        server.metrics.observe("a", 200, seconds)  # what Server.infer does per request
        server.models["a"].recent.append(seconds)
    server.metrics.observe("a", 500, 0.1)
    server.models["b"].pool.exits["SIGSEGV"] = 1
    history.sample(server.metrics, server.models, now=1.0, wall=50.0)
    data = history.to_json()
    assert data["interval_s"] == 1.0
    assert data["window_s"] == 10.0
    a, b = data["models"]
    assert (a["name"], b["name"]) == ("a", "b")
    assert a["requests_per_s"] == [3.0]
    assert a["errors_per_s"] == [1.0]
    assert a["latency_ms"]["p50"] == [2.0]
    assert a["latency_ms"]["p99"] == [4.0]
    assert a["queued"] == [1]
    assert a["workers"] == {"idle": [2]}
    assert b["requests_per_s"] == [0.0]
    assert b["latency_ms"]["p50"] == [None]
    assert b["restarts"] == [{"t": 50.0, "count": 1, "reasons": {"SIGSEGV": 1}}]


def test_sampler_runs_while_the_app_runs_and_survives_a_failing_sample(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Event-driven: each sample sets an event the test waits for (no sleeps)."""

    async def scenario() -> None:
        history = History(interval=0.001, size=100)
        server = _fake_server("a")
        sampled = asyncio.Event()
        calls = 0
        real_sample = history.sample

        def sample(metrics: Any, models: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("boom")
            real_sample(metrics, models)
            sampled.set()

        history.sample = sample  # type: ignore[method-assign]
        source = lambda: (server.metrics, server.models)  # noqa: E731
        context = history.sampler(source)(None)  # type: ignore[arg-type]
        await context.__anext__()
        await asyncio.wait_for(sampled.wait(), 30)
        with pytest.raises(StopAsyncIteration):
            await context.__anext__()  # cleanup: the task is cancelled and awaited
        assert history.models["a"].points

    with caplog.at_level("ERROR", logger="modelpool.server"):
        asyncio.run(scenario())
    assert "sampling the status page's history failed" in caplog.text
