"""``modelpool users``, ``modelpool keys`` and ``modelpool db``: accounts and API keys from the
command line. Each finds the database through ``--config FILE`` (its ``database:`` or
``data_dir:``), else the default SQLite file in the data directory.

Passwords are never arguments (they would sit in shell history and ``ps``): they are read from
a prompt, or from the first line of stdin when stdin is not a terminal. A new API key is shown
once, alone on the last line of ``keys create``'s output, so that scripts can take it with
``tail -n 1``.
"""

from __future__ import annotations

import asyncio
import datetime
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

__all__ = ["db", "keys", "users"]

T = TypeVar("T")

_config_option = click.option(
    "--config",
    "config_path",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="modelpool YAML file whose database: (or data_dir:) to use.",
)


class _Failed(click.ClickException):
    """``Error: <message>``, exit status 1 (a usage error is 2, as click's own)."""


class _Usage(click.ClickException):
    exit_code = 2


def _run(
    config_path: str | None, action: Callable[[Any], Awaitable[T]], *, check: bool = True
) -> T:
    """Open the database named by ``config_path`` (``check``: and check its schema) and run
    ``action(store)`` on it."""
    from modelpool._exceptions import ConfigError, DatabaseError
    from modelpool.config import load_config

    from ._db import Database, database_url
    from ._store import Store

    try:
        config = load_config(config_path) if config_path else None
    except ConfigError as exc:
        raise _Usage(str(exc)) from None

    async def main() -> T:
        db = Database(database_url(config))
        try:
            if check:
                await db.open()
            return await action(Store(db))
        finally:
            await db.close()

    try:
        return asyncio.run(main())
    except DatabaseError as exc:
        raise _Failed(str(exc)) from None
    except ValueError as exc:  # a name, a password or a model list that is not allowed
        raise _Usage(str(exc)) from None


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    for line in [header, *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def _read_password(confirm: bool) -> str:
    if sys.stdin.isatty():
        return str(click.prompt("Password", hide_input=True, confirmation_prompt=confirm))
    line = sys.stdin.readline()
    if not line:
        raise _Usage("no password on stdin: pipe one line, or run this in a terminal to be asked")
    return line.rstrip("\r\n")


# ---------------------------------------------------------------------- users


@click.group()
def users() -> None:
    """Accounts: people who log in, and whose API keys programs use."""


@users.command("add")
@click.argument("name")
@click.option("--admin", is_flag=True, help="May use the admin endpoints and read everything.")
@_config_option
def users_add(name: str, admin: bool, config_path: str | None) -> None:
    """Add the user NAME. The password is asked for (or read from stdin's first line)."""
    from ._store import check_name, check_password_rules

    try:
        check_name(name)
        password = check_password_rules(_read_password(confirm=True))
    except ValueError as exc:
        raise _Usage(str(exc)) from None
    user = _run(config_path, lambda store: store.add_user(name, password, admin=admin))
    click.echo(f"added {user.role} {user.name!r}")


@users.command("list")
@_config_option
def users_list(config_path: str | None) -> None:
    """Every user, with their role, state and number of live API keys."""
    found = _run(config_path, lambda store: store.users())
    rows = [
        [u.name, u.role, "disabled" if u.disabled else "active", str(u.keys), _when(u.created_at)]
        for u in found
    ]
    _table(["NAME", "ROLE", "STATE", "KEYS", "CREATED"], rows)
    if not found:
        click.echo("(no users yet: modelpool users add NAME --admin)")


@users.command("disable")
@click.argument("name")
@_config_option
def users_disable(name: str, config_path: str | None) -> None:
    """Stop NAME logging in and their keys working (until enabled again)."""
    _run(config_path, lambda store: store.set_disabled(name, True))
    click.echo(f"disabled {name!r}: their sessions ended and their keys stop working")


@users.command("enable")
@click.argument("name")
@_config_option
def users_enable(name: str, config_path: str | None) -> None:
    """Let a disabled user in again."""
    _run(config_path, lambda store: store.set_disabled(name, False))
    click.echo(f"enabled {name!r}")


@users.command("passwd")
@click.argument("name")
@_config_option
def users_passwd(name: str, config_path: str | None) -> None:
    """Set NAME's password (asked for, or read from stdin); their sessions end."""
    from ._store import check_password_rules

    try:
        password = check_password_rules(_read_password(confirm=True))
    except ValueError as exc:
        raise _Usage(str(exc)) from None
    _run(config_path, lambda store: store.set_password(name, password))
    click.echo(f"password of {name!r} changed; their sessions ended")


@users.command("remove")
@click.argument("name")
@_config_option
def users_remove(name: str, config_path: str | None) -> None:
    """Remove NAME, with their API keys and sessions."""
    _run(config_path, lambda store: store.remove_user(name))
    click.echo(f"removed {name!r} and their keys")


# ---------------------------------------------------------------------- keys


@click.group()
def keys() -> None:
    """API keys: how programs call the server (Authorization: Bearer KEY)."""


def _models(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [m.strip() for m in value.split(",") if m.strip()]


@keys.command("create")
@click.option("--user", "user", required=True, help="The key's owner (an existing user).")
@click.option("--models", metavar="A,B", help="Only these models (default: every model).")
@click.option("--expires", metavar="DURATION", help="Lifetime, e.g. 30d, 12h (default: none).")
@click.option(
    "--rate", type=click.FloatRange(min=0, min_open=True), help="Requests per second allowed."
)
@click.option("--metrics", is_flag=True, help="May also read /metrics (auth.metrics: key).")
@_config_option
def keys_create(
    user: str,
    models: str | None,
    expires: str | None,
    rate: float | None,
    metrics: bool,
    config_path: str | None,
) -> None:
    """Create an API key for --user. The key is shown once, alone on the last line."""
    from modelpool.config import load_config, parse_duration

    try:
        expires_in = parse_duration(expires) if expires is not None else None
    except ValueError as exc:
        raise _Usage(f"--expires: {exc}") from None
    names = _models(models)
    if names is not None and config_path:
        known = load_config(config_path).models
        unknown = [m for m in names if m not in known]
        if unknown:
            raise _Usage(
                f"--models: {', '.join(unknown)} not in {config_path} "
                f"(its models: {', '.join(known)})"
            )
    key, record = _run(
        config_path,
        lambda store: store.create_key(
            user, models=names, expires_in=expires_in, rate_limit=rate, metrics=metrics
        ),
    )
    click.echo(f"created key {record.id} ({record.prefix}) for {record.user!r}")
    click.echo(f"  models:  {', '.join(record.models) if record.models else 'all'}")
    click.echo(f"  expires: {_when(record.expires_at) if record.expires_at else 'never'}")
    if record.rate_limit is not None:
        click.echo(f"  rate:    {record.rate_limit:g} requests/s")
    click.echo("The key is shown once; only its hash is stored. Send it as Authorization: Bearer")
    click.echo(key)


@keys.command("list")
@click.option("--user", "user", help="Only this user's keys.")
@_config_option
def keys_list(user: str | None, config_path: str | None) -> None:
    """Every key (never the key itself): owner, models, state and usage."""
    found = _run(config_path, lambda store: store.keys(user))
    now = time.time()
    rows = [
        [
            str(k.id),
            k.prefix,
            k.user,
            ",".join(k.models) if k.models else "all",
            k.state(now),
            _when(k.expires_at),
            f"{k.rate_limit:g}/s" if k.rate_limit is not None else "-",
            str(k.requests),
            str(k.rows),
            str(k.errors),
            _when(k.last_used_at),
        ]
        for k in found
    ]
    header = ["ID", "PREFIX", "USER", "MODELS", "STATE", "EXPIRES", "RATE", "REQUESTS", "ROWS"]
    _table([*header, "ERRORS", "LAST USED"], rows)


@keys.command("revoke")
@click.argument("ident", metavar="ID")
@_config_option
def keys_revoke(ident: str, config_path: str | None) -> None:
    """Revoke the key ID (its number or its prefix, as `keys list` shows): every server
    sharing the database refuses it within a second."""
    record = _run(config_path, lambda store: store.revoke_key(ident))
    click.echo(f"revoked key {record.id} ({record.prefix}) of {record.user!r}")


# ---------------------------------------------------------------------- db


@click.group()
def db() -> None:
    """The user and key database."""


@db.command("upgrade")
@_config_option
def db_upgrade(config_path: str | None) -> None:
    """Create the database's tables, or migrate them to this version's schema."""

    async def upgrade(store: Any) -> tuple[str, str | None, str]:
        return (store.db.shown, *await store.db.upgrade())

    shown, before, now = _run(config_path, upgrade, check=False)
    if before == now:
        click.echo(f"{shown}: already at schema revision {now}")
    else:
        click.echo(f"{shown}: schema revision {before or 'none'} -> {now}")
