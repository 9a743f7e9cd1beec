"""The tables of the user and key database, one schema for SQLite and PostgreSQL.

Names start with ``modelpool_`` so that the tables can live in a database other applications
use too. Times are seconds since the epoch (UTC), as a double: the same type on both engines,
compared and shown without time-zone surprises. The migrations in ``migrations/versions``
create exactly these tables; a test compares the two.

Secrets are never stored: a password is an argon2id hash, an API key and a session token the
SHA-256 of the random value given to its owner once.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["api_keys", "auth_state", "metadata", "sessions", "users"]

metadata = sa.MetaData()

users = sa.Table(
    "modelpool_users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(255), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),  # admin | user
    sa.Column("disabled", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Double, nullable=False),
)

api_keys = sa.Table(
    "modelpool_api_keys",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    # the visible part of the key ("mp_" + 8 characters), unique: how a key is found and named
    sa.Column("prefix", sa.String(16), nullable=False, unique=True),
    sa.Column("key_hash", sa.String(64), nullable=False),  # SHA-256 of the whole key, hex
    sa.Column(
        "user_id",
        sa.Integer,
        sa.ForeignKey("modelpool_users.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("models", sa.Text, nullable=True),  # JSON list of model names; NULL: every model
    sa.Column("metrics", sa.Boolean, nullable=False, default=False),  # may read /metrics
    sa.Column("rate_limit", sa.Double, nullable=True),  # requests per second; NULL: none
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=True),
    sa.Column("revoked_at", sa.Double, nullable=True),
    sa.Column("requests", sa.BigInteger, nullable=False, default=0),
    sa.Column("rows", sa.BigInteger, nullable=False, default=0),
    sa.Column("errors", sa.BigInteger, nullable=False, default=0),
    sa.Column("last_used_at", sa.Double, nullable=True),
)

sessions = sa.Table(
    "modelpool_sessions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),  # SHA-256, hex
    sa.Column(
        "user_id",
        sa.Integer,
        sa.ForeignKey("modelpool_users.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("csrf", sa.String(64), nullable=False),  # the form token of this session
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),
)

#: one row (id 1): ``version`` goes up whenever a key, user or session stops being valid
#: (revoked, disabled, removed, logged out), so that every server instance drops what it
#: cached about them within its next poll
auth_state = sa.Table(
    "modelpool_auth_state",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
)
