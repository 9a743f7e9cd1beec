"""The database: where it is, opening it, and its schema's version (Alembic migrations).

``database:`` in the YAML file names it: ``sqlite:///path/to/modelpool.db`` or
``postgresql://user:password@host:5432/name``; without it, the SQLite file ``modelpool.db`` in
the data directory. Both go through SQLAlchemy's async engine (aiosqlite, psycopg 3).

A database with none of modelpool's tables is created at the current schema on first use, so
the Quick start needs no setup step. One with an older schema is never changed behind its
owner's back: opening it fails with a ``DatabaseError`` that says to run
``modelpool db upgrade``, which migrates it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from modelpool._exceptions import DatabaseError

if TYPE_CHECKING:
    from modelpool.config import Config

__all__ = ["VERSION_TABLE", "Database", "data_dir", "database_url", "shown"]

#: Alembic's bookkeeping table, named like the others so that it cannot clash with an
#: application's own ``alembic_version`` in a shared database
VERSION_TABLE = "modelpool_alembic_version"
MIGRATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")
#: seconds to wait for a PostgreSQL connection, and for a locked SQLite file
CONNECT_TIMEOUT = 5


def data_dir(config: Config | None = None) -> str:
    """modelpool's data directory: the config's ``data_dir``, else $MODELPOOL_DATA_DIR, else
    $XDG_DATA_HOME/modelpool, else ~/.local/share/modelpool."""
    if config is not None and config.data_dir:
        return os.path.abspath(os.path.expanduser(config.data_dir))
    if env := os.environ.get("MODELPOOL_DATA_DIR"):
        return os.path.abspath(os.path.expanduser(env))
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "modelpool")


def database_url(config: Config | None = None) -> str:
    """The database URL: the config's ``database``, else the SQLite file in ``data_dir``."""
    if config is not None and config.database:
        return config.database
    return "sqlite:///" + os.path.join(data_dir(config), "modelpool.db")


def shown(url: str) -> str:
    """``url`` with its password hidden, for messages and logs."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except (sa.exc.ArgumentError, ValueError):
        return "<unreadable database URL>"


def _engine_url(url: str) -> sa.URL:
    try:
        parsed = sa.make_url(url.replace("postgres://", "postgresql://", 1))
    except (sa.exc.ArgumentError, ValueError):
        raise DatabaseError(
            f"{url!r} is not a database URL: write sqlite:///path/to/modelpool.db or "
            "postgresql://user:password@host:5432/name"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise DatabaseError(
                f"{shown(url)}: name a file (sqlite:///path/to/modelpool.db); an in-memory "
                "database would be empty in every process"
            )
        return parsed.set(drivername="sqlite+aiosqlite")
    if parsed.get_backend_name() == "postgresql":
        return parsed.set(drivername="postgresql+psycopg")
    raise DatabaseError(
        f"{shown(url)}: modelpool stores users and keys in SQLite or PostgreSQL; write "
        "sqlite:///path/to/modelpool.db or postgresql://user:password@host:5432/name"
    )


#: loggers whose debug records carry SQL statements' parameters (hashes, CSRF tokens) or
#: migration chatter: kept at warnings, whatever the server's log level
QUIET = ("aiosqlite", "sqlalchemy", "alembic", "psycopg")


def _quiet() -> None:
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")  # (off by default in SQLite)
    cursor.execute(f"PRAGMA busy_timeout={CONNECT_TIMEOUT * 1000}")  # several processes write
    cursor.close()


class Database:
    """One database, opened lazily by the first query. ``await open()`` checks it (and
    creates a fresh one's tables); ``await close()`` releases its connections."""

    def __init__(self, url: str) -> None:
        _quiet()
        self.url = url
        self.shown = shown(url)
        target = _engine_url(url)
        self.sqlite = target.get_backend_name() == "sqlite"
        if self.sqlite:
            assert target.database is not None
            self.path: str | None = os.path.abspath(os.path.expanduser(target.database))
            self.engine: AsyncEngine = create_async_engine(
                target.set(database=self.path),
                connect_args={"timeout": CONNECT_TIMEOUT},
            )
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            self.path = None
            try:
                self.engine = create_async_engine(
                    target, pool_pre_ping=True, connect_args={"connect_timeout": CONNECT_TIMEOUT}
                )
            except ImportError:
                raise DatabaseError(
                    f"{self.shown}: PostgreSQL needs the psycopg driver; install it with "
                    "pip install 'modelpool[postgres]'"
                ) from None

    # ------------------------------------------------------------------ connections

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """A connection in a transaction (committed at the end, rolled back on an error);
        failures to reach the database become a ``DatabaseError`` that says so."""
        try:
            async with self.engine.begin() as conn:
                yield conn
        except DBAPIError as exc:  # (an IntegrityError, say, is the caller's to handle)
            if exc.connection_invalidated or _unreachable(exc):
                raise DatabaseError(self.unreachable(exc)) from exc
            raise
        except (SQLAlchemyError, OSError) as exc:  # a pool timeout, a connection torn down
            raise DatabaseError(self.unreachable(exc)) from exc

    def unreachable(self, exc: BaseException) -> str:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return (
            f"cannot use the database {self.shown}: {reason}. Check that it is running and "
            "reachable, and the URL in the configuration's 'database:'"
        )

    async def close(self) -> None:
        await self.engine.dispose()

    # ------------------------------------------------------------------ schema

    async def open(self) -> None:
        """Check that the database can be used: reachable, and at the current schema. A
        database without modelpool's tables gets them (first use); one at an older schema is
        an error that says to run ``modelpool db upgrade``."""
        self._prepare_file()
        try:
            async with self.begin() as conn:
                current, head, fresh = await conn.run_sync(_revisions)
                if fresh:
                    await conn.run_sync(_upgrade)
                    return
        except SQLAlchemyError as exc:
            raise DatabaseError(self.unreachable(exc)) from exc
        if current != head:
            raise DatabaseError(
                f"the database {self.shown} has schema revision {current or 'none'}, and this "
                f"version of modelpool needs {head}: run `modelpool db upgrade` (with the same "
                "--config) to migrate it, after a backup if it holds data you care about"
            )

    async def upgrade(self) -> tuple[str | None, str]:
        """Migrate to the current schema; returns (revision before, revision now)."""
        self._prepare_file()
        try:
            async with self.begin() as conn:
                before, head, _ = await conn.run_sync(_revisions)
                if before != head:
                    await conn.run_sync(_upgrade)
        except SQLAlchemyError as exc:
            raise DatabaseError(self.unreachable(exc)) from exc
        return before, head

    def _prepare_file(self) -> None:
        """A SQLite file's directory is created (private to this user), and the file is
        created readable by its owner alone."""
        if self.path is None or os.path.exists(self.path):
            return
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as exc:
            raise DatabaseError(
                f"cannot create the database file {self.path}: {exc.strerror}. Set data_dir "
                "(or database:) in the configuration to a directory this user can write"
            ) from None


def _unreachable(exc: DBAPIError) -> bool:
    from sqlalchemy.exc import InterfaceError, OperationalError

    return isinstance(exc, OperationalError | InterfaceError)


def _alembic_config(connection: sa.Connection) -> Any:
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", MIGRATIONS)
    config.attributes["connection"] = connection
    return config


def _revisions(connection: sa.Connection) -> tuple[str | None, str, bool]:
    """(the database's revision, the newest one, whether it has none of our tables)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config(connection)).get_current_head()
    assert head is not None
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    current = context.get_current_revision()
    fresh = current is None and not sa.inspect(connection).has_table("modelpool_users")
    return current, head, fresh


def _upgrade(connection: sa.Connection) -> None:
    from alembic import command

    command.upgrade(_alembic_config(connection), "head")
