"""Models loaded and unloaded while the server runs: Triton's model repository extension.

``POST /v2/repository/models/{name}/load`` starts a model: one the configuration names, or
one the request describes (``{"parameters": {"config": ...}}``, the model's settings as in the
YAML file: a JSON object, or Triton's JSON string). A model already loaded is reloaded: a new
pool starts beside the old one, requests move to it once its workers are ready, and the old
one drains (``drain_timeout``) and stops; a new pool that fails to load leaves the old one
serving, and the answer says why. ``.../unload`` takes a model out: later requests get 404
saying so, and its pool drains and stops. ``POST /v2/repository/index`` lists every model the
server knows, loaded or not, with its state (READY, LOADING, UNAVAILABLE with the reason).

One load or unload runs at a time (another is refused with 409, saying what is running).
Admin-only when authentication is on. With ``server.fronts`` > 1 the fronts each hold their
share of every model's workers, and changing them is not supported yet (409, saying so).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Protocol

from aiohttp import web

from modelpool._exceptions import ConfigError
from modelpool.config import Config, ModelSettings

from ._errors import HTTPError
from ._served import ServedModel

__all__ = ["Repository", "read_config"]

log = logging.getLogger("modelpool.server")

UNLOADED = "unloaded by a request to /v2/repository/models/{name}/unload"


class Host(Protocol):
    """What the repository needs of the server (``_app.Server``)."""

    config: Config
    models: dict[str, ServedModel]

    def make_served(self, name: str, settings: ModelSettings) -> ServedModel: ...


class Repository:
    """The models of ``server`` that come and go (module docstring)."""

    def __init__(self, server: Host, fronts: int) -> None:
        self.server = server
        self.fronts = fronts
        self.unloaded: dict[str, tuple[ModelSettings, str]] = {}  # name -> (settings, why)
        self.loading: dict[str, ServedModel] = {}  # pools starting (stopped at shutdown)
        self.busy: str | None = None  # what runs now ("loading 'x'"), or None
        self.failed: dict[str, str] = {}  # name -> why its last load failed (still served)
        self._lock = asyncio.Lock()  # one change at a time

    # ------------------------------------------------------------------ the index

    def entries(self) -> list[dict[str, Any]]:
        """The index entries of the models that are not served now."""
        out = [
            {"name": n, "version": s.version, "state": "UNAVAILABLE", "reason": why}
            for n, (s, why) in self.unloaded.items()
            if n not in self.server.models
        ]
        out += [
            {"name": n, "version": m.version, "state": "LOADING"}
            for n, m in self.loading.items()
            if n not in self.server.models
        ]
        return out

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
        await self.load_model(name, await _config_of(request, name))
        return web.json_response({})

    async def unload(self, request: web.Request) -> web.Response:
        await self.unload_model(request.match_info["name"])
        return web.json_response({})

    async def load_model(self, name: str, given: dict[str, Any] | None) -> None:
        """Load (or reload) ``name``, with the settings ``given``, else those it has; raises
        ``HTTPError`` saying why it did not."""
        self._changeable(name)
        settings = self._settings(name, given)
        async with self._turn(f"loading {name!r}"):
            await self._load(name, settings)

    async def unload_model(self, name: str) -> None:
        """Take ``name`` out; its requests in flight finish. Raises ``HTTPError``."""
        self._changeable(name)
        async with self._turn(f"unloading {name!r}"):
            await self._unload(name)

    async def reconcile(self, new: Config) -> str:
        """Serve the models of a re-read configuration (``SIGHUP``): a model that is new or
        whose settings changed is loaded (beside the old one), one no longer there is
        unloaded, the others are not touched. Waits for a change that runs. A summary."""
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

    async def _load(self, name: str, settings: ModelSettings) -> None:
        served = self.server.make_served(name, settings)
        self.loading[name] = served
        started = time.monotonic()
        try:
            await asyncio.to_thread(served.pool.start)
        except Exception as exc:
            del self.loading[name]
            await asyncio.to_thread(served.pool.shutdown, wait=True)
            kept = name in self.server.models
            keeps = " (the model already loaded keeps serving)" if kept else ""
            log.error("model %r could not be loaded%s: %s", name, keeps, exc)
            self.failed[name] = f"its last load failed: {exc}"
            if not kept:
                self.unloaded[name] = (settings, self.failed[name])
            raise HTTPError(400, f"model {name!r} could not be loaded{keeps}: {exc}") from None
        served.last_ok = time.monotonic()
        served.attach(asyncio.get_running_loop())
        old = self.server.models.get(name)
        self.server.models[name] = served  # requests go to the new pool from now on
        self.unloaded.pop(name, None)
        self.failed.pop(name, None)
        del self.loading[name]
        log.info("model %r loaded in %.1f s", name, time.monotonic() - started)
        if old is not None:
            await self._retire(old)

    async def _unload(self, name: str) -> None:
        served = self.server.models.get(name)
        if served is None:
            raise self.not_loaded(name) or HTTPError(404, f"unknown model {name!r}")
        del self.server.models[name]  # later requests: 404, saying it was unloaded
        self.unloaded[name] = (served.settings, UNLOADED)
        await self._retire(served)
        log.info("model %r unloaded", name)

    async def _retire(self, served: ServedModel) -> None:
        """Let ``served``'s requests finish (``drain_timeout``), then stop its workers."""
        served.detach()
        await asyncio.to_thread(served.pool.shutdown, wait=True)

    # ------------------------------------------------------------------ helpers

    def _changeable(self, name: str) -> None:
        if self.fronts > 1:
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
            if name in self.server.models:
                return self.server.models[name].settings
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


async def _config_of(request: web.Request, name: str) -> dict[str, Any] | None:
    """The model settings a load request carries (``parameters.config``), or None."""
    body = await request.read()
    if not body.strip():
        return None
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise HTTPError(400, f"the load request is not JSON: {exc}") from None
    parameters = doc.get("parameters") if isinstance(doc, dict) else None
    if parameters is None:
        return None
    return read_config(parameters.get("config") if isinstance(parameters, dict) else None, name)


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
