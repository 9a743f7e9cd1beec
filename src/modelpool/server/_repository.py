"""Models loaded and unloaded while the server runs: Triton's model repository extension.

``POST /v2/repository/models/{name}/load`` starts a model: one the configuration names, or
one the request describes (``{"parameters": {"config": ...}}``, the model's settings as in the
YAML file: a JSON object, or Triton's JSON string). A model already loaded is reloaded: a new
pool starts beside the old one, requests move to it once its workers are ready, and the old
one drains (``drain_timeout``) and stops; a new pool that fails to load leaves the old one
serving, and the answer says why. ``.../unload`` takes a model out: later requests get 404
saying so, and its pool drains and stops. ``POST /v2/repository/index`` lists every model the
server knows, loaded or not, with its state (READY, LOADING, UNAVAILABLE with the reason).

A model may serve several versions (``versions:``), each its own pool; unversioned requests
go to its default version. A load with a config starts only the versions that are new or
changed (the others keep their workers), ``parameters.default_version`` alone switches the
default with no restart, and an unload with ``parameters.version`` takes one version out.

One load or unload runs at a time (another is refused with 409, saying what is running).
Admin-only when authentication is on. With ``server.fronts`` > 1 a change goes to every front
(``cluster``, ``_cluster``), and each front applies its share here (``apply``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from modelpool._exceptions import ConfigError
from modelpool.config import Config, ModelSettings

from ._errors import HTTPError
from ._served import ServedModel

if TYPE_CHECKING:
    from ._cluster import Cluster

__all__ = ["Repository", "read_config"]

log = logging.getLogger("modelpool.server")

UNLOADED = "unloaded by a request to /v2/repository/models/{name}/unload"


class Host(Protocol):
    """What the repository needs of the server (``_app.Server``)."""

    config: Config
    models: dict[str, ServedModel]
    versions: dict[str, dict[str, ServedModel]]

    def make_served(self, name: str, settings: ModelSettings) -> ServedModel: ...

    def serve(self, name: str, versions: dict[str, ServedModel], default: str) -> None: ...

    def drop(self, name: str) -> None: ...

    def version_list(self, name: str) -> list[str]: ...


class Repository:
    """The models of ``server`` that come and go (module docstring)."""

    def __init__(self, server: Host, fronts: int) -> None:
        self.server = server
        self.fronts = fronts
        #: each served model's settings (every version; a later plain load reuses them)
        self.settings: dict[str, ModelSettings] = dict(server.config.models)
        self.unloaded: dict[str, tuple[ModelSettings, str]] = {}  # name -> (settings, why)
        self.loading: dict[str, list[ServedModel]] = {}  # pools starting (stopped at shutdown)
        self.busy: str | None = None  # what runs now ("loading 'x'"), or None
        self.failed: dict[str, str] = {}  # name -> why its last load failed (still served)
        self._lock = asyncio.Lock()  # one change at a time
        #: with several fronts: changes go to every front through it (``_cluster``)
        self.cluster: Cluster | None = None

    # ------------------------------------------------------------------ the index

    def entries(self) -> list[dict[str, Any]]:
        """The index entries of the models that are not served now."""
        out = [
            {"name": n, "version": s.served_version, "state": "UNAVAILABLE", "reason": why}
            for n, (s, why) in self.unloaded.items()
            if n not in self.server.models
        ]
        out += [
            {"name": n, "version": m.version, "state": "LOADING"}
            for n, starting in self.loading.items()
            for m in starting
            if m.version not in self.server.versions.get(n, {})
        ]
        return out

    def starting(self) -> list[ServedModel]:
        """The pools being started now."""
        return [m for starting in self.loading.values() for m in starting]

    def not_loaded(self, name: str) -> HTTPError | None:
        """Why ``name`` is not served, when it is a model this server knows: 503 while it
        loads (retry), 404 when it is unloaded."""
        if name in self.loading:
            return HTTPError(
                503,
                f"model {name!r} is loading; retry when the repository index says READY",
                retry_after=1,
            )
        if name in self.unloaded:
            return HTTPError(
                404,
                f"model {name!r} is not loaded ({self.unloaded[name][1].format(name=name)}); "
                f"load it with POST /v2/repository/models/{name}/load",
            )
        return None

    # ------------------------------------------------------------------ the routes

    async def load(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self._changeable(name)
        parameters = await _parameters_of(request)
        given = read_config(parameters.get("config"), name)
        await self.load_model(name, given, _text(parameters, "default_version"))
        return web.json_response({})

    async def unload(self, request: web.Request) -> web.Response:
        parameters = await _parameters_of(request)
        await self.unload_model(request.match_info["name"], _text(parameters, "version"))
        return web.json_response({})

    async def load_model(
        self,
        name: str,
        given: dict[str, Any] | None,
        default_version: str | None = None,
        reimport: tuple[str, ...] = (),
    ) -> None:
        """Load (or reload) ``name``, with the settings ``given``, else those it has; raises
        ``HTTPError`` saying why it did not. ``given`` (or a change of ``default_version``
        alone) starts only the versions that are new or changed; a plain load restarts every
        version. ``default_version`` alone, of a loaded model, moves its unversioned
        requests to that version (no worker restarts). (``reimport``: source files that
        other fronts import again first.)"""
        self._changeable(name)
        if self.cluster is not None:
            cluster = self.cluster
            await asyncio.to_thread(
                cluster.load_model, name, given, default_version, _with_default, reimport
            )
            return
        if given is None and default_version is not None and name in self.server.models:
            async with self._turn(f"switching {name!r} to version {default_version!r}"):
                self._switch(name, default_version)
            return
        settings = self._settings(name, given)
        if default_version is not None:
            settings = _with_default(settings, default_version)
        async with self._turn(f"loading {name!r}"):
            await self._load(name, settings, force=given is None)

    async def unload_model(self, name: str, version: str | None = None) -> None:
        """Take ``name`` (or only its ``version``) out; its requests in flight finish.
        Raises ``HTTPError``."""
        self._changeable(name)
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.unload_model, name, version, _without)
            return
        what = f"{name!r}" if version is None else f"version {version!r} of {name!r}"
        async with self._turn(f"unloading {what}"):
            if version is None or self.server.version_list(name) == [version]:
                await self._unload(name)
            else:
                await self._unload_version(name, version)

    async def reconcile(self, new: Config) -> str:
        """Serve the models of a re-read configuration (``SIGHUP``): a model that is new or
        whose settings changed is loaded (beside the old one; only its new or changed
        versions start), one no longer there is unloaded, the others are not touched. Waits
        for a change that runs. A summary."""
        self._changeable("")
        old = self.server.config
        async with self._lock:
            self.busy = "reloading the configuration"
            try:
                done = []
                for name, settings in new.models.items():
                    if old.models.get(name) == settings:
                        continue
                    try:
                        await self._load(name, settings)
                        done.append(f"{name} loaded")
                    except HTTPError as exc:
                        done.append(f"{name} NOT loaded ({exc})")
                for name in old.models:
                    if name not in new.models and name in self.server.models:
                        await self._unload(name)
                        done.append(f"{name} unloaded")
                self.server.config = new
            finally:
                self.busy = None
        kept = sum(1 for n, m in new.models.items() if old.models.get(n) == m)
        return f"{'; '.join(done) or 'no model changed'} ({kept} unchanged)"

    async def apply(self, config: Config, force: set[str]) -> dict[str, str]:
        """Serve ``config``'s models (this front's share of a change to every front,
        ``_cluster``): a model that is new, changed or in ``force`` is loaded, one not there
        is unloaded, the others are not touched. Each changed model -> why it failed ("")."""
        outcome: dict[str, str] = {}
        async with self._lock:
            self.busy = "applying a change of the fronts' models"
            try:
                for name, settings in config.models.items():
                    same = self.settings.get(name) == settings and name in self.server.models
                    if same and name not in force:
                        continue
                    try:
                        await self._load(name, settings, force=name in force)
                        outcome[name] = ""
                    except HTTPError as exc:
                        outcome[name] = str(exc)
                for name in [n for n in self.server.models if n not in config.models]:
                    await self._unload(name)
                    outcome[name] = ""
                self.server.config = config
            finally:
                self.busy = None
        return outcome

    async def _load(self, name: str, settings: ModelSettings, force: bool = False) -> None:
        """Serve ``name`` as ``settings`` say: its new (or changed, or with ``force`` all)
        versions are started beside what serves; requests move once they are all ready;
        the pools replaced or no longer wanted then drain and stop. A failure changes
        nothing (what started is stopped) and raises ``HTTPError``."""
        wanted = settings.expand()
        current = self.server.versions.get(name, {})
        starting = {
            v: self.server.make_served(name, s)
            for v, s in wanted.items()
            if force or v not in current or current[v].settings != s
        }
        self.loading[name] = list(starting.values())
        started = time.monotonic()
        try:
            results = await asyncio.gather(
                *(asyncio.to_thread(m.pool.start) for m in starting.values()),
                return_exceptions=True,
            )
        finally:
            del self.loading[name]
        errors = [
            (v, r) for v, r in zip(starting, results, strict=True) if isinstance(r, BaseException)
        ]
        if errors:
            await asyncio.gather(
                *(asyncio.to_thread(m.pool.shutdown, wait=True) for m in starting.values())
            )
            kept = name in self.server.models
            keeps = " (the model already loaded keeps serving)" if kept else ""
            version, exc = errors[0]
            which = (
                f"version {version!r} of model {name!r}" if len(wanted) > 1 else f"model {name!r}"
            )
            log.error("%s could not be loaded%s: %s", which, keeps, exc)
            self.failed[name] = f"its last load failed: {exc}"
            if not kept:
                self.unloaded[name] = (settings, self.failed[name])
            raise HTTPError(400, f"{which} could not be loaded{keeps}: {exc}") from None
        loop = asyncio.get_running_loop()
        for m in starting.values():
            m.last_ok = time.monotonic()
            m.attach(loop)
        versions = {v: starting.get(v) or current[v] for v in wanted}
        self.server.serve(name, versions, settings.served_version)  # requests move now
        self.settings[name] = settings
        self.unloaded.pop(name, None)
        self.failed.pop(name, None)
        if starting:
            started_versions = ", ".join(starting)
            log.info(
                "model %r loaded in %.1f s (version %s); unversioned requests go to version %r",
                name,
                time.monotonic() - started,
                started_versions,
                settings.served_version,
            )
        retired = [m for v, m in current.items() if versions.get(v) is not m]
        await asyncio.gather(*(self._retire(m) for m in retired))

    def _switch(self, name: str, version: str) -> None:
        versions = self.server.versions[name]
        if version not in versions:
            have = ", ".join(repr(v) for v in self.server.version_list(name))
            raise HTTPError(
                404,
                f"model {name!r} has no version {version!r} loaded (it has {have}); load it "
                "first, with the model's settings in parameters.config (versions: ...)",
            )
        self.server.serve(name, versions, version)
        self.settings[name] = _with_default(self.settings[name], version)
        log.info("model %r: unversioned requests go to version %r now", name, version)

    async def _unload(self, name: str) -> None:
        versions = self.server.versions.get(name)
        if versions is None:
            raise self.not_loaded(name) or HTTPError(404, f"unknown model {name!r}")
        self.server.drop(name)  # later requests: 404, saying it was unloaded
        settings = self.settings.pop(name, None) or next(iter(versions.values())).settings
        self.unloaded[name] = (settings, UNLOADED)
        await asyncio.gather(*(self._retire(m) for m in versions.values()))
        log.info("model %r unloaded", name)

    async def _unload_version(self, name: str, version: str) -> None:
        versions = dict(self.server.versions.get(name) or {})
        if not versions:
            raise self.not_loaded(name) or HTTPError(404, f"unknown model {name!r}")
        if version not in versions:
            have = ", ".join(repr(v) for v in self.server.version_list(name))
            raise HTTPError(404, f"model {name!r} has no version {version!r}; it has {have}")
        default = self.server.models[name].version
        if version == default:
            raise HTTPError(
                409,
                f"version {version!r} is where {name!r}'s unversioned requests go; switch them "
                "to another version first (load with parameters.default_version), or unload the "
                "whole model",
            )
        served = versions.pop(version)
        self.server.serve(name, versions, default)
        self.settings[name] = _without(self.settings[name], version)
        await self._retire(served)
        log.info("version %r of model %r unloaded", version, name)

    async def _retire(self, served: ServedModel) -> None:
        """Let ``served``'s requests finish (``drain_timeout``), then stop its workers."""
        served.detach()
        await asyncio.to_thread(served.pool.shutdown, wait=True)

    # ------------------------------------------------------------------ helpers

    def _changeable(self, name: str) -> None:
        if self.fronts > 1 and self.cluster is None:
            raise HTTPError(
                409,
                f"this server runs {self.fronts} front processes, each with its share of the "
                "workers; loading and unloading models is not supported with server.fronts > 1 "
                "yet: restart the server with the new configuration",
            )

    def _turn(self, what: str) -> _Turn:
        if self._lock.locked():
            raise HTTPError(
                409, f"the repository is busy {self.busy}; retry when that has finished"
            )
        return _Turn(self, what)

    def _settings(self, name: str, given: dict[str, Any] | None) -> ModelSettings:
        """The settings to load ``name`` with: ``given`` (a request's config), else the ones
        it was configured (or last loaded) with."""
        if given is None:
            if name in self.settings:
                return self.settings[name]
            if name in self.unloaded:
                return self.unloaded[name][0]
            if name in self.server.config.models:
                return self.server.config.models[name]
            raise HTTPError(
                404,
                f"no model named {name!r} is configured; send its settings in the body: "
                '{"parameters": {"config": {"model": "package.module:Class", ...}}}',
            )
        rest = self.server.config.model_dump(exclude={"models"}, exclude_none=True)
        try:
            config = Config.from_mapping({**rest, "models": {name: given}}, "the load request")
        except ConfigError as exc:
            raise HTTPError(400, str(exc)) from None
        return config.models[name]


def _with_default(settings: ModelSettings, version: str) -> ModelSettings:
    """``settings`` with unversioned requests going to ``version`` (400 if it has none)."""
    data = settings.model_dump(exclude_unset=True) | {"default_version": version}
    try:
        return type(settings).model_validate(data)
    except ValueError as exc:  # (pydantic's ValidationError is one)
        raise HTTPError(
            400, f"default_version {version!r}: not a version of this model ({exc})"
        ) from None


def _without(settings: ModelSettings, version: str) -> ModelSettings:
    """``settings`` without ``version`` (not its default one; 409 if it is)."""
    default = settings.served_version
    if version == default:
        raise HTTPError(
            409,
            f"version {version!r} is where unversioned requests go; switch them to another "
            "version first (load with parameters.default_version), or unload the whole model",
        )
    if version not in (settings.versions or {}):
        raise HTTPError(404, f"the model has no version {version!r}")
    data = settings.model_dump(exclude_unset=True)
    data["versions"] = {v: c for v, c in (settings.versions or {}).items() if v != version}
    return type(settings).model_validate(data | {"default_version": default})


class _Turn:
    """The repository's one change at a time."""

    def __init__(self, repository: Repository, what: str) -> None:
        self.repository, self.what = repository, what

    async def __aenter__(self) -> None:
        await self.repository._lock.acquire()
        self.repository.busy = self.what

    async def __aexit__(self, *exc: object) -> None:
        self.repository.busy = None
        self.repository._lock.release()


async def _parameters_of(request: web.Request) -> dict[str, Any]:
    """The ``parameters`` object of a load or unload request's body ({} when none)."""
    body = await request.read()
    if not body.strip():
        return {}
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise HTTPError(400, f"the request is not JSON: {exc}") from None
    parameters = doc.get("parameters") if isinstance(doc, dict) else None
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise HTTPError(400, "parameters must be a JSON object")
    return parameters


def _text(parameters: dict[str, Any], key: str) -> str | None:
    value = parameters.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # a version written as a number
    raise HTTPError(400, f"parameters.{key} must be a version name (a string)")


def read_config(config: Any, name: str) -> dict[str, Any] | None:
    """A load's ``config`` parameter as model settings (None: not given). Raises 400."""
    if config is None:
        return None
    if isinstance(config, str):  # Triton's clients send the config as a JSON string
        try:
            config = json.loads(config)
        except ValueError as exc:
            raise HTTPError(400, f"parameters.config is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise HTTPError(
            400,
            f"parameters.config of a load of {name!r} must be the model's settings, as a JSON "
            'object: {"model": "package.module:Class", "workers": 2, ...}',
        )
    return config
