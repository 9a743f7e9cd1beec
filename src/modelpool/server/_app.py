"""The aiohttp application: Open Inference Protocol (KServe v2 REST) routes, with Triton's
binary-tensor extension, ``/metrics`` and the status page.

Errors are JSON ``{"error": "..."}`` with the status the protocol expects: 400 bad request,
404 unknown model, 413 body too large (decided from Content-Length before reading), 503 not
ready or overloaded (with Retry-After), 504 timeout, 500 only for bugs (the model's included).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiohttp import HttpVersion11, web

from modelpool import __version__
from modelpool.config import Config, ModelSettings, version_order

from . import _auth, _history, _inference, _logging, _login, _repository, _status
from ._errors import HTTPError
from ._fastpath import FastPaths
from ._inference import JSON, SHUTTING_DOWN
from ._metrics import Metrics
from ._served import ServedModel
from ._shared import PUBLISH_INTERVAL, FrontShare

__all__ = ["SHUTTING_DOWN", "Server"]

log = logging.getLogger("modelpool.server")

#: a path made of plain URL segments (as sent, no percent-encoding; nothing aiohttp's route
#: syntax reads as a pattern)
_SEGMENTS = re.compile(r"(/[A-Za-z0-9_.~-]+)+")


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, headers={"Content-Type": JSON, **(headers or {})}
    )


class Server:
    """The HTTP front of a set of pools, built from a ``Config``."""

    def __init__(
        self,
        config: Config,
        models: dict[str, ServedModel] | None = None,
        share: FrontShare | None = None,
    ) -> None:
        self.config = config
        self.share = share  # one of several front processes (``_shared``), or None
        self.settings = config.server
        #: every model's served versions (version -> ``ServedModel``), the default included
        self.versions: dict[str, dict[str, ServedModel]] = {}
        #: every model's default version: where requests without a version go
        self.models: dict[str, ServedModel] = {}
        for name, entry in config.models.items():
            if models is not None and name in models:
                self.serve(name, {models[name].version: models[name]}, models[name].version)
            else:
                made = {v: self.make_served(name, s) for v, s in entry.expand().items()}
                self.serve(name, made, entry.served_version)
        # a front started in the place of one that died continues its slot's counters
        self.metrics = share.previous_metrics() if share is not None else Metrics()
        self.history = _history.History()  # the status page's charts
        self.in_flight = 0
        self.accepting = True
        self.listening = False  # the port is bound (told by the runner)
        self.window = 3 * self.settings.ready_probe_interval
        self._probe_task: asyncio.Task[None] | None = None
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._publish_task: asyncio.Task[None] | None = None
        # each model's own infer paths, served by the fast path and first in aiohttp's routes
        # (an exact path is one dict lookup, where {model} patterns are a walk and regexes)
        # (a version that is not a plain URL segment is left to the {version} pattern)
        self.auth = _auth.Auth(config) if config.auth and config.auth.enabled else None
        self.logins = _login.Logins(self.auth) if self.auth is not None else None
        self.inference = _inference.Inference(self)
        self.fast_handlers = {
            path: self._tracked(self.inference.route(served.name, version), "model", served.name)
            for served in self.served()
            for path, version in (
                (f"/v2/models/{served.name}/infer", None),
                (f"/v2/models/{served.name}/versions/{served.version}/infer", served.version),
            )
            if _SEGMENTS.fullmatch(path)
        }
        self.repository = _repository.Repository(self, self.settings.fronts)

    # ------------------------------------------------------------------ application

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.settings.max_body_size,
            handler_args={
                "max_line_size": self.settings.max_header_size,
                "max_field_size": self.settings.max_header_size,
                "auto_decompress": False,  # the codec decompresses, within its size limit
            },
        )
        model = "/v2/models/{model}"
        version = "/v2/models/{model}/versions/{version}"
        # (method, path, handler, the authentication rule it is behind: _auth; None: open)
        routes: list[tuple[str, str, _logging.Handler, str | None]] = [
            *[("POST", path, handler, None) for path, handler in self.fast_handlers.items()],
            ("GET", "/", self.status_page, "page"),
            ("GET", "/status.json", self.status_json, "read"),
            ("GET", "/status/history.json", self.status_history, "read"),
            ("GET", "/metrics", self.metrics_text, "metrics"),
            ("GET", "/v2", self.server_metadata, "read"),
            ("GET", "/v2/health/live", self.live, None),  # (probes: never behind auth)
            ("GET", "/v2/health/ready", self.ready, None),
            ("POST", "/v2/repository/index", self.repository_index, "read"),
            ("POST", "/v2/repository/models/{name}/load", self.repository.load, "admin"),
            ("POST", "/v2/repository/models/{name}/unload", self.repository.unload, "admin"),
            *[
                (method, path, handler, "model")
                for prefix in (model, version)
                for method, path, handler in (
                    ("GET", prefix, self.model_metadata),
                    ("GET", prefix + "/ready", self.model_ready),
                    ("GET", prefix + "/config", self.model_config),
                    ("POST", prefix + "/infer", self.inference.infer),
                    ("POST", prefix + "/generate", self.inference.generate),
                    ("POST", prefix + "/generate_stream", self.inference.generate_stream),
                )
            ],
            *[(m, p, h, None) for m, p, h in (self.logins.routes() if self.logins else [])],
            ("*", r"/{path:[\s\S]*}", self._no_route, None),  # last: unknown paths and methods
        ]
        for method, path, handler, rule in routes:
            fast = path in self.fast_handlers
            wrapped = handler if fast else self._tracked(handler, rule)
            if method == "GET":  # (and HEAD)
                app.router.add_get(path, wrapped)
            else:
                expect = self._expect if path.endswith("/infer") else None
                app.router.add_route(method, path, wrapped, expect_handler=expect)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        app.cleanup_ctx.append(self.history.sampler(self._sampled))
        return app

    def _tracked(
        self, handler: _logging.Handler, rule: str | None = None, model: str | None = None
    ) -> _logging.Handler:
        """``handler`` with request ids, the access log, its errors answered, and (when
        authentication is on) behind ``rule`` (``_auth``; ``model``: the model a path without
        ``{model}`` serves)."""
        gate = self.auth.gate(rule, model) if self.auth is not None and rule else None
        return _logging.tracked(handler, self.settings.access_log, self._error_answer, gate)

    def fast_paths(self, aiohttp: Callable[[], asyncio.Protocol]) -> FastPaths:
        """The infer fast path (``_fastpath``) for this server's connections; ``aiohttp``
        makes the protocol of the connections it hands over (the runner's ``server``)."""
        s = self.settings
        return FastPaths(self.fast_handlers, aiohttp, s.max_body_size, s.max_header_size)

    async def _on_startup(self, app: web.Application) -> None:
        self._probe_task = asyncio.create_task(self._probe_loop())
        for served in self.served():  # requests made here are answered here, no threads
            served.attach(asyncio.get_running_loop())
        if self.share is not None:
            self._publish_task = asyncio.create_task(self._publish_loop())

    async def _on_cleanup(self, app: web.Application) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
        for task in self._probes.values():
            task.cancel()
        for served in self.served():
            served.detach()
        if self._publish_task is not None:
            self._publish_task.cancel()
            with contextlib.suppress(OSError):  # (the manager may have gone already)
                self.publish()  # the last word: not accepting

    def _error_answer(self, request: web.Request, exc: Exception) -> web.Response:
        """A handler's exception as the JSON answer it deserves (re-raised if none)."""
        if isinstance(exc, HTTPError):
            headers = dict(exc.headers)
            if exc.retry_after is not None:
                headers["Retry-After"] = str(exc.retry_after)
            return _json({"error": str(exc)}, exc.status, headers)
        if isinstance(exc, web.HTTPRequestEntityTooLarge):  # a chunked body past the limit
            return _json({"error": self.too_large(None)}, 413)
        if isinstance(exc, web.HTTPException):
            if exc.status < 400:
                raise exc
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return _json({"error": exc.reason or exc.text or "error"}, exc.status, allow)
        log.exception(
            "bug: unhandled error answering %s %s",
            request.method,
            request.path,
            exc_info=exc,
        )
        return _json({"error": "internal server error (a bug; the server log has it)"}, 500)

    async def _no_route(self, request: web.Request) -> web.Response:
        """No route has this path (404), or none takes this method (405, with Allow)."""
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if resource is not request.match_info.route.resource:
                match, methods = await resource.resolve(request)
                allowed |= methods if match is None else {request.method}
        if allowed:
            raise web.HTTPMethodNotAllowed(request.method, allowed)
        raise web.HTTPNotFound()

    async def _expect(self, request: web.Request) -> web.Response | None:
        """``Expect: 100-continue``: refuse a body over the limit before the client sends it
        (aiohttp's default would say "continue" first), with a JSON error like every other."""
        expect = request.headers.get("Expect", "")
        if request.version != HttpVersion11:
            return None
        if expect.lower() != "100-continue":
            return _json({"error": f"unsupported Expect: {expect!r}; use 100-continue"}, 417)
        if self.over_limit(request):
            message = self.too_large(request.content_length)
            return _json({"error": message}, 413, {"Connection": "close"})
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
        return None

    def over_limit(self, request: web.Request) -> bool:
        """Content-Length says the body is over the limit (decided before reading it)."""
        length = request.content_length
        return length is not None and length > self.settings.max_body_size

    def too_large(self, length: int | None) -> str:
        size = "request body" if length is None else f"request body of {length} bytes"
        return (
            f"{size} is over the limit of {self.settings.max_body_size} bytes; send fewer rows "
            "per request, or raise server.max_body_size"
        )

    def make_served(self, name: str, settings: ModelSettings) -> ServedModel:
        """A model to serve (its pool not started), as the configuration's are made."""
        return ServedModel(name, settings, logs=self.config.server)

    def serve(self, name: str, versions: dict[str, ServedModel], default: str) -> None:
        """Serve ``versions`` of model ``name`` from now on, unversioned requests going to
        ``default`` (one step: a request sees the old set or the new, never a mix)."""
        self.versions[name] = versions
        self.models[name] = versions[default]

    def drop(self, name: str) -> None:
        """Stop serving model ``name`` (every version)."""
        self.versions.pop(name, None)
        self.models.pop(name, None)

    def served(self) -> list[ServedModel]:
        """Every version of every model served."""
        return [m for versions in self.versions.values() for m in versions.values()]

    def labelled(self) -> dict[str, ServedModel]:
        """Every version served, by a name for people: the model's, with the version when
        it has several."""
        return {
            name if len(versions) == 1 else f"{name} (version {v})": m
            for name, versions in self.versions.items()
            for v, m in versions.items()
        }

    def other_versions(self) -> dict[str, dict[str, ServedModel]]:
        """Every model's versions but its default one (name -> version -> model), for the
        models that have several."""
        return {
            name: {v: m for v, m in versions.items() if m is not self.models.get(name)}
            for name, versions in self.versions.items()
            if len(versions) > 1
        }

    def version_list(self, name: str) -> list[str]:
        """The versions of ``name`` served, in order (``10`` after ``9``)."""
        return sorted(self.versions.get(name, ()), key=version_order)

    def model_of(self, request: web.Request) -> ServedModel:
        return self.model_named(request.match_info["model"], request.match_info.get("version"))

    def model_named(self, name: str, version: str | None) -> ServedModel:
        """The model ``name`` (at ``version``, when given, else its default version);
        ``HTTPError`` 404 otherwise."""
        served = self.models.get(name)
        if served is None:
            known = ", ".join(sorted(self.models)) or "none"
            why = self.repository.not_loaded(name)
            raise why or HTTPError(404, f"unknown model {name!r}; this server has: {known}")
        if version is not None and version != served.version:
            other = self.versions[name].get(version)
            if other is None:
                have = ", ".join(repr(v) for v in self.version_list(name))
                raise HTTPError(404, f"model {name!r} has no version {version!r}; it has {have}")
            return other
        return served

    # ------------------------------------------------------------------ health and metadata

    async def live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        if not self.accepting:
            body = {"ready": False, "error": SHUTTING_DOWN}
            return _json(body, 503, {"Retry-After": "0"})
        why = self.not_ready()
        if why:
            return _json({"ready": False, "error": why}, 503, self._retry_after())
        return _json({"ready": True})

    def not_ready(self, model: str | None = None) -> str:
        """Why the server (or ``model``) is not ready to serve, across the fronts; "" when it
        is."""
        if not self.accepting:
            return SHUTTING_DOWN
        models = self.whole()[0]
        for served in models.values() if model is None else [models[model]]:
            ok, why = served.readiness(self.window)
            if not ok:
                return str(why)
        return ""

    def version_not_ready(self, served: ServedModel) -> str:
        """``not_ready`` of one version of a model."""
        if served is self.models.get(served.name):
            return self.not_ready(served.name)
        # a version beside the default: this front's own
        return served.readiness(self.window)[1] if self.accepting else SHUTTING_DOWN

    def metadata_of(self, served: ServedModel) -> dict[str, Any]:
        """A model's metadata, with every version served."""
        return served.metadata() | {"versions": self.version_list(served.name)}

    async def model_ready(self, request: web.Request) -> web.Response:
        served = self.model_of(request)
        name = served.name
        why = self.version_not_ready(served)
        if why:
            return _json({"name": name, "ready": False, "error": why}, 503, self._retry_after())
        return _json({"name": name, "ready": True})

    def metadata(self) -> dict[str, Any]:
        """The server's metadata (``GET /v2``)."""
        extensions = ["binary_tensor_data", "model_configuration", "model_repository"]
        return {"name": "modelpool", "version": __version__, "extensions": extensions}

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json(self.metadata())

    async def model_metadata(self, request: web.Request) -> web.Response:
        return _json(self.metadata_of(self.model_of(request)))

    async def model_config(self, request: web.Request) -> web.Response:
        return _json(self.model_of(request).triton_config())

    def index(self) -> list[dict[str, Any]]:
        """The repository index: every model with its version and state."""
        index = []
        models = self.whole()[0]
        for served in [
            models[n] if v == m.version else self.versions[n][v]
            for n, m in models.items()
            for v in self.version_list(n) or [m.version]
        ]:
            ok, why = served.readiness(self.window)
            state = "READY" if ok else "UNAVAILABLE"
            why = why or self.repository.failed.get(served.name, "")  # (a failed reload)
            entry = {"name": served.name, "version": served.version, "state": state}
            index.append(entry | ({"reason": why} if why else {}))
        return index + self.repository.entries()

    async def repository_index(self, request: web.Request) -> web.Response:
        return _json(self.index())

    def _retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after)}

    # ------------------------------------------------------------------ inference

    def finished(self, served: ServedModel, code: int, started_at: float) -> None:
        """An inference request (HTTP or gRPC) has ended with ``code`` (HTTP's words; 499:
        the client went away): it leaves the in-flight count and enters the metrics."""
        self.in_flight -= 1
        elapsed = time.perf_counter() - started_at
        self.metrics.observe(served.name, code, elapsed)
        if code == 200:
            served.recent.append(elapsed)

    # ------------------------------------------------------------------ operations

    async def _probe_loop(self) -> None:
        """Keep readiness true to the real request path: when a model has been quiet for a
        probe interval, send a request through one of its workers."""
        interval = self.settings.ready_probe_interval
        while True:
            now = time.monotonic()
            for m in self.served():
                key = f"{m.name}/{m.version}"
                running = self._probes.get(key)
                if (running is None or running.done()) and now - m.last_ok >= interval:
                    # one task per model: a model whose workers are all busy must not hold
                    # back the probes of the others
                    self._probes[key] = asyncio.create_task(self._probe_one(m))
            await asyncio.sleep(min(interval, 1.0))

    async def _probe_one(self, served: ServedModel) -> None:
        if not served.alive():  # loading, or all restarting: not ready anyway, and a probe
            return  # queued now would keep a loading worker alive through a shutdown
        try:  # not a request the workers served: uncounted
            ok = await asyncio.wrap_future(served.pool.probe())
        except Exception as exc:
            log.debug("readiness probe of %r failed: %s", served.name, exc)
            return
        log.debug("readiness probe of %r answered", served.name)
        if ok:
            served.last_ok = time.monotonic()

    def whole(self) -> tuple[dict[str, Any], Metrics]:
        """The models (``ServedModel`` or, with several fronts, ``MergedModel``) and request
        counters of the whole server: this process's, merged with the other fronts'."""
        if self.share is None:
            return dict(self.models), self.metrics
        live, every = self.share.others()
        models = self.share.merged_models(self.models, live)
        return models, self.share.merged_metrics(self.metrics, every)

    def _sampled(self) -> tuple[Metrics, dict[str, Any]]:
        """What the status page's history samples: the whole server."""
        models, metrics = self.whole()
        return metrics, models

    def publish(self) -> None:
        """Write this front's snapshot for the others (``_shared``)."""
        if self.share is not None:
            self.share.publish(
                self.models,
                self.metrics,
                self.window,
                self.accepting,
                self.listening,
                self.other_versions(),
            )

    async def _publish_loop(self) -> None:
        while True:
            try:
                self.publish()
            except Exception:  # a full disk, say: the other fronts see this one go stale
                log.exception("could not publish this front's state for the other fronts")
            await asyncio.sleep(PUBLISH_INTERVAL)

    async def metrics_text(self, request: web.Request) -> web.Response:
        models, metrics = self.whole()
        stats = {name: m.pool.stats() for name, m in models.items()}
        ready = {n: m.readiness(self.window, stats[n])[0] for n, m in models.items()}
        text = metrics.render(stats, ready)
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def status_json(self, request: web.Request) -> web.Response:
        models: Mapping[str, Any] = self.models
        others: Mapping[str, Mapping[str, Any]] = self.other_versions()
        if self.share is not None:  # (the other fronts' snapshots read once, for both)
            live, _ = self.share.others()
            models = self.share.merged_models(self.models, live)
            others = self.share.merged_versions(others, live)
        snapshot = _status.snapshot(
            models, self.window, self.accepting, self.repository.failed, others
        )
        for model in snapshot["models"]:
            model["versions"] = self.version_list(model["name"]) or [model["version"]]
        if self.auth is not None:
            snapshot["auth"] = await self.auth.status(request)
        return _json(snapshot, headers={"Cache-Control": "no-store"})

    async def status_history(self, request: web.Request) -> web.Response:
        return _json(self.history.to_json())

    async def status_page(self, request: web.Request) -> web.Response:
        return web.Response(text=_status.PAGE, content_type="text/html", charset="utf-8")
