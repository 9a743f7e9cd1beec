"""Models that come and go on a server with several fronts (``server.fronts`` > 1).

Each front holds its share of every model's workers (``_fronts``), so a load, an unload, a
switch of versions or a ``SIGHUP`` must change every front, and the server must answer only
once they all have. The fronts share a directory; in it:

* ``models.json``: the models the whole server should serve (each one's settings, as in the
  file), with a ``generation`` number raised by each change, the models to restart even if
  their settings did not change (``force``: a plain load, ``--reload`` of edited code) and the
  source files to import again first (``reimport``);
* ``repository.lock``: held (``flock``) by whoever changes ``models.json``: one change at a time
  across the fronts (a load while another runs is refused with 409; a ``SIGHUP`` waits).

A change: take the lock, write the new ``models.json``, have every front told (``SIGUSR1``, sent
on by the manager), and wait until each front that serves has applied that generation (its
snapshot, ``_shared``, says which generation it applied and how each model fared). Each front
applies a generation as a single server applies a change (``_repository``): its share of the
changed models' workers start beside the old ones, requests move when they are ready, the old
ones drain. If any front could not load a model, the change is undone on every front (the
previous settings are applied again, as a new generation), so the fronts never serve different
settings for long, and the answer says which front failed and why. A front started later (one
that replaces a front that died) starts from ``models.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from modelpool._exceptions import ConfigError
from modelpool.config import Config, ModelSettings

from ._errors import HTTPError

__all__ = ["Cluster", "Desired", "FrontChanges", "config_of", "dump", "read_base", "read_desired"]

log = logging.getLogger("modelpool.server")

DESIRED = "models.json"
LOCK = "repository.lock"
#: how often a change looks at the fronts' snapshots while it waits for them
POLL = 0.05
#: a change that no front finishes within this long is given up on (each front's own loads
#: are bounded by setup_timeout, its retirements by drain_timeout)
PATIENCE = 900.0


@dataclass
class Desired:
    """What ``models.json`` holds (module docstring)."""

    generation: int
    models: dict[str, dict[str, Any]]
    force: list[str] = field(default_factory=list)
    reimport: list[str] = field(default_factory=list)
    #: the settings of the models unloaded (a plain load brings them back)
    unloaded: dict[str, dict[str, Any]] = field(default_factory=dict)


def read_base(directory: str) -> Config:
    """The whole server's configuration, as the manager wrote it for the fronts."""
    with open(os.path.join(directory, "config.json"), "rb") as f:
        return Config.from_mapping(orjson.loads(f.read()), "the fronts' configuration")


def dump(settings: ModelSettings) -> dict[str, Any]:
    dumped: dict[str, Any] = settings.model_dump(mode="json", exclude_unset=True)
    return dumped


def read_desired(directory: str, base: Config | None = None) -> Desired:
    """``models.json``; before the first change, the models of the configuration."""
    try:
        with open(os.path.join(directory, DESIRED), "rb") as f:
            doc = orjson.loads(f.read())
    except FileNotFoundError:
        base = base or read_base(directory)
        return Desired(0, {name: dump(m) for name, m in base.models.items()})
    return Desired(**doc)


def _write_desired(directory: str, desired: Desired) -> None:
    data = orjson.dumps(desired.__dict__)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".models-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(directory, DESIRED))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def config_of(base: Config, models: dict[str, dict[str, Any]], source: str) -> Config:
    """``base`` serving ``models`` (settings as JSON), validated (``ConfigError``)."""
    rest = base.model_dump(exclude={"models"}, exclude_none=True)
    return Config.from_mapping({**rest, "models": models}, source)


class Snapshots(Protocol):
    """What a change reads of the fronts (``_shared.FrontShare``)."""

    count: int

    def applied(self, index: int) -> tuple[int, dict[str, str]] | None: ...


class Cluster:
    """Changes to the models of every front (module docstring): used by the front that got
    a request to change them, and by the manager for ``SIGHUP``."""

    def __init__(self, directory: str, snapshots: Snapshots, notify: Callable[[], None]):
        self.directory = directory
        self.snapshots = snapshots
        self.notify = notify  # tells every front that models.json changed
        self.base = read_base(directory)

    @contextlib.contextmanager
    def turn(self, wait: bool, what: str = "") -> Iterator[None]:
        """The lock on the fronts' models; without ``wait``, 409 when it is taken."""
        with open(os.path.join(self.directory, LOCK), "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                f.seek(0)
                busy = f.read().strip() or "changing the models"
                raise HTTPError(
                    409, f"the repository is busy {busy}; retry when that has finished"
                ) from None
            try:
                f.truncate(0)
                f.write(what)
                f.flush()
                yield
            finally:
                f.truncate(0)
                fcntl.flock(f, fcntl.LOCK_UN)

    def change(
        self,
        models: dict[str, dict[str, Any]],
        force: list[str] | None = None,
        reimport: list[str] | None = None,
    ) -> dict[int, dict[str, str]]:
        """Have every front serve ``models`` (the lock held); each serving front's outcome
        (model -> why it failed, "" when it did not)."""
        now = read_desired(self.directory, self.base)
        generation = now.generation + 1
        unloaded = {n: s for n, s in now.unloaded.items() if n not in models}
        unloaded |= {n: s for n, s in now.models.items() if n not in models}
        desired = Desired(generation, models, force or [], reimport or [], unloaded)
        _write_desired(self.directory, desired)
        self.notify()
        deadline = time.monotonic() + PATIENCE
        outcomes: dict[int, dict[str, str]] = {}
        while len(outcomes) < self.snapshots.count:
            outcomes.clear()
            for index in range(self.snapshots.count):
                seen = self.snapshots.applied(index)
                if seen is None:  # not serving: it starts from models.json
                    outcomes[index] = {}
                elif seen[0] >= generation:
                    outcomes[index] = seen[1]
            if len(outcomes) < self.snapshots.count:
                if time.monotonic() > deadline:
                    raise HTTPError(504, f"the fronts did not apply the change in {PATIENCE} s")
                time.sleep(POLL)
        return outcomes

    def change_or_undo(
        self,
        before: dict[str, dict[str, Any]],
        after: dict[str, dict[str, Any]],
        force: list[str] | None = None,
        reimport: list[str] | None = None,
    ) -> dict[str, str]:
        """``change`` to ``after``; when a front could not load a model, every front goes
        back to ``before``. The failures: model -> "front N: why"."""
        outcomes = self.change(after, force, reimport)
        failed = {
            name: f"{why} (front {index})"
            for index, outcome in sorted(outcomes.items(), reverse=True)
            for name, why in outcome.items()
            if why
        }
        if failed:
            log.error("undoing a change no front may keep: %s", "; ".join(failed.values()))
            self.change(before)
        return failed

    # ------------------------------------------------------------------ the requests

    def load_model(
        self,
        name: str,
        given: dict[str, Any] | None,
        default_version: str | None,
        with_default: Callable[[ModelSettings, str], ModelSettings],
        reimport: tuple[str, ...] = (),
    ) -> None:
        """``Repository.load_model`` on every front (runs in a thread: it waits)."""
        with self.turn(wait=False, what=f"loading {name!r}"):
            now = read_desired(self.directory, self.base)
            before = now.models
            after = dict(before)
            if given is not None:
                after[name] = given
            elif name in now.unloaded:
                after[name] = now.unloaded[name]
            elif name in self.base.models:
                after[name] = dump(self.base.models[name])
            elif name not in before:
                raise HTTPError(
                    404,
                    f"no model named {name!r} is configured; send its settings in the body: "
                    '{"parameters": {"config": {"model": "package.module:Class", ...}}}',
                )
            if default_version is not None:
                settings = self._settings(after, name)
                after[name] = dump(with_default(settings, default_version))
            else:
                self._settings(after, name)  # (checked before any front is told)
            restart = given is None and default_version is None and name in before
            force = [name] if restart else []
            failed = self.change_or_undo(before, after, force, list(reimport))
        if name in failed:
            raise HTTPError(400, failed[name])

    def unload_model(
        self,
        name: str,
        version: str | None,
        without: Callable[[ModelSettings, str], ModelSettings],
    ) -> None:
        """``Repository.unload_model`` on every front."""
        with self.turn(wait=False, what=f"unloading {name!r}"):
            before = read_desired(self.directory, self.base).models
            if name not in before:
                raise HTTPError(404, f"model {name!r} is not loaded")
            after = dict(before)
            settings = self._settings(before, name)
            if version is None or list(settings.expand()) == [version]:
                del after[name]
            else:
                after[name] = dump(without(settings, version))
            self.change(after)

    def _settings(self, models: dict[str, dict[str, Any]], name: str) -> ModelSettings:
        try:
            return config_of(self.base, {name: models[name]}, "the load request").models[name]
        except ConfigError as exc:
            raise HTTPError(400, str(exc)) from None


class Local(Protocol):
    """What a front's changes need of its repository (``_repository.Repository``)."""

    async def apply(self, config: Config, force: set[str]) -> dict[str, str]: ...


class FrontChanges:
    """A front's side of a change: apply each new generation of ``models.json``."""

    def __init__(
        self,
        directory: str,
        index: int,
        count: int,
        repository: Local,
        reimport: Callable[[str], bool],
        done: Callable[[int, dict[str, str], Config], None],
        applied: int,
    ) -> None:
        self.directory, self.index, self.count = directory, index, count
        self.repository = repository
        self.reimport = reimport  # imports a source file again (``_watch``)
        self.done = done  # (generation, outcome, the whole config): publish it
        self.base = read_base(directory)
        self.applied = applied  # the generation this front serves
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def poke(self) -> None:
        """``models.json`` may have changed (``SIGUSR1``): apply it (after the one running)."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.ensure_future(self._apply())

    async def _apply(self) -> None:
        while True:
            self._again = False
            desired = read_desired(self.directory, self.base)
            if desired.generation > self.applied:
                try:
                    await self._apply_one(desired)
                except Exception:  # a bug: say so, and let the change's waiter see it
                    log.exception(
                        "could not apply generation %d of models.json", desired.generation
                    )
                    self.applied = desired.generation
                    self.done(desired.generation, {"*": "internal error (see its log)"}, self.base)
            if not self._again:
                return

    async def _apply_one(self, desired: Desired) -> None:
        for path in desired.reimport:
            self.reimport(path)
        whole = config_of(self.base, desired.models, "models.json")
        mine = whole.for_front(self.index, self.count)
        outcome = await self.repository.apply(mine, set(desired.force))
        self.applied = desired.generation
        self.done(desired.generation, outcome, whole)
