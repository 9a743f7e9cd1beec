"""Running the server: bind, load the models with progress, serve, and stop cleanly.

Stopping: the first SIGTERM or Ctrl+C stops accepting, answers every request already
accepted (within ``server.drain_timeout``), tears the models down and exits 0. A second
Ctrl+C kills every worker at once, reaps them, and exits 130. Either way multiprocessing's fork
server and resource tracker are stopped and reaped before the process exits.

Exit statuses (docs/server.md, "Exit status"): ``EXIT_OK`` 0 clean stop, ``EXIT_FAILURE`` 1
the server could not run (port in use, a model failed to load), ``EXIT_USAGE`` 2 nothing
started because the command, the configuration or a model's import string is wrong,
``EXIT_INTERRUPTED`` 130 stopped at once by a second Ctrl+C. Every error message starts with
``Error: `` (as click's own usage errors do).

Output (the banner, progress, these messages) goes through ``_output.Output``: a reader that
went away (``modelpool serve | head``) silences it and never stops or breaks the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import IO, Any

from aiohttp import web

from modelpool import __version__
from modelpool._atexit import stop_process_helpers
from modelpool._exceptions import DatabaseError, ModelpoolError
from modelpool._output import Output, settle_std_streams
from modelpool.config import Config, ConfigError

from . import _auth, _logging
from ._app import Server
from ._errors import HTTPError
from ._fastpath import FastSite
from ._served import ServedModel
from ._shared import FrontShare

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "serve"]

EXIT_OK = 0  # stopped by SIGTERM / Ctrl+C (also while loading)
EXIT_FAILURE = 1  # could not run: cannot listen, a model failed to load, a crash
EXIT_USAGE = 2  # nothing started: bad option, configuration or model import string
EXIT_INTERRUPTED = 130  # a second Ctrl+C: every worker killed at once (128 + SIGINT)

log = logging.getLogger("modelpool.server")


class _Progress:
    """Model and worker loading progress: one line per change (a live line on a terminal)."""

    def __init__(self, out: Output) -> None:
        self.out = out
        self.tty = out.isatty()
        self.seen: dict[tuple[str, int, int], str] = {}
        self.started = time.monotonic()
        self.live_line = False

    def line(self, text: str) -> None:
        if self.live_line:
            self.out.write("\r\033[K")
            self.live_line = False
        self.out.write(text + "\n")
        self.out.flush()

    def update(self, models: dict[str, ServedModel]) -> None:
        summary = []
        for name, served in models.items():
            stats = served.pool.stats()
            ready = 0
            for w in stats["workers"]:
                key = (name, w.index, w.generation)
                state = "ready" if w.state in ("idle", "busy") else w.state
                ready += state == "ready"
                if self.seen.get(key) == state or (state == "starting" and not w.pid):
                    continue  # nothing new (a slot not yet given a process says nothing)
                self.seen[key] = state
                pid = f" (pid {w.pid})" if w.pid else ""
                at = f" after {time.monotonic() - self.started:.1f} s"
                if state == "starting":
                    self.line(f"  {name}: worker {w.index}{pid} loading")
                elif state == "ready":
                    self.line(f"  {name}: worker {w.index}{pid} ready{at}")
                elif state in ("failed", "restarting"):
                    why = f": {w.last_exit}" if w.last_exit else ""
                    self.line(f"  {name}: worker {w.index} {state}{why}")
            summary.append(f"{name} {ready}/{len(stats['workers'])}")
        if self.tty:
            self.out.write("\r\033[Kloading: " + ", ".join(summary) + " workers ready")
            self.out.flush()
            self.live_line = True


class _Runner:
    def __init__(
        self,
        config: Config,
        out: Output,
        share: FrontShare | None = None,
        bind_late: bool = False,
        reread: Callable[[], Config] | None = None,
        watch: str | bool = False,
    ) -> None:
        self.config = config
        self.reread = reread  # the configuration read again (SIGHUP), when it is a file
        self.watch = watch  # --reload: the configuration file's path, or True (no file)
        self.reloading: asyncio.Task[None] | None = None
        self.reload_again = False
        self.out = out
        self.share = share  # one of several fronts (``_fronts``)
        self.bind_late = bind_late  # listen only once the models are loaded
        self.stop = asyncio.Event()
        self.signals = 0
        self.server: Server | None = None
        self.grpc: Any = None  # the gRPC site (``_grpc.GrpcSite``) when server.grpc_port is set

    def _on_signal(self, signum: int) -> None:
        # act first, then say so: nothing said may keep the signal from acting
        self.signals += 1
        if self.signals == 1:
            self.stop.set()
            name = signal.Signals(signum).name
            self.out.write(
                f"\n{name}: stopping; answering requests in flight "
                "(press Ctrl+C again to stop at once)\n"
            )
        else:
            self.out.write("\nstopping at once: killing every worker\n")
            self.out.flush()
            try:
                self._terminate()  # kills and reaps every worker
                stop_process_helpers(timeout=2.0)
                settle_std_streams()
            finally:
                os._exit(EXIT_INTERRUPTED)

    def _on_hup(self) -> None:
        """SIGHUP: read the configuration file again and serve its models (one reload at a
        time: one that comes meanwhile runs after it)."""
        if self.server is None or self.stop.is_set():
            return
        if self.reloading is not None and not self.reloading.done():
            self.reload_again = True
            log.info("SIGHUP: a reload is running; reloading again after it")
            return
        self.reloading = asyncio.ensure_future(self._reload())

    def _watcher(self) -> asyncio.Task[None] | None:
        """``--reload``: the task watching the files (``_watch``)."""
        if not self.watch or self.server is None:
            return None
        from ._watch import Watcher

        path = self.watch if isinstance(self.watch, str) else None
        reload_config = self._reload_now if self.share is None else self._hup_manager
        return asyncio.ensure_future(Watcher(self.server, path, reload_config).run())

    async def _hup_manager(self) -> None:
        """(A front's ``--reload``) the manager re-reads the file for every front."""
        os.kill(os.getppid(), signal.SIGHUP)

    def _front_changes(self) -> None:
        """(A front) changes of the models reach this front from the others (``_cluster``)."""
        share, server = self.share, self.server
        if share is None or server is None:
            return
        from ._cluster import Cluster, FrontChanges
        from ._watch import reimport

        server.repository.cluster = Cluster(
            share.directory, share, lambda: os.kill(os.getppid(), signal.SIGUSR1)
        )

        def done(generation: int, outcome: dict[str, str], whole: Config) -> None:
            share.generation, share.outcome = generation, outcome
            share.min_ready = {n: m.min_ready_workers for n, m in whole.models.items()}
            server.publish()

        changes = FrontChanges(
            share.directory,
            share.index,
            share.count,
            server.repository,
            reimport,
            done,
            share.generation,
        )
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, changes.poke)
        changes.poke()  # (a change made while this front loaded)

    async def _reload_now(self) -> None:
        self._on_hup()
        if self.reloading is not None:
            await asyncio.shield(self.reloading)

    async def _reload(self) -> None:
        assert self.server is not None
        while True:
            self.reload_again = False
            if self.reread is None:
                log.warning(
                    "SIGHUP: the models were given on the command line, not in a file: there "
                    "is nothing to read again (serve a modelpool.yaml to reload it)"
                )
                return
            try:
                new = await asyncio.to_thread(self.reread)
            except ConfigError as exc:
                log.error("SIGHUP: the configuration was not reloaded: %s", exc)
            else:
                changed = _server_changes(self.server.config, new)
                if changed:
                    log.warning(
                        "SIGHUP: server settings changed (%s): they take effect at the next "
                        "restart; models are reloaded now",
                        ", ".join(changed),
                    )
                try:
                    summary = await self.server.repository.reconcile(new)
                except HTTPError as exc:
                    log.error("SIGHUP: the configuration was not reloaded: %s", exc)
                else:
                    log.info("SIGHUP: configuration reloaded: %s", summary)
            if not self.reload_again or self.stop.is_set():
                return

    def _terminate(self) -> None:
        if self.server is not None:
            for served in self.server.served():
                served.pool.terminate()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        s = self.config.server
        try:
            self.server = Server(self.config, share=self.share)
        except ModelpoolError as exc:  # a model's import string: nothing started
            self.out.write(f"Error: {exc}\n")
            return EXIT_USAGE
        if self.server.auth is not None:
            try:
                await self.server.auth.start()
            except DatabaseError as exc:  # nothing started yet
                await self.server.auth.db.close()
                self.out.write(f"Error: authentication is on, but {exc}\n")
                return EXIT_FAILURE
        if s.grpc_port is not None:
            try:
                from ._grpc import GrpcSite
            except ImportError as exc:
                self.out.write(
                    f"Error: server.grpc_port is set, but gRPC cannot be served here ({exc}); "
                    "install it with pip install 'modelpool[grpc]', or unset grpc_port\n"
                )
                return EXIT_USAGE
            self.grpc = GrpcSite(self.server, s.host, s.grpc_port, self.share is not None)
        runner = web.AppRunner(
            self.server.app(), handle_signals=False, access_log=None, handler_cancellation=True
        )
        await runner.setup()
        site = FastSite(
            runner,
            self.server.fast_paths,
            s.host,
            s.port,
            backlog=1024,
            reuse_port=self.share is not None,  # the fronts share the port
        )
        url: str | None = None
        try:
            if not self.bind_late:
                url = await self._listen(site, runner)
                if url is None:
                    return EXIT_FAILURE
            ok = await self._load()
            if ok and self.bind_late and not self.stop.is_set():
                # a front replacing one that died takes connections only once it can serve
                url = await self._listen(site, runner)
                ok = url is not None
            if ok and url is not None and not self.stop.is_set():
                # what exists now lives as long as the server: keep it out of the garbage
                # collector's full passes, which would otherwise pause every request
                gc.freeze()
                self.server.publish()
                self._front_changes()
                self._banner(url)
                watcher = self._watcher()
                await self.stop.wait()
                if watcher is not None:
                    watcher.cancel()
            code = EXIT_OK if ok else EXIT_FAILURE
        finally:
            await self._drain(site, runner)
        return code

    async def _listen(self, site: FastSite, runner: web.AppRunner) -> str | None:
        """Bind and listen; the URL, or None (said why) when the port cannot be had."""
        s = self.config.server
        try:
            await site.start()
        except OSError as exc:
            why = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            self.out.write(
                f"Error: cannot listen on {s.host}:{s.port}: {why}. "
                "Choose another port (--port or server.port).\n"
            )
            return None
        if self.grpc is not None:
            try:
                await self.grpc.start()
            except OSError as exc:
                self.out.write(
                    f"Error: {exc}. Choose another port (--grpc-port or server.grpc_port).\n"
                )
                return None
        url = _url(runner, s.host)
        assert self.server is not None
        self.server.listening = True
        kind = type(asyncio.get_running_loop()).__module__.split(".")[0]  # asyncio, uvloop
        self.out.write(
            f"modelpool {__version__} listening on {url} ({kind}; ready once models load)\n"
        )
        return url

    async def _load(self) -> bool:
        assert self.server is not None
        progress = _Progress(self.out)
        models = self.server.labelled()
        loads = {
            name: asyncio.ensure_future(asyncio.to_thread(m.pool.start))
            for name, m in models.items()
        }
        failed = False
        while not self.stop.is_set():
            progress.update(models)
            done = [t for t in loads.values() if t.done()]
            if len(done) == len(loads) or any(t.exception() is not None for t in done):
                break  # all loaded, or one failed: the server will not start, say so now
            await asyncio.wait([*loads.values()], timeout=0.1)
        progress.update(models)
        for task in loads.values():  # stopped mid-load: its start() fails later, quietly
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        if progress.live_line:
            progress.line("")
        for name, task in loads.items():
            if not task.done():
                continue
            exc = task.exception()
            if exc is not None:
                failed = True
                self.out.write(f"Error: model {name!r} could not be loaded: {exc}\n")
                cause = exc.__cause__
                if cause is not None:
                    self.out.write("".join(traceback.format_exception(cause)))
            else:
                models[name].last_ok = time.monotonic()
        return not failed  # stopped while loading is a clean stop (exit 0), not a failure

    def _banner(self, url: str) -> None:
        assert self.server is not None
        name, served = next(iter(self.server.models.items()))
        self.out.write(f"ready: {len(self.server.models)} model(s) on {url}\n")
        self.out.write(f"  status page   {url}/\n  metrics       {url}/metrics\n")
        if self.grpc is not None:
            host = self.config.server.host
            shown = f"[{host}]" if ":" in host else host
            self.out.write(f"  grpc          {shown}:{self.grpc.bound} (GRPCInferenceService)\n")
        key = ' -H "Authorization: Bearer $MODELPOOL_API_KEY"' if self.server.auth else ""
        if self.server.auth is not None:
            self.out.write(
                f"  auth          on: programs send Authorization: Bearer KEY (modelpool keys "
                f"create --user NAME); people log in at {url}/auth/login\n"
            )
        self.out.write(f"  model info    curl -s{key} {url}/v2/models/{name}\n")
        if served.inputs:
            spec = served.inputs[0]
            shape = [1 if d == -1 else d for d in spec.shape]
            n = math.prod(shape)
            data = ",".join(["0.5"] * n) if spec.datatype.startswith("FP") else ",".join("1" * n)
            body = (
                f'{{"inputs":[{{"name":"{spec.name}","datatype":"{spec.datatype}",'
                f'"shape":{shape},"data":[{data}]}}]}}'
            ).replace(" ", "")
            self.out.write(
                f"  infer         curl -s{key} {url}/v2/models/{name}/infer -d '{body}'\n"
            )
        self.out.write("  python        modelpool.Client(url).infer(model, inputs)\n")
        self.out.write("Press Ctrl+C to stop.\n")
        self.out.flush()

    async def _drain(self, site: FastSite, runner: web.AppRunner) -> None:
        assert self.server is not None
        server = self.server
        server.accepting = False
        grpc_stopped = None
        if self.grpc is not None:  # no new calls; those running have the drain's time
            grpc_stopped = asyncio.ensure_future(self.grpc.stop(self.config.server.drain_timeout))
        with contextlib.suppress(Exception):
            await site.stop()  # no new connections; requests already read still run
        if site.paths is not None:
            site.paths.close_idle()  # (aiohttp's connections: at runner.cleanup below)
        deadline = time.monotonic() + self.config.server.drain_timeout
        while server.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if server.in_flight:
            self.out.write(f"drain timeout: {server.in_flight} request(s) still running\n")
        if grpc_stopped is not None:
            with contextlib.suppress(Exception):
                await grpc_stopped
        await runner.cleanup()
        if server.auth is not None:
            await server.auth.stop()  # (the last usage counts are written)
        await asyncio.to_thread(self._stop_pools, wait=True)
        self.out.write("stopped\n")

    def _stop_pools(self, wait: bool) -> None:
        if self.server is None:
            return
        served = [*self.server.served(), *self.server.repository.starting()]
        for m in served:
            m.pool.shutdown(wait=False)
        if wait:
            for m in served:
                m.pool.shutdown(wait=True)


def _server_changes(old: Config, new: Config) -> list[str]:
    """The ``server:`` settings a re-read configuration changes."""
    before, after = old.server.model_dump(), new.server.model_dump()
    return [f"server.{key}" for key in after if before.get(key) != after[key]]


def _url(runner: web.AppRunner, host: str) -> str:
    port = 0
    for address in runner.addresses:
        if isinstance(address, tuple):
            port = address[1]
            break
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``server.loop`` asks for (None: asyncio's own). Raises ``ConfigError``
    for uvloop when it is not installed."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "auto":
            return None
        raise ConfigError(
            "server.loop is 'uvloop' but uvloop is not installed; install it with "
            "pip install 'modelpool[fast]', or set server.loop to auto or asyncio"
        ) from None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def unprotected(config: Config) -> str | None:
    """Why ``config`` must not be served (no ``auth:`` on an address other machines can
    reach), or None."""
    host = config.server.host
    if config.auth is not None or not _auth.exposed(host):
        return None
    return (
        f"refusing to serve on {host} without authentication: anyone who can reach that "
        "address could run every model and read the status page and metrics. Add an 'auth:' "
        "section to the configuration (or pass --auth) and create an account and a key "
        "(modelpool users add NAME --admin; modelpool keys create --user NAME), or bind "
        "127.0.0.1, or opt out explicitly with 'auth: {enabled: false}' (--no-auth) when "
        "something in front of the server (a proxy, a private network) does this job"
    )


async def _open_database(config: Config) -> None:
    from modelpool.auth._db import Database, database_url

    db = Database(database_url(config))
    try:
        await db.open()
    finally:
        await db.close()


def serve(
    config: Config,
    out: IO[str] | None = None,
    *,
    share: FrontShare | None = None,
    bind_late: bool = False,
    reread: Callable[[], Config] | None = None,
    watch: str | bool = False,
) -> int:
    """Run the server until SIGTERM / Ctrl+C; the process exit code (``EXIT_*``). With
    ``server.fronts`` > 1 this process starts and watches the fronts (``_fronts``); a front
    runs this with its ``share``."""
    console = _logging.setup(config.server, out or sys.stderr)  # logs: level, format
    output = Output(console)
    try:
        factory = loop_factory(config.server.loop)
    except ConfigError as exc:
        output.write(f"Error: {exc}\n")
        return EXIT_USAGE
    if share is None and (problem := unprotected(config)) is not None:
        output.write(f"Error: {problem}\n")
        return EXIT_USAGE
    if share is None and config.server.fronts > 1:
        from ._fronts import Manager  # (imports this module: not at the top)

        if config.auth is not None and config.auth.enabled:
            try:  # once, before the fronts: a fresh database gets its tables here
                asyncio.run(_open_database(config))
            except DatabaseError as exc:
                output.write(f"Error: authentication is on, but {exc}\n")
                return EXIT_FAILURE

        return Manager(config, output, reread, watch).run()
    runner = _Runner(config, output, share, bind_late, reread, watch)
    try:
        with asyncio.Runner(loop_factory=factory) as loop_runner:
            return loop_runner.run(runner.run())
    except BaseException:
        runner._terminate()
        raise
    finally:
        # the server's own children, last: every pool is stopped by now
        stop_process_helpers()
        settle_std_streams()
