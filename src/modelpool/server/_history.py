"""The status page's charts: a bounded in-memory history, sampled once a second.

A periodic task reads what the server already keeps (the request counters of ``Metrics``, each
model's ``recent`` answer latencies and ``Pool.stats()``) and appends one point per model to a
ring buffer of ``SIZE`` points (10 minutes). Nothing is added to the request path: a request's
only cost stays the counter and the latency the server records anyway.

Per interval: requests and errors (answers other than 200) per second, from the counters'
deltas; p50 / p90 / p99 latency of the answers (200s) that came in the interval, exact from the
``recent`` reservoir (it holds the last ``RECENT`` answers, so above that many per interval the
percentiles are of the latest ones); queue depth and requests in flight; workers by state; and
worker restarts (exits that are replaced), with their reasons.

``GET /status/history.json`` answers it, column-wise (one list per series, aligned with ``t``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any

from ._metrics import NOT_REPLACED

if TYPE_CHECKING:
    from aiohttp import web

    from ._metrics import Metrics

__all__ = ["INTERVAL", "SIZE", "History", "ModelHistory", "Point", "percentiles"]

#: what the sampler reads each time: the request counters and the models (the whole server's)
Source = Callable[[], "tuple[Metrics, Mapping[str, Any]]"]

log = logging.getLogger("modelpool.server")

#: seconds between samples
INTERVAL = 1.0
#: samples kept per model (10 minutes at one a second)
SIZE = 600
#: the percentiles charted
QUANTILES = (0.5, 0.9, 0.99)
#: the order worker states are stacked in (states not listed come after, sorted)
STATE_ORDER = ("busy", "idle", "starting", "retiring", "stopping", "restarting", "failed")


def percentiles(values: Iterable[float], quantiles: Sequence[float]) -> list[float | None]:
    """Nearest-rank percentiles of ``values`` (one sort for all); None for each when empty."""
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return [None] * len(quantiles)
    return [ordered[min(n - 1, max(0, math.ceil(q * n) - 1))] for q in quantiles]


@dataclass(slots=True, frozen=True)
class Point:
    """One model's interval: rates per second, latency in ms (None: no answers), gauges."""

    t: float  # wall-clock time (Unix seconds) at the end of the interval
    requests: float
    errors: float
    p50: float | None
    p90: float | None
    p99: float | None
    queued: int
    in_flight: int
    states: Mapping[str, int]
    restarts: Mapping[str, int]  # replaced-worker exits in the interval, by reason


@dataclass(slots=True)
class _Totals:
    """The cumulative counters as last sampled (the deltas' baseline)."""

    at: float  # monotonic
    requests: int = 0
    errors: int = 0
    answered: int = 0
    exits: dict[str, int] = field(default_factory=dict)


class ModelHistory:
    """One model's ring buffer, fed cumulative counters and gauges."""

    def __init__(self, now: float, size: int = SIZE) -> None:
        self.points: collections.deque[Point] = collections.deque(maxlen=size)
        self._last = _Totals(now)

    def observe(
        self,
        *,
        now: float,
        wall: float,
        requests: Mapping[int, int],
        recent: Sequence[float],
        queued: int,
        in_flight: int,
        states: Iterable[str],
        exit_reasons: Mapping[str, int],
    ) -> Point:
        """Append the interval since the last call. ``requests``: answers so far by status
        code; ``recent``: latencies (s) of the latest 200 answers, newest last; ``states``: each
        worker's state; ``exit_reasons``: worker exits so far by kind."""
        last = self._last
        dt = max(now - last.at, 1e-9)
        total = sum(requests.values())
        answered = requests.get(200, 0)
        errors = total - answered
        new = min(max(0, answered - last.answered), len(recent))
        # the newest ``new`` latencies; islice over reversed() walks only those
        latest = islice(reversed(recent), new) if new else ()
        p50, p90, p99 = (_ms(v) for v in percentiles(latest, QUANTILES))
        restarts = {
            why: n - last.exits.get(why, 0)
            for why, n in exit_reasons.items()
            if why not in NOT_REPLACED and n > last.exits.get(why, 0)
        }
        point = Point(
            t=round(wall, 3),
            requests=round(max(0, total - last.requests) / dt, 3),
            errors=round(max(0, errors - last.errors) / dt, 3),
            p50=p50,
            p90=p90,
            p99=p99,
            queued=queued,
            in_flight=in_flight,
            states=dict(collections.Counter(states)),
            restarts=restarts,
        )
        self.points.append(point)
        self._last = _Totals(now, total, errors, answered, dict(exit_reasons))
        return point

    def columns(self) -> dict[str, Any]:
        """The points column-wise, as ``GET /status/history.json`` gives them."""
        points = list(self.points)
        seen = {state for p in points for state in p.states}
        order = [s for s in STATE_ORDER if s in seen] + sorted(seen - set(STATE_ORDER))
        return {
            "t": [p.t for p in points],
            "requests_per_s": [p.requests for p in points],
            "errors_per_s": [p.errors for p in points],
            "latency_ms": {
                "p50": [p.p50 for p in points],
                "p90": [p.p90 for p in points],
                "p99": [p.p99 for p in points],
            },
            "queued": [p.queued for p in points],
            "in_flight": [p.in_flight for p in points],
            "workers": {s: [p.states.get(s, 0) for p in points] for s in order},
            "restarts": [
                {"t": p.t, "count": sum(p.restarts.values()), "reasons": dict(p.restarts)}
                for p in points
                if p.restarts
            ],
        }


class History:
    """Every model's ``ModelHistory``, and the task that samples them."""

    def __init__(
        self,
        interval: float = INTERVAL,
        size: int = SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.size = size
        self._clock = clock
        self._failed = False  # sampling failed once already (logged with its traceback)
        self._started = clock()
        self.models: dict[str, ModelHistory] = {}

    def sample(
        self,
        metrics: Metrics,
        models: Mapping[str, Any],
        now: float | None = None,
        wall: float | None = None,
    ) -> None:
        """Append one point per model from what the server keeps: its request counters
        (``metrics``) and its ``models`` (cheap: no request waits)."""
        now = self._clock() if now is None else now
        wall = time.time() if wall is None else wall
        by_model: dict[str, dict[int, int]] = {}
        for (model, code), n in metrics.requests.items():
            by_model.setdefault(model, {})[code] = n
        for name, served in models.items():
            stats = served.pool.stats()
            history = self.models.get(name)
            if history is None:
                history = self.models[name] = ModelHistory(self._started, self.size)
            history.observe(
                now=now,
                wall=wall,
                requests=by_model.get(name, {}),
                recent=served.recent,
                queued=stats["queued"],
                in_flight=stats["in_flight"],
                states=[w.state for w in stats["workers"]],
                exit_reasons=stats["exit_reasons"],
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "interval_s": self.interval,
            "window_s": self.interval * self.size,
            "now": round(time.time(), 3),
            "models": [{"name": name, **h.columns()} for name, h in self.models.items()],
        }

    async def run(self, source: Source) -> None:
        """Sample every ``interval`` until cancelled, on a fixed schedule (no drift);
        ``source()`` gives the counters and models to sample."""
        due = self._clock()
        while True:
            due += self.interval
            await asyncio.sleep(max(0.0, due - self._clock()))
            if self._clock() - due > self.interval:  # the loop was held up: skip, don't burst
                due = self._clock()
            try:
                self.sample(*source())
            except Exception:  # never let a sampling bug take the charts (or more) down
                # the first time with its traceback; then quietly, not once a second
                level = logging.DEBUG if self._failed else logging.ERROR
                self._failed = True
                log.log(level, "bug: sampling the status page's history failed", exc_info=True)

    def sampler(self, source: Source) -> Callable[[web.Application], AsyncIterator[None]]:
        """For ``app.cleanup_ctx``: sample ``source()`` while the application runs."""

        async def context(app: web.Application) -> AsyncIterator[None]:
            task = asyncio.create_task(self.run(source))
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        return context


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)
