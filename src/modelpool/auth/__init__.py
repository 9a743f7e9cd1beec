"""Users, API keys and login sessions, kept in a database (docs/security.md).

``_db`` opens the database and keeps its schema current, ``_schema`` declares its tables,
``_secrets`` makes and checks passwords, keys and tokens, ``_store`` reads and writes them,
``_cli`` is ``modelpool users|keys|db``. The server's side (checking a request's key or
session on the hot path) is ``modelpool.server._auth``.

Nothing here is imported by ``import modelpool``: SQLAlchemy and argon2 load only when
authentication is used.
"""
