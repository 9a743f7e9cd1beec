"""The modelpool YAML file: server settings and any number of models.

```yaml
server:
  host: 127.0.0.1
  port: 8000
models:
  iris:
    model: modelpool.demo:IrisClassifier
    workers: 2
    max_batch_size: 32
```

``load_config(path)`` reads and validates a file; ``Config.model_validate(dict)`` a mapping.
The server and the Celery integration read the same file. Every error names the file, the
field and what is allowed, as one ``ConfigError``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from ._exceptions import ConfigError
from ._settings import SETTINGS, Setting, parse_size, scaling

__all__ = [
    "AuthSettings",
    "Config",
    "ConfigError",
    "ModelSettings",
    "ServerSettings",
    "load_config",
    "parse_duration",
    "parse_size",
    "version_order",
]

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _size(value: Any, info: pydantic.ValidationInfo) -> int:
    try:
        return parse_size(value, info.field_name or "size")
    except TypeError as exc:  # pydantic turns only ValueError into a validation error
        raise ValueError(str(exc)) from None


#: bytes, written as an int or a string such as "64MB" (binary units: 1 MB = 2**20 bytes)
Size = Annotated[int, pydantic.BeforeValidator(_size)]


def _access_log(value: Any) -> float:
    """off / on / a fraction in (0, 1] -> the fraction of requests logged (0 = off)."""
    if isinstance(value, bool):  # YAML reads on/off/true/false as booleans
        return 1.0 if value else 0.0
    number: Any = value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("on", "true", "yes"):
            return 1.0
        if word in ("off", "false", "no"):
            return 0.0
        try:
            number = float(word)
        except ValueError:
            number = None
    if isinstance(number, int | float) and 0 <= number <= 1:
        return float(number)
    raise ValueError(
        f"must be on, off, or the fraction of requests to log, between 0 and 1 (e.g. 0.1), "
        f"got {value!r}"
    )


#: the access log setting: off (0), on (1), or the fraction of requests logged
AccessLog = Annotated[float, pydantic.BeforeValidator(_access_log)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Strict):
    """The ``server:`` section."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    #: also serve the Open Inference Protocol over gRPC on this port (needs modelpool[grpc]);
    #: None = off. Its messages obey max_body_size too
    grpc_port: int | None = Field(None, ge=0, le=65535)
    #: largest request body accepted, decided from Content-Length before reading it (413)
    max_body_size: Size = 64 * 2**20
    #: largest body after gzip/deflate decompression (413)
    max_decompressed_size: Size = 64 * 2**20
    #: largest request line / header field (aiohttp's limits)
    max_header_size: int = Field(8190, ge=1024)
    #: seconds to finish in-flight requests after SIGTERM before workers are stopped anyway
    drain_timeout: float = Field(30.0, gt=0)
    #: a model is ready only if a request went through a worker within this many seconds
    #: (the server sends a probe request through the real path when traffic is quiet)
    ready_probe_interval: float = Field(5.0, gt=0)
    #: Retry-After seconds sent with 503 answers
    retry_after: int = Field(1, ge=0)
    #: answer with gzip when the client accepts it and the body is at least this big
    compress_min_size: Size = 1024
    #: the request access log: off, on, or a fraction such as 0.1 (that share of the requests
    #: answered below 400, chosen at random; every answer of 400 or above is logged)
    access_log: AccessLog = 0.0
    #: the least severe log records written: debug, info, warning or error
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: text: one line per record; json: one JSON object per line (for log collectors)
    log_format: Literal["text", "json"] = "text"
    #: the event loop: auto (uvloop when it is installed, e.g. by modelpool[fast]), asyncio,
    #: or uvloop (an error if it is not installed)
    loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    #: front processes serving the port together (SO_REUSEPORT), each with its share of every
    #: model's workers; 1 = one process does all the HTTP work (docs/server.md, "Fronts")
    fronts: int = Field(1, ge=1, le=256)

    @pydantic.field_validator("log_level", "log_format", "loop", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


def parse_duration(value: Any) -> float:
    """Seconds, written as a number or a string such as "30d", "8h", "15m", "90s"; a
    ``ValueError`` that shows the forms otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"must be a duration such as 8h, 30m or 3600 (seconds), got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value.strip().lower())):
        seconds = float(m[1]) * _UNITS[m[2] or "s"]
    else:
        raise ValueError(f"must be a duration such as 8h, 30m or 3600 (seconds), got {value!r}")
    if not seconds > 0:
        raise ValueError(f"must be more than 0 seconds, got {value!r}")
    return seconds


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
#: seconds, written as a number or with a unit: 90s, 15m, 8h, 30d, 2w
Duration = Annotated[float, pydantic.BeforeValidator(parse_duration)]


class AuthSettings(_Strict):
    """The ``auth:`` section (docs/security.md). Present, it turns authentication on unless it
    says ``enabled: false``; absent, the server runs without it only on a loopback address."""

    enabled: bool = True
    #: open: anyone may create a (non-admin) account with POST /auth/register
    registration: Literal["open", "closed"] = "closed"
    #: how long a login session lasts
    session_ttl: Duration = 8 * 3600.0
    #: who may read /metrics: loopback (clients on this machine, no key), key (an admin's key
    #: or a key made with ``keys create --metrics``), or open (anyone)
    metrics: Literal["loopback", "key", "open"] = "loopback"
    #: failed logins allowed per account, and per client address, within ``login_window``
    login_attempts: int = Field(5, ge=1)
    login_window: Duration = 300.0
    #: auto: cookies are Secure when the request came over TLS; always: behind a proxy that
    #: terminates TLS (the server itself then sees plain HTTP)
    secure_cookies: Literal["auto", "always"] = "auto"

    @pydantic.field_validator("registration", "metrics", "secure_cookies", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class _ModelEntry(BaseModel):
    """One entry of ``models:``: the model's import string, its version and readiness rule,
    and every setting of ``modelpool.Pool`` (declared once, in ``modelpool._settings``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    model: str = Field(description="import string 'pkg.module:Class'")
    version: str = "1"
    #: the server calls the model ready only while at least this many workers are alive
    min_ready_workers: int = Field(1, ge=1)
    #: several versions served at once: version -> the entry's settings with these changes
    #: (top-level keys replaced); ``version`` is not given then
    versions: dict[str, dict[str, Any]] | None = None
    #: the version unversioned requests go to (default: the highest of ``versions``)
    default_version: str | None = None

    if TYPE_CHECKING:  # the Pool's settings, added from the declaration below

        def __getattr__(self, name: str) -> Any: ...

    @pydantic.field_validator("model")
    @classmethod
    def _import_string(cls, value: str) -> str:
        module, _, name = value.partition(":")
        if not module or not name or not all(p.isidentifier() for p in module.split(".")):
            raise ValueError(f"{value!r} is not an import string; write 'package.module:ClassName'")
        return value

    @pydantic.field_validator("version", "default_version", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        # (YAML reads ``version: 2`` as a number)
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @pydantic.field_validator("versions", mode="before")
    @classmethod
    def _version_names(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError(
                "versions: must be a mapping of version -> the settings that differ, as "
                "{'1': {}, '2': {'options': {...}}}"
            )
        # (YAML reads ``1:`` as a number)
        value = {str(k) if isinstance(k, int) else k: v for k, v in value.items()}
        if not value:
            raise ValueError("versions: is empty; name at least one version, or leave it out")
        for version, changes in value.items():
            if not isinstance(version, str) or not version:
                raise ValueError(f"version {version!r} must be a name or a number")
            if not isinstance(changes, dict):
                raise ValueError(
                    f"versions.{version} must be a mapping of the settings that differ from "
                    f"the model's (or {{}}), got {type(changes).__name__}"
                )
            bad = sorted({"version", "versions", "default_version"} & changes.keys())
            if bad:
                raise ValueError(f"versions.{version}.{bad[0]} cannot be set per version")
        return value

    @pydantic.model_validator(mode="after")
    def _default_version(self) -> _ModelEntry:
        if self.versions is not None and "version" in self.model_fields_set:
            raise ValueError(
                "give either version: (one version) or versions: (several), not both; the "
                "version unversioned requests use is default_version:"
            )
        known = list(self.versions) if self.versions is not None else [self.version]
        if self.default_version is not None and self.default_version not in known:
            raise ValueError(
                f"default_version {self.default_version!r} is not one of the versions "
                f"({', '.join(known)})"
            )
        for version, changes in (self.versions or {}).items():
            try:
                self._version(version, changes)
            except pydantic.ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                where = ".".join(str(p) for p in first["loc"])
                message = first["msg"].removeprefix("Value error, ")
                raise ValueError(f"versions.{version}: {where}: {message}") from None
        return self

    @property
    def served_version(self) -> str:
        """The version unversioned requests go to."""
        if self.default_version is not None:
            return self.default_version
        if self.versions is None:
            return self.version
        return max(self.versions, key=version_order)

    def expand(self) -> dict[str, ModelSettings]:
        """Each version's own settings (``versions:`` applied), by version."""
        if self.versions is None and self.default_version is None:
            return {self.version: self}
        changes = self.versions or {self.version: {}}
        return {v: self._version(v, c) for v, c in changes.items()}

    def _version(self, version: str, changes: dict[str, Any]) -> ModelSettings:
        base = self.model_dump(exclude={"versions", "default_version"}, exclude_unset=True)
        return type(self).model_validate({**base, **changes, "version": version})

    def default(self) -> ModelSettings:
        """The settings of the version unversioned requests go to."""
        return self.expand()[self.served_version]

    @pydantic.model_validator(mode="after")
    def _scaling(self) -> _ModelEntry:
        floor, _ = scaling(self.workers, self.min_workers, self.max_workers)
        if self.min_ready_workers > floor:
            raise ValueError(
                f"min_ready_workers={self.min_ready_workers} can never be met: the model keeps "
                f"{floor} worker(s) running (workers / min_workers)"
            )
        return self

    def pool_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``modelpool.Pool(self.model, **kwargs)``."""
        exclude = {"model", "version", "min_ready_workers", "versions", "default_version"}
        return self.model_dump(exclude=exclude)


def version_order(version: str) -> tuple[int, int, str]:
    """Versions in order: names, then numbers by value (``10`` after ``9``): the highest is
    the greatest number."""
    return (1, int(version), "") if version.isdigit() else (0, 0, version)


def _field(setting: Setting) -> Any:
    """A pydantic field that runs the setting's own check (its errors become pydantic's)."""

    def check(value: Any) -> Any:
        try:
            return setting.check(setting.name, value)
        except TypeError as exc:  # pydantic turns only ValueError into a validation error
            raise ValueError(str(exc)) from None

    validator = pydantic.BeforeValidator(check)
    return (Annotated[Any, validator, Field(description=setting.doc)], setting.default)


if TYPE_CHECKING:
    ModelSettings = _ModelEntry
else:
    ModelSettings = pydantic.create_model(
        "ModelSettings",
        __base__=_ModelEntry,
        __module__=__name__,
        **{setting.name: _field(setting) for setting in SETTINGS},
    )


class Config(_Strict):
    """A whole file: ``server:`` and ``models:`` (name -> ``ModelSettings``), and for
    authentication ``auth:``, ``database:`` and ``data_dir:``."""

    server: ServerSettings = Field(default_factory=ServerSettings)  # type: ignore[arg-type]
    models: dict[str, ModelSettings] = Field(min_length=1)
    #: None: no ``auth:`` section (off on a loopback address; anywhere else serve refuses)
    auth: AuthSettings | None = None
    #: the user and key database: sqlite:///path or postgresql://user:pass@host/db (default:
    #: the SQLite file modelpool.db in ``data_dir``)
    database: str | None = None
    #: where modelpool keeps its files (default: $MODELPOOL_DATA_DIR, else
    #: $XDG_DATA_HOME/modelpool, else ~/.local/share/modelpool)
    data_dir: str | None = None

    @pydantic.field_validator("database")
    @classmethod
    def _database(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite:", "postgresql:", "postgres:")):
            raise ValueError(
                f"{value!r} is not a database URL this version knows: write "
                "sqlite:///path/to/modelpool.db or postgresql://user:password@host:5432/name"
            )
        return value

    @pydantic.field_validator("models")
    @classmethod
    def _names(cls, value: dict[str, ModelSettings]) -> dict[str, ModelSettings]:
        for name in value:
            if not _NAME.match(name):
                raise ValueError(
                    f"model name {name!r} must be letters, digits, '_', '-' or '.' "
                    "(it becomes part of the URL /v2/models/NAME)"
                )
        return value

    @pydantic.model_validator(mode="after")
    def _grpc_and_fork(self) -> Config:
        forked = [name for name, m in self.models.items() if m.start_method == "fork"]
        if self.server.grpc_port is not None and forked:
            raise ValueError(
                f"server.grpc_port cannot be combined with start_method: fork (model "
                f"{forked[0]!r}): the gRPC server runs threads in the server process, and a "
                "worker forked from it could hang on a lock one of them held; use the default "
                "start method (forkserver), or serve without gRPC"
            )
        return self

    def for_front(self, index: int, count: int) -> Config:
        """This configuration as front ``index`` of ``count`` serves it: its share of every
        model's workers (at least one each), and readiness checked per front (one worker
        alive; the whole server's ``min_ready_workers`` is checked across fronts)."""
        models = {}
        for name, m in self.models.items():
            entry = m.model_dump()
            if m.versions is not None:
                del entry["version"]  # (given by versions:)
            for part in [entry, *(entry.get("versions") or {}).values()]:
                for key in ("workers", "min_workers", "max_workers"):
                    if part.get(key) is not None:
                        part[key] = share(part[key], index, count)
            entry["min_ready_workers"] = 1
            models[name] = entry
        return Config.from_mapping({**self._rest(), "models": models})

    def with_server(self, overrides: Mapping[str, Any], source: str = "command line") -> Config:
        """A copy whose ``server:`` fields are replaced by ``overrides``, validated (a
        ``ConfigError`` naming ``source`` and the field)."""
        server = {**self.server.model_dump(), **overrides}
        return Config.from_mapping({**self._rest(), "server": server}, source)

    def with_auth(self, enabled: bool) -> Config:
        """A copy with authentication turned on or off (other ``auth:`` settings kept)."""
        settings = self.auth.model_dump() if self.auth is not None else {}
        return Config.from_mapping({**self._rest(), "auth": {**settings, "enabled": enabled}})

    def _rest(self) -> dict[str, Any]:
        """This configuration as a mapping ``from_mapping`` reads back (models as objects)."""
        data = self.model_dump(exclude={"models"}, exclude_none=True)
        return {**data, "models": dict(self.models)}

    @classmethod
    def from_mapping(cls, data: Any, source: str = "<config>") -> Config:
        """Validate a parsed mapping; errors become one ``ConfigError`` naming ``source``."""
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{source}: the top level must be a mapping with a 'models:' section, "
                f"got {type(data).__name__}"
            )
        try:
            return cls.model_validate(data)
        except pydantic.ValidationError as exc:
            raise ConfigError(_describe(exc, source)) from None


def share(total: int, index: int, count: int) -> int:
    """Front ``index``'s share of ``total`` workers split over ``count`` fronts (at least 1)."""
    return max(1, total // count + (1 if index < total % count else 0))


def _describe(exc: pydantic.ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} error(s) in the configuration"]
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            section = _fields_for(error["loc"])
            message = f"unknown field; allowed here: {', '.join(sorted(section))}"
        elif error["type"] == "literal_error":
            message = f"{message} (got {error['input']!r})"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def _fields_for(loc: tuple[int | str, ...]) -> list[str]:
    if len(loc) <= 1:
        return list(Config.model_fields)
    if loc[0] == "server":
        return list(ServerSettings.model_fields)
    if loc[0] == "auth":
        return list(AuthSettings.model_fields)
    return list(ModelSettings.model_fields)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a modelpool YAML file."""
    import yaml

    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{source}: not UTF-8 text (bad byte at offset {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read it: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    if isinstance(data, dict) and "auth" in data and data["auth"] is None:
        data["auth"] = {}  # a bare "auth:" line turns it on, with the defaults
    return Config.from_mapping(data, source)
