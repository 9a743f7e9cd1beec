"""What the front processes of one server share: each publishes its state, every one answers
for the whole server.

With ``server.fronts`` > 1 (``_fronts``), several processes serve the same port, each with its
share of every model's workers, and a request for ``/metrics``, readiness,
``/v2/repository/index`` or the status page may land on any of them. Each front writes a
snapshot of its state to a file in a directory the fronts share (every ``PUBLISH_INTERVAL``
seconds, written to a temporary name and renamed, so a reader never sees half of one), and
answers those endpoints from its own live state merged with the other fronts' snapshots:

* workers, queue depth, requests in flight, worker exits and batch sizes: the sum of the live
  fronts' (a front whose process is gone, or whose snapshot is older than ``STALE_AFTER``
  seconds, serves nothing, so it counts for nothing);
* readiness: ready when every live front is ready for the model and, together, they keep at
  least the configured ``min_ready_workers`` alive; the reason names the front that is not;
* request counters and latency histograms: the sum over every front slot, live or not,
  because counters must never go down; a front started in the place of one that died
  continues its slot's counters from its last snapshot.

Readers never block writers: a snapshot is one small JSON file, read whole.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import types
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from ._metrics import Metrics

if TYPE_CHECKING:
    from ._served import ServedModel

__all__ = ["PUBLISH_INTERVAL", "STALE_AFTER", "FrontShare", "MergedModel", "worker_json"]

#: seconds between two snapshots of one front
PUBLISH_INTERVAL = 0.5
#: a snapshot older than this (seconds) is a front that stopped answering: not counted live
STALE_AFTER = 5.0
#: latencies per model a snapshot carries for the status page's percentiles
RECENT_SHARED = 500


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FrontShare:
    """This front's place among the server's fronts (``index`` of ``count``), and the
    directory their snapshots live in."""

    def __init__(self, directory: str, index: int, count: int, min_ready: Mapping[str, int]):
        self.directory = directory
        self.index = index
        self.count = count
        self.min_ready = dict(min_ready)  # the configured min_ready_workers, for the server
        #: the generation of the fronts' models this front serves, and how its last change
        #: went: model -> why it failed ("" when it did not) (``_cluster``)
        self.generation = 0
        self.outcome: dict[str, str] = {}

    def path(self, index: int) -> str:
        return os.path.join(self.directory, f"front-{index}.json")

    def previous_metrics(self) -> Metrics:
        """The counters this slot's last front published (it died; continue from there)."""
        snapshot = self._read(self.index)
        if snapshot is None:
            return Metrics()
        return Metrics.from_json(snapshot.get("metrics") or {})

    def publish(
        self,
        models: Mapping[str, ServedModel],
        metrics: Metrics,
        window: float,
        accepting: bool,
        listening: bool,
        other_versions: Mapping[str, Mapping[str, ServedModel]] | None = None,
    ) -> None:
        """Write this front's snapshot (``listening``: it takes connections; ``models``: each
        model's default version, ``other_versions``: name -> version -> the others)."""
        snapshot: dict[str, Any] = {
            "index": self.index,
            "pid": os.getpid(),
            "time": time.time(),
            "accepting": accepting,
            "listening": listening,
            "metrics": metrics.to_json(),
            "generation": self.generation,
            "outcome": self.outcome,
            "models": {name: self._entry(served, window) for name, served in models.items()},
            "versions": {
                name: {v: self._entry(served, window) for v, served in versions.items()}
                for name, versions in (other_versions or {}).items()
            },
        }
        data = orjson.dumps(snapshot)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".front-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path(self.index))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _entry(self, served: ServedModel, window: float) -> dict[str, Any]:
        stats = served.pool.stats()
        ready, why = served.readiness(window, stats)
        return {
            "ready": ready,
            "why": why,
            "alive": served.alive(stats),
            "queued": stats["queued"],
            "in_flight": stats["in_flight"],
            "exit_reasons": dict(stats["exit_reasons"]),
            "batch_sizes": {str(k): v for k, v in stats.get("batch_sizes", {}).items()},
            "workers": [worker_json(w, self.index) for w in stats["workers"]],
            "recent": list(served.recent)[-RECENT_SHARED:],
        }

    def _read(self, index: int) -> dict[str, Any] | None:
        try:
            with open(self.path(index), "rb") as f:
                snapshot: dict[str, Any] = orjson.loads(f.read())
        except (OSError, orjson.JSONDecodeError):
            return None
        return snapshot

    def others(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The other fronts' snapshots: (the live ones that take connections, every one that
        exists). A front that is loading, or is gone, takes none: it counts for nothing."""
        live, every = [], []
        for index in range(self.count):
            if index == self.index:
                continue
            snapshot = self._read(index)
            if snapshot is None:
                continue
            every.append(snapshot)
            if self._serving(snapshot):
                live.append(snapshot)
        return live, every

    @staticmethod
    def _serving(snapshot: dict[str, Any]) -> bool:
        fresh = time.time() - float(snapshot.get("time", 0)) < STALE_AFTER
        return fresh and bool(snapshot.get("listening")) and _alive(int(snapshot.get("pid", 0)))

    def applied(self, index: int) -> tuple[int, dict[str, str]] | None:
        """(the generation of the models front ``index`` serves, how its last change went),
        or None when it does not serve (loading, or gone)."""
        snapshot = self._read(index)
        if snapshot is None or not self._serving(snapshot):
            return None
        return int(snapshot.get("generation", 0)), dict(snapshot.get("outcome") or {})

    def listening(self, index: int) -> bool:
        """Whether front ``index`` is up and takes connections."""
        snapshot = self._read(index)
        return snapshot is not None and self._serving(snapshot)

    # ------------------------------------------------------------------ the merged view

    def merged_metrics(self, own: Metrics, every: list[dict[str, Any]]) -> Metrics:
        merged = Metrics.from_json(own.to_json())
        for snapshot in every:
            merged.add_json(snapshot.get("metrics") or {})
        return merged

    def merged_models(
        self, models: Mapping[str, ServedModel], live: list[dict[str, Any]]
    ) -> dict[str, MergedModel]:
        """Each model's default version, merged over this front and the ``live`` others."""
        return {
            name: MergedModel(
                served,
                self.index,
                [(s["index"], s["models"].get(name)) for s in live],
                self.min_ready.get(name, 1),
            )
            for name, served in models.items()
        }

    def merged_versions(
        self, versions: Mapping[str, Mapping[str, ServedModel]], live: list[dict[str, Any]]
    ) -> dict[str, dict[str, MergedModel]]:
        """The other versions (name -> version -> this front's), merged the same way."""
        return {
            name: {
                v: MergedModel(
                    served,
                    self.index,
                    [(s["index"], (s.get("versions") or {}).get(name, {}).get(v)) for s in live],
                    self.min_ready.get(name, 1),
                )
                for v, served in by_version.items()
            }
            for name, by_version in versions.items()
        }


def worker_json(w: Any, front: int) -> dict[str, Any]:
    """One worker's stats as the status page and the other fronts read them."""
    return {
        "front": front,
        "index": w.index,
        "pid": w.pid,
        "state": w.state,
        "served": w.served,
        "restarts": w.restarts,
        "rss": w.rss,
        "busy_for": w.busy_for,
        "last_exit": w.last_exit,
    }


class _MergedPool:
    """``stats()`` of one model over every live front (what the endpoints read of a pool)."""

    def __init__(self, stats: dict[str, Any]) -> None:
        self._stats = stats

    def stats(self) -> dict[str, Any]:
        return self._stats


class MergedModel:
    """One model as the whole server serves it: the attributes of ``ServedModel`` that the
    endpoints, the status page and its history read, merged over the live fronts."""

    def __init__(
        self,
        served: ServedModel,
        index: int,
        others: list[tuple[int, dict[str, Any] | None]],
        min_ready: int,
    ) -> None:
        """``others``: (front index, what that front published of this model or None)."""
        self.name = served.name
        self.version = served.version
        self.settings = served.settings
        self.inputs, self.outputs = served.inputs, served.outputs
        self._served = served
        self._others = others
        self._min_ready = min_ready
        own = served.pool.stats()
        self._own_alive = served.alive(own)  # (read once: readiness asks for it again)
        workers = [types.SimpleNamespace(**worker_json(w, index)) for w in own["workers"]]
        exits: Counter[str] = Counter(own["exit_reasons"])
        batches: Counter[int] = Counter(own.get("batch_sizes", {}))
        queued, in_flight = own["queued"], own["in_flight"]
        recent = list(served.recent)[-RECENT_SHARED:]
        for _, other in self._others:
            if other is None:
                continue
            workers += [types.SimpleNamespace(**w) for w in other["workers"]]
            exits.update(other["exit_reasons"])
            batches.update({int(k): v for k, v in other["batch_sizes"].items()})
            queued += other["queued"]
            in_flight += other["in_flight"]
            recent += other["recent"]
        self.recent = recent
        self.pool = _MergedPool(
            {
                "workers": workers,
                "queued": queued,
                "in_flight": in_flight,
                "exit_reasons": dict(exits),
                "batch_sizes": dict(sorted(batches.items())),
            }
        )

    def alive(self, stats: dict[str, Any] | None = None) -> int:
        return self._own_alive + sum(
            int(other["alive"]) for _, other in self._others if other is not None
        )

    def readiness(self, window: float, stats: dict[str, Any] | None = None) -> tuple[bool, str]:
        """Ready when this front and every other live one is, with enough workers alive."""
        ok, why = self._served.readiness(window)
        if not ok:
            return False, why
        for index, other in self._others:
            if other is None:
                return False, f"front {index} does not serve model {self.name!r}"
            if not other["ready"]:
                return False, f"front {index}: {other['why']}"
        alive = self.alive()
        if alive < self._min_ready:
            return (
                False,
                f"model {self.name!r}: {alive} of {self._min_ready} required workers alive",
            )
        return True, ""
