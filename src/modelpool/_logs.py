"""Request ids and the log line formats, shared by the server process and its workers.

Importing this module configures nothing. ``configure`` is called by ``modelpool serve`` in the
server process, and (as the pool's initializer) in each of the server's workers, so that a
worker's log lines carry its model, its pid and the id of the request it is running.

Two formats: ``text`` (one line per record, context in brackets, a traceback on the lines
after it) and ``json`` (one JSON object per line, tracebacks included, for log collectors).
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import re
import sys
from typing import IO, Any

__all__ = [
    "FORMATS",
    "LEVELS",
    "REQUEST_ID",
    "configure",
    "configure_worker",
    "request_id",
    "usable_request_id",
]

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")

#: the id of the request being handled in this context (an asyncio task in the server, the
#: running predict in a worker)
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "modelpool_request_id", default=None
)

#: a request id taken as given: visible ASCII, no spaces, not too long for a log line
_USABLE = re.compile(r"[\x21-\x7e]{1,128}")


def usable_request_id(value: str) -> bool:
    """Whether ``value`` can be a request id as it is (in a header and a log line)."""
    return _USABLE.fullmatch(value) is not None


def request_id() -> str | None:
    """The id of the request being handled here, or ``None``.

    In a model's ``predict`` run by ``modelpool serve``: the HTTP request's id (its
    ``X-Request-ID`` header, else the ``id`` of its JSON body, else one the server made up);
    for a batch of several requests, their ids joined by ``","``. With a plain ``Pool``: the
    ``request_id`` given to ``predict`` / ``apredict``. ``None`` outside a request.
    """
    return REQUEST_ID.get()


def _context(record: logging.LogRecord, static: dict[str, Any]) -> dict[str, Any]:
    """The facts a record is about: the handler's own (a worker's model and pid), the fields
    the call passed (``extra={"fields": {...}}``), and the current request id."""
    context = dict(static)
    fields = getattr(record, "fields", None)
    if isinstance(fields, dict):
        context.update(fields)
    rid = context.get("request_id") or REQUEST_ID.get()
    if rid is not None:
        context["request_id"] = rid
    return context


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message [key=value ...]``, then any traceback."""

    def __init__(self, static: dict[str, Any] | None = None) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.static = static or {}

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        context = _context(record, self.static)
        shown = [f"{k}={_plain(v)}" for k, v in context.items() if k in _TEXT_CONTEXT]
        return f"{line} [{' '.join(shown)}]" if shown else line

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        remote = getattr(record, "traceback", None)
        if remote:
            text = f"{text}\n{str(remote).rstrip()}"
        return text


#: context keys a text line shows in brackets (the rest is already in its message)
_TEXT_CONTEXT = ("model", "worker_pid", "request_id")


def _plain(value: Any) -> str:
    """A value for a text line: control characters escaped, so one record stays one line."""
    text = str(value)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the record's
    context (model, worker_pid, request_id and any fields) and a traceback when there is one."""

    def __init__(self, static: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.static = static or {}

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        doc: dict[str, Any] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _context(record, self.static).items():
            doc.setdefault(key, value)
        tb = getattr(record, "traceback", None)
        if not tb and record.exc_info:
            tb = self.formatException(record.exc_info)
        if tb:
            doc["traceback"] = str(tb).rstrip()
        return json.dumps(doc, default=str, ensure_ascii=False)


def formatter(fmt: str, static: dict[str, Any] | None = None) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    return JsonFormatter(static) if fmt == "json" else TextFormatter(static)


def configure(
    level: str, fmt: str, stream: IO[str] | None = None, static: dict[str, Any] | None = None
) -> logging.Handler:
    """Send every log record at ``level`` and above to ``stream`` (stderr) in ``fmt``.

    Replaces a handler an earlier call installed (not the application's own handlers)."""
    if level not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_modelpool", False):
            root.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt, static))
    handler._modelpool = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


def configure_worker(level: str, fmt: str, model: str) -> None:
    """The pool initializer of the server's workers: their log lines, in the server's format,
    carry the model's name, the worker's pid and the id of the request being run."""
    import os

    configure(level, fmt, sys.stderr, {"model": model, "worker_pid": os.getpid()})
