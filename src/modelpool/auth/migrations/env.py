"""Alembic's entry point for modelpool's migrations. modelpool runs them itself
(``modelpool db upgrade``, ``modelpool.auth._db``) on a connection it opened; there is no
alembic.ini to edit."""

from __future__ import annotations

from alembic import context

from modelpool.auth._db import VERSION_TABLE
from modelpool.auth._schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
