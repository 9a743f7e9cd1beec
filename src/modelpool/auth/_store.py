"""Users, API keys and sessions in the database: every read and write of them, in one place.

Every query is built by SQLAlchemy with bound parameters; no value given by a user is ever
part of SQL text. Each change that takes access away (a key revoked, a user disabled or
removed, a password changed, a logout) also raises ``auth_state.version`` in the same
transaction, which is how the server instances sharing the database learn to forget what they
cached (``modelpool.auth._guard``).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from modelpool._exceptions import DatabaseError

from . import _secrets
from ._db import Database
from ._schema import api_keys, auth_state, sessions, users

__all__ = ["KeyRecord", "Store", "Usage", "User", "check_name", "check_password_rules"]

_USER_NAME = re.compile(r"[A-Za-z0-9_.@+-]{1,64}")
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
ROLES = ("admin", "user")


def check_name(name: str) -> str:
    if not _USER_NAME.fullmatch(name):
        raise ValueError(
            f"user name {name[:80]!r} is not allowed: use 1 to 64 letters, digits or . _ @ + -"
        )
    return name


def check_password_rules(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"the password is too short: use at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise ValueError(f"the password is too long: use at most {MAX_PASSWORD} characters")
    return password


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: str
    disabled: bool
    created_at: float
    keys: int = 0  # API keys not revoked

    @property
    def admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class KeyRecord:
    """What the database knows of one API key (never the key itself)."""

    id: int
    prefix: str
    user: str
    role: str
    user_disabled: bool
    models: tuple[str, ...] | None  # None: every model
    metrics: bool
    rate_limit: float | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    requests: int
    rows: int
    errors: int
    last_used_at: float | None

    def state(self, now: float) -> str:
        """active, revoked, expired or user disabled."""
        if self.revoked_at is not None:
            return "revoked"
        if self.user_disabled:
            return "user disabled"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"


@dataclass(slots=True)
class Usage:
    """Counts to add to one key's usage."""

    requests: int = 0
    rows: int = 0
    errors: int = 0
    last_used_at: float = 0.0


_KEY_COLUMNS = (
    api_keys.c.id,
    api_keys.c.prefix,
    api_keys.c.key_hash,
    users.c.name,
    users.c.role,
    users.c.disabled,
    api_keys.c.models,
    api_keys.c.metrics,
    api_keys.c.rate_limit,
    api_keys.c.created_at,
    api_keys.c.expires_at,
    api_keys.c.revoked_at,
    api_keys.c.requests,
    api_keys.c.rows,
    api_keys.c.errors,
    api_keys.c.last_used_at,
)


def _key_record(row: Any) -> KeyRecord:
    models = json.loads(row.models) if row.models is not None else None
    return KeyRecord(
        id=row.id,
        prefix=row.prefix,
        user=row.name,
        role=row.role,
        user_disabled=bool(row.disabled),
        models=tuple(models) if models is not None else None,
        metrics=bool(row.metrics),
        rate_limit=row.rate_limit,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        requests=row.requests,
        rows=row.rows,
        errors=row.errors,
        last_used_at=row.last_used_at,
    )


class Store:
    """Reads and writes of users, keys and sessions, on one ``Database``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # ------------------------------------------------------------------ users

    async def add_user(self, name: str, password: str, *, admin: bool = False) -> User:
        check_name(name)
        check_password_rules(password)
        hashed = await asyncio.to_thread(_secrets.hash_password, password)
        now = time.time()
        role = "admin" if admin else "user"
        row = {"name": name, "password_hash": hashed, "role": role, "disabled": False}
        try:
            async with self.db.begin() as conn:
                result = await conn.execute(sa.insert(users).values(**row, created_at=now))
        except IntegrityError:
            raise DatabaseError(f"a user named {name!r} already exists") from None
        key = result.inserted_primary_key
        assert key is not None
        return User(int(key[0]), name, role, False, now)

    async def users(self) -> list[User]:
        live = sa.func.count(api_keys.c.id).filter(api_keys.c.revoked_at.is_(None))
        query = (
            sa.select(users, live.label("keys"))
            .select_from(users.outerjoin(api_keys, api_keys.c.user_id == users.c.id))
            .group_by(users.c.id)
            .order_by(users.c.name)
        )
        async with self.db.begin() as conn:
            rows = (await conn.execute(query)).all()
        return [
            User(r.id, r.name, r.role, bool(r.disabled), r.created_at, r.keys or 0) for r in rows
        ]

    async def user(self, name: str) -> User:
        async with self.db.begin() as conn:
            row = (await conn.execute(sa.select(users).where(users.c.name == name))).first()
        if row is None:
            raise DatabaseError(_no_user(name))
        return User(row.id, row.name, row.role, bool(row.disabled), row.created_at)

    async def set_disabled(self, name: str, disabled: bool) -> None:
        await self._change_user(name, sa.update(users).values(disabled=disabled))
        if disabled:  # their sessions end; their keys stop working while disabled
            async with self.db.begin() as conn:
                user_id = sa.select(users.c.id).where(users.c.name == name).scalar_subquery()
                await conn.execute(sa.delete(sessions).where(sessions.c.user_id == user_id))

    async def set_password(self, name: str, password: str) -> None:
        check_password_rules(password)
        hashed = await asyncio.to_thread(_secrets.hash_password, password)
        await self._change_user(name, sa.update(users).values(password_hash=hashed))
        async with self.db.begin() as conn:  # every session of theirs ends
            user_id = sa.select(users.c.id).where(users.c.name == name).scalar_subquery()
            await conn.execute(sa.delete(sessions).where(sessions.c.user_id == user_id))

    async def remove_user(self, name: str) -> None:
        """Removes the user with their keys and sessions."""
        async with self.db.begin() as conn:
            row = (await conn.execute(sa.select(users.c.id).where(users.c.name == name))).first()
            if row is None:
                raise DatabaseError(_no_user(name))
            # (explicitly: a database without foreign-key enforcement must not keep them)
            await conn.execute(sa.delete(api_keys).where(api_keys.c.user_id == row.id))
            await conn.execute(sa.delete(sessions).where(sessions.c.user_id == row.id))
            await conn.execute(sa.delete(users).where(users.c.id == row.id))
            await _bump(conn)

    async def _change_user(self, name: str, statement: sa.Update) -> None:
        async with self.db.begin() as conn:
            result = await conn.execute(statement.where(users.c.name == name))
            if result.rowcount == 0:
                raise DatabaseError(_no_user(name))
            await _bump(conn)

    async def login(self, name: str, password: str) -> User | None:
        """The user, if ``password`` is theirs and they are not disabled; else None. The same
        work is done whether or not the account exists."""
        async with self.db.begin() as conn:
            row = (await conn.execute(sa.select(users).where(users.c.name == name))).first()
        stored = row.password_hash if row is not None else None
        ok = await asyncio.to_thread(_secrets.check_password, stored, password)
        if not ok or row is None or row.disabled:
            return None
        return User(row.id, row.name, row.role, False, row.created_at)

    # ------------------------------------------------------------------ keys

    async def create_key(
        self,
        user: str,
        *,
        models: Iterable[str] | None = None,
        expires_in: float | None = None,
        rate_limit: float | None = None,
        metrics: bool = False,
    ) -> tuple[str, KeyRecord]:
        """A new key for ``user``: (the key, shown once; its record)."""
        names = None
        if models is not None:
            names = sorted(set(models))
            for model in names:
                if not _MODEL_NAME.fullmatch(model):
                    raise ValueError(f"{model[:80]!r} is not a model name")
            if not names:
                raise ValueError("--models names no model; leave it out for every model")
        if rate_limit is not None and not rate_limit > 0:
            raise ValueError("the rate limit must be more than 0 requests per second")
        now = time.time()
        async with self.db.begin() as conn:
            owner = (await conn.execute(sa.select(users).where(users.c.name == user))).first()
            if owner is None:
                raise DatabaseError(_no_user(user))
            for _attempt in range(5):  # a prefix is 8 random characters: a clash is rare
                key, prefix = _secrets.new_key()
                taken = await conn.scalar(
                    sa.select(api_keys.c.id).where(api_keys.c.prefix == prefix)
                )
                if taken is None:
                    break
            values = {
                "prefix": prefix,
                "key_hash": _secrets.digest(key),
                "user_id": owner.id,
                "models": json.dumps(names) if names is not None else None,
                "metrics": metrics,
                "rate_limit": rate_limit,
                "created_at": now,
                "expires_at": now + expires_in if expires_in is not None else None,
                "revoked_at": None,
                "requests": 0,
                "rows": 0,
                "errors": 0,
            }
            await conn.execute(sa.insert(api_keys).values(**values))
        record = await self.find_prefix(prefix)
        assert record is not None
        return key, record

    async def keys(self, user: str | None = None) -> list[KeyRecord]:
        query = sa.select(*_KEY_COLUMNS).select_from(api_keys.join(users))
        if user is not None:
            query = query.where(users.c.name == user)
        async with self.db.begin() as conn:
            rows = (await conn.execute(query.order_by(api_keys.c.id))).all()
        return [_key_record(r) for r in rows]

    async def find_prefix(self, prefix: str) -> KeyRecord | None:
        query = sa.select(*_KEY_COLUMNS).select_from(api_keys.join(users))
        async with self.db.begin() as conn:
            row = (await conn.execute(query.where(api_keys.c.prefix == prefix))).first()
        return _key_record(row) if row is not None else None

    async def find_key(self, key: str) -> KeyRecord | None:
        """The record of ``key``, if it is one of ours (whatever its state); else None. The
        hash is compared in constant time."""
        prefix = _secrets.key_prefix(key)
        if prefix is None:
            return None
        query = sa.select(*_KEY_COLUMNS).select_from(api_keys.join(users))
        async with self.db.begin() as conn:
            row = (await conn.execute(query.where(api_keys.c.prefix == prefix))).first()
        stored = row.key_hash if row is not None else "0" * 64
        if not _secrets.same(stored, _secrets.digest(key)) or row is None:
            return None
        return _key_record(row)

    async def revoke_key(self, ident: str) -> KeyRecord:
        """Revoke a key named by its id or its prefix; returns its record (revoked)."""
        column = api_keys.c.id if ident.isdigit() else api_keys.c.prefix
        value: Any = int(ident) if ident.isdigit() else ident
        async with self.db.begin() as conn:
            row = (await conn.execute(sa.select(api_keys).where(column == value))).first()
            if row is None:
                raise DatabaseError(
                    f"no API key {ident!r}: `modelpool keys list` shows each key's ID and prefix"
                )
            if row.revoked_at is None:
                await conn.execute(
                    sa.update(api_keys)
                    .where(api_keys.c.id == row.id)
                    .values(revoked_at=time.time())
                )
                await _bump(conn)
        record = await self.find_prefix(row.prefix)
        assert record is not None
        return record

    async def add_usage(self, counts: Mapping[int, Usage]) -> None:
        """Add ``counts`` (key id -> usage) to the keys' totals, in one transaction."""
        if not counts:
            return
        async with self.db.begin() as conn:
            for key_id, usage in counts.items():
                last = sa.func.coalesce(api_keys.c.last_used_at, 0.0)
                await conn.execute(
                    sa.update(api_keys)
                    .where(api_keys.c.id == key_id)
                    .values(
                        requests=api_keys.c.requests + usage.requests,
                        rows=api_keys.c.rows + usage.rows,
                        errors=api_keys.c.errors + usage.errors,
                        last_used_at=sa.case(
                            (last < usage.last_used_at, usage.last_used_at),
                            else_=api_keys.c.last_used_at,
                        ),
                    )
                )

    # ------------------------------------------------------------------ sessions

    async def start_session(self, user: User, ttl: float) -> tuple[str, str]:
        """A new session for ``user``: (its token, for the cookie; its CSRF token)."""
        token, csrf = _secrets.new_token(), _secrets.new_token()
        now = time.time()
        async with self.db.begin() as conn:
            await conn.execute(sa.delete(sessions).where(sessions.c.expires_at <= now))
            await conn.execute(
                sa.insert(sessions).values(
                    token_hash=_secrets.digest(token),
                    user_id=user.id,
                    csrf=csrf,
                    created_at=now,
                    expires_at=now + ttl,
                )
            )
        return token, csrf

    async def session(self, token: str) -> tuple[User, str, float] | None:
        """(user, CSRF token, expiry) of a live session, else None."""
        query = (
            sa.select(users, sessions.c.csrf, sessions.c.expires_at)
            .select_from(sessions.join(users))
            .where(sessions.c.token_hash == _secrets.digest(token))
        )
        async with self.db.begin() as conn:
            row = (await conn.execute(query)).first()
        if row is None or row.disabled or row.expires_at <= time.time():
            return None
        user = User(row.id, row.name, row.role, False, row.created_at)
        return user, row.csrf, row.expires_at

    async def end_session(self, token: str) -> None:
        async with self.db.begin() as conn:
            await conn.execute(
                sa.delete(sessions).where(sessions.c.token_hash == _secrets.digest(token))
            )
            await _bump(conn)

    # ------------------------------------------------------------------ revocation

    async def version(self) -> int:
        async with self.db.begin() as conn:
            return int(await conn.scalar(sa.select(auth_state.c.version)) or 0)


async def _bump(conn: Any) -> None:
    await conn.execute(
        sa.update(auth_state).where(auth_state.c.id == 1).values(version=auth_state.c.version + 1)
    )


def _no_user(name: str) -> str:
    return f"no user named {name!r}: `modelpool users list` shows them"
