"""``modelpool serve --reload``: for development, reload what changed on disk.

Twice a second the watcher looks at the configuration file (when the server was started from
one) and at the source file of each served model's class. A changed configuration is
reloaded as ``SIGHUP`` reloads it; a changed model source is imported again in the server
process (for the model's signature) and the model is reloaded: a new pool beside the old
one, whose workers import the new code. Code that fails to import or to load leaves the old
model serving, and the log says why. Files are compared by modification time and size.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import sys
from collections.abc import Awaitable, Callable

from ._app import Server
from ._errors import HTTPError

__all__ = ["INTERVAL", "Watcher", "reimport"]

log = logging.getLogger("modelpool.server")

#: seconds between two looks at the files
INTERVAL = 0.5

Stamp = tuple[int, int]


class Watcher:
    """Watches ``config_path`` (or None) and the served models' sources for ``server``;
    ``reload_config`` reloads the configuration (the runner's ``SIGHUP`` path)."""

    def __init__(
        self,
        server: Server,
        config_path: str | None,
        reload_config: Callable[[], Awaitable[None]],
    ) -> None:
        self.server = server
        self.config_path = config_path
        self.reload_config = reload_config
        self.stamps: dict[str, Stamp | None] = {}

    def _files(self) -> dict[str, list[str]]:
        """Each watched file -> the models whose class it holds ([] for the configuration)."""
        files: dict[str, list[str]] = {}
        if self.config_path is not None:
            files[os.path.abspath(self.config_path)] = []
        for served in self.server.served():
            source = _source(served.pool.model_class)
            names = files.setdefault(source, []) if source is not None else []
            if source is not None and served.name not in names:
                names.append(served.name)
        return files

    async def run(self) -> None:
        self.stamps = {path: _stamp(path) for path in self._files()}
        log.info("--reload: watching %d file(s) for changes", len(self.stamps))
        while True:
            await asyncio.sleep(INTERVAL)
            await self.check()

    async def check(self) -> None:
        """One look: reload what changed since the last."""
        files = self._files()
        changed = [p for p in files if p in self.stamps and _stamp(p) != self.stamps[p]]
        for path in files:
            self.stamps[path] = _stamp(path)
        if not changed:
            return
        config = os.path.abspath(self.config_path) if self.config_path else None
        if config in changed:
            log.info("--reload: %s changed", config)
            await self.reload_config()
        for path in changed:
            if path == config:
                continue
            models = files[path]
            log.info("--reload: %s changed: reloading %s", path, ", ".join(models))
            if not reimport(path):
                continue
            for name in models:
                try:
                    await self.server.repository.load_model(name, None, reimport=(path,))
                except HTTPError as exc:
                    log.error("--reload: model %r was not reloaded: %s", name, exc)


def _source(cls: type | None) -> str | None:
    if cls is None:
        return None
    try:
        path = inspect.getsourcefile(cls)
    except TypeError:
        return None
    return os.path.abspath(path) if path else None


def _stamp(path: str) -> Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def reimport(path: str) -> bool:
    """Import again the modules loaded from ``path`` (their new code for this process's
    view of the model); False, having logged why, when that fails."""
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) and os.path.abspath(module.__file__ or "") == path:
            try:
                importlib.reload(module)
            except Exception as exc:
                log.error(
                    "--reload: %s does not import (%s: %s); the model keeps its old code",
                    path,
                    type(exc).__name__,
                    exc,
                )
                return False
    return True
