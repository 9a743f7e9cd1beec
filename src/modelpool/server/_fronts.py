"""Several front processes on one port (``server.fronts`` > 1, ``--fronts N``).

The process that runs ``modelpool serve`` becomes the fronts' manager: it serves no HTTP
itself. It starts ``N`` front processes (``python -m modelpool.server._fronts``), each a whole
server (``_main``) with its share of every model's workers (``Config.for_front``), listening
on the same port with ``SO_REUSEPORT`` so that the kernel spreads connections over them.
Each front answers ``/metrics``, readiness, ``/v2/repository/index`` and the status page for
the whole server (``_shared``).

A front listens only once its models are loaded, so a connection never lands on one that
cannot serve. When a front dies, the manager starts another in its place (with a back-off if
it keeps dying) while the others go on serving; the new one continues its slot's request
counters. Models loaded, unloaded or reloaded (a request to any front, SIGHUP to the
manager, ``--reload`` in front 0) change every front (``_cluster``); the manager passes the
news on (SIGUSR1). The first SIGTERM or Ctrl+C is passed on to every front, which drain as a single
server does; a second one stops them at once. Fronts run in their own process group (a
terminal's Ctrl+C reaches the manager alone, which passes it on once) and are sent SIGTERM by
the kernel if the manager itself dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import IO, Any

import orjson

from modelpool._output import Output
from modelpool.config import Config, ConfigError

from ._cluster import Cluster, config_of, dump, read_base, read_desired
from ._errors import HTTPError
from ._main import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, serve
from ._shared import FrontShare

__all__ = ["Manager", "front_main"]

#: a front that exits sooner than this after it started counts towards the back-off
QUICK_EXIT = 10.0
#: the longest wait before a front that keeps dying is started again
MAX_BACKOFF = 10.0
_PR_SET_PDEATHSIG = 1


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class _Front:
    """One front slot: its current process and its restart bookkeeping."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.failures = 0  # quick exits in a row
        self.restart_at: float | None = None
        self.restarts = 0


class Manager:
    """Starts the fronts, restarts the ones that die, passes signals on."""

    def __init__(
        self,
        config: Config,
        out: Output,
        reread: Callable[[], Config] | None = None,
        watch: str | bool = False,
    ) -> None:
        self.config = config
        self.out = out
        self.reread = reread  # the configuration file read again (SIGHUP)
        self.watch = watch  # --reload (front 0 watches the files)
        self.count = config.server.fronts
        self.signals = 0
        self.fronts = [_Front(i) for i in range(self.count)]
        self.directory = ""
        self.announced = False
        self.reloading: threading.Thread | None = None
        self.reload_again = False
        self.share: FrontShare | None = None

    def _on_hup(self, signum: int, frame: object) -> None:
        """SIGHUP: every front serves the models of the file read again (``_cluster``), one
        reload at a time (one asked for meanwhile runs after it)."""
        if self.signals or self.share is None:
            return
        if self.reloading is not None and self.reloading.is_alive():
            self.reload_again = True
            return
        self.reloading = threading.Thread(target=self._reload, name="modelpool-reload")
        self.reloading.start()

    def _reload(self) -> None:
        assert self.share is not None
        while True:
            self.reload_again = False
            if self.reread is None:
                self.out.write(
                    "SIGHUP: the models were given on the command line, not in a file: there "
                    "is nothing to read again (serve a modelpool.yaml to reload it)\n"
                )
                return
            try:
                new = self.reread()
                summary = reload_fronts(self.directory, self.share, self._poke, self.config, new)
            except (ConfigError, HTTPError) as exc:
                self.out.write(f"SIGHUP: the configuration was not reloaded: {exc}\n")
            else:
                self.config = new
                self.out.write(f"SIGHUP: configuration reloaded: {summary}\n")
            if not self.reload_again or self.signals:
                return

    def _poke(self, signum: int = signal.SIGUSR1, frame: object = None) -> None:
        """The fronts' models changed (``_cluster``): tell every front."""
        for front in self.fronts:
            proc = front.proc
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGUSR1)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals += 1
        for front in self.fronts:
            if front.proc is not None and front.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    front.proc.send_signal(signum)
        if self.signals == 1:
            name = signal.Signals(signum).name
            self.out.write(
                f"\n{name}: stopping {self.count} fronts; answering requests in flight "
                "(press Ctrl+C again to stop at once)\n"
            )

    def _start(self, front: _Front, restarted: bool) -> None:
        argv = [sys.executable, "-m", "modelpool.server._fronts", self.directory]
        argv += [str(front.index), "1" if restarted else "0"]
        if self.watch and front.index == 0:  # one front watches the files for all
            argv.append(self.watch if isinstance(self.watch, str) else "-")
        front.proc = subprocess.Popen(argv, process_group=0)
        front.started = time.monotonic()
        front.restart_at = None

    def run(self) -> int:
        s = self.config.server
        port = s.port or _free_port(s.host)
        self.directory = tempfile.mkdtemp(prefix="modelpool-fronts-")
        try:
            config = self.config.with_server({"port": port})
            with open(os.path.join(self.directory, "config.json"), "wb") as f:
                f.write(orjson.dumps(config.model_dump(mode="json", exclude_unset=True)))
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, self._on_signal)
            signal.signal(signal.SIGHUP, self._on_hup)
            signal.signal(signal.SIGUSR1, self._poke)
            self.out.write(f"starting {self.count} front processes sharing port {port}\n")
            for front in self.fronts:
                self._start(front, restarted=False)
            return self._watch()
        finally:
            for front in self.fronts:  # (only after an error of our own: they exit first)
                if front.proc is not None and front.proc.poll() is None:
                    front.proc.kill()
                    front.proc.wait()
            shutil.rmtree(self.directory, ignore_errors=True)

    def _watch(self) -> int:
        share = self.share = FrontShare(self.directory, -1, self.count, {})
        code = EXIT_OK
        while True:
            now = time.monotonic()
            running = 0
            for front in self.fronts:
                proc = front.proc
                if proc is not None and proc.poll() is None:
                    running += 1
                    continue
                if proc is not None:  # it exited
                    front.proc = None
                    status = proc.returncode
                    if self.signals:
                        if status == EXIT_INTERRUPTED:
                            code = EXIT_INTERRUPTED
                        continue
                    if not self.announced and front.restarts == 0:
                        # could not start (a model failed to load, the port is taken): the
                        # front said why; the server as a whole cannot run
                        self._stop_all()
                        return status if status and status > 0 else EXIT_FAILURE
                    self._schedule_restart(front, status, now)
                if front.restart_at is not None and not self.signals and now >= front.restart_at:
                    front.restarts += 1
                    self._start(front, restarted=True)
                    running += 1
            if self.signals and running == 0:
                if self.reloading is not None:
                    self.reloading.join(5.0)  # (its fronts are gone: it ends)
                return EXIT_INTERRUPTED if self.signals > 1 else code
            if not self.announced and all(share.listening(i) for i in range(self.count)):
                self.announced = True
                pids = ", ".join(str(f.proc.pid) for f in self.fronts if f.proc is not None)
                self.out.write(f"all {self.count} fronts serving (pids {pids})\n")
            time.sleep(0.05)

    def _schedule_restart(self, front: _Front, status: int | None, now: float) -> None:
        how = (
            f"was killed by {signal.Signals(-status).name}"
            if status and status < 0
            else (f"exited with status {status}")
        )
        if now - front.started < QUICK_EXIT:
            front.failures += 1
        else:
            front.failures = 0
        delay = min(MAX_BACKOFF, 0.5 * 2 ** (front.failures - 1)) if front.failures else 0.0
        front.restart_at = now + delay
        self.out.write(
            f"front {front.index} {how}; the other fronts keep serving; starting a new one"
            + (f" in {delay:.1f} s" if delay else "")
            + "\n"
        )

    def _stop_all(self) -> None:
        for front in self.fronts:
            if front.proc is not None and front.proc.poll() is None:
                front.proc.send_signal(signal.SIGTERM)
        for front in self.fronts:
            if front.proc is not None:
                front.proc.wait()


class _Quiet(io.TextIOBase):
    """A front's console after the first: only errors get through (the first front speaks
    for the server: progress, the banner)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._line = ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        self._line += text
        *lines, self._line = self._line.split("\n")
        for line in lines:
            if line.startswith("Error") or "drain timeout" in line:
                self._stream.write(f"front: {line}\n")
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


def _term_with_manager() -> None:
    """SIGTERM this front (a graceful drain) when the manager dies, however it dies."""
    if sys.platform.startswith("linux"):
        libc_name = ctypes.util.find_library("c")
        if libc_name:
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(libc_name).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the manager died before the line above: stop now
        sys.exit(EXIT_OK)


def reload_fronts(
    directory: str, share: FrontShare, poke: Callable[[], None], old: Config, new: Config
) -> str:
    """Every front serves the models of ``new`` (the file read again; ``old``: as it was
    read before): a model whose entry in the file changed, or that is new, is loaded, one
    no longer in the file is unloaded; the others keep what they serve (a change made by a
    request included). A summary, as a single server's SIGHUP gives."""
    cluster = Cluster(directory, share, poke)
    changed = [f"server.{k}" for k, v in new.server if getattr(old.server, k) != v]
    changed = [c for c in changed if c != "server.port"]  # (the fronts' port was chosen)
    with cluster.turn(wait=True, what="reloading the configuration"):
        before = read_desired(directory, cluster.base).models
        after = {n: s for n, s in before.items() if n not in old.models or n in new.models}
        loaded = []
        for name, settings in new.models.items():
            if old.models.get(name) != settings or name not in before:
                after[name] = dump(settings)
                loaded.append(name)
        failed = cluster.change_or_undo(before, after)
    done = [f"{n} NOT loaded ({failed[n]})" if n in failed else f"{n} loaded" for n in loaded]
    done += [f"{n} unloaded" for n in before if n not in after]
    kept = len(new.models) - len(loaded)
    note = f"; server settings changed ({', '.join(changed)}) take effect at the next restart"
    return f"{'; '.join(done) or 'no model changed'} ({kept} unchanged)" + (note if changed else "")


def front_main(argv: list[str]) -> int:
    """A front process: ``DIRECTORY INDEX RESTARTED [WATCH]`` (see the module docstring)."""
    directory, index, restarted = argv[0], int(argv[1]), argv[2] == "1"
    watch: str | bool = (argv[3] if argv[3] != "-" else True) if len(argv) > 3 else False
    _term_with_manager()
    # (a change of the models told before this front listens: it reads them once it does)
    signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    sys.path.insert(0, os.getcwd())  # models next to the command, as `modelpool serve` does
    base = read_base(directory)
    desired = read_desired(directory, base)  # the models now, after any change made
    config = config_of(base, desired.models, "models.json")
    count = config.server.fronts
    min_ready = {name: m.min_ready_workers for name, m in config.models.items()}
    share = FrontShare(directory, index, count, min_ready)
    share.generation = desired.generation
    out: Any = sys.stderr if index == 0 and not restarted else _Quiet(sys.stderr)
    return serve(config.for_front(index, count), out, share=share, bind_late=True, watch=watch)


if __name__ == "__main__":
    sys.exit(front_main(sys.argv[1:]))
