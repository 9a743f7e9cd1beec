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
counters. The first SIGTERM or Ctrl+C is passed on to every front, which drain as a single
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
import time
from typing import IO, Any

import orjson

from modelpool._output import Output
from modelpool.config import Config

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

    def __init__(self, config: Config, out: Output) -> None:
        self.config = config
        self.out = out
        self.count = config.server.fronts
        self.signals = 0
        self.fronts = [_Front(i) for i in range(self.count)]
        self.directory = ""
        self.announced = False

    def _on_hup(self, signum: int, frame: object) -> None:
        self.out.write(
            "SIGHUP: reloading models is not supported with server.fronts > 1 yet (each front "
            "holds its share of the workers); restart the server to change them\n"
        )

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
                f.write(orjson.dumps(config.model_dump(mode="json")))
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, self._on_signal)
            signal.signal(signal.SIGHUP, self._on_hup)
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
        share = FrontShare(self.directory, -1, self.count, {})
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


def front_main(argv: list[str]) -> int:
    """A front process: ``DIRECTORY INDEX RESTARTED`` (see the module docstring)."""
    directory, index, restarted = argv[0], int(argv[1]), argv[2] == "1"
    _term_with_manager()
    sys.path.insert(0, os.getcwd())  # models next to the command, as `modelpool serve` does
    with open(os.path.join(directory, "config.json"), "rb") as f:
        config = Config.from_mapping(orjson.loads(f.read()), "the fronts' configuration")
    count = config.server.fronts
    min_ready = {name: m.min_ready_workers for name, m in config.models.items()}
    share = FrontShare(directory, index, count, min_ready)
    out: Any = sys.stderr if index == 0 and not restarted else _Quiet(sys.stderr)
    return serve(config.for_front(index, count), out, share=share, bind_late=True)


if __name__ == "__main__":
    sys.exit(front_main(sys.argv[1:]))
