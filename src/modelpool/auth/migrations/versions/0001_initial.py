"""The first schema: users, API keys, sessions and the revocation counter.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "modelpool_users",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_table(
        "modelpool_api_keys",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("prefix", sa.String(16), nullable=False, unique=True),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column(
            "user_id",
            sa.Integer,
            sa.ForeignKey("modelpool_users.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("models", sa.Text, nullable=True),
        sa.Column("metrics", sa.Boolean, nullable=False),
        sa.Column("rate_limit", sa.Double, nullable=True),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=True),
        sa.Column("revoked_at", sa.Double, nullable=True),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("rows", sa.BigInteger, nullable=False),
        sa.Column("errors", sa.BigInteger, nullable=False),
        sa.Column("last_used_at", sa.Double, nullable=True),
    )
    op.create_index("ix_modelpool_api_keys_user_id", "modelpool_api_keys", ["user_id"])
    op.create_table(
        "modelpool_sessions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column(
            "user_id",
            sa.Integer,
            sa.ForeignKey("modelpool_users.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False),
    )
    op.create_index("ix_modelpool_sessions_user_id", "modelpool_sessions", ["user_id"])
    state = op.create_table(
        "modelpool_auth_state",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(state, [{"id": 1, "version": 1}])


def downgrade() -> None:
    op.drop_table("modelpool_auth_state")
    op.drop_index("ix_modelpool_sessions_user_id", "modelpool_sessions")
    op.drop_table("modelpool_sessions")
    op.drop_index("ix_modelpool_api_keys_user_id", "modelpool_api_keys")
    op.drop_table("modelpool_api_keys")
    op.drop_table("modelpool_users")
