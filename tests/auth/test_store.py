"""The database layer (``modelpool.auth._db``, ``_store``), on SQLite and on a real
PostgreSQL server: every test runs on both (``database_url``)."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import sqlalchemy as sa

from _accounts import store_do
from modelpool import DatabaseError
from modelpool.auth import _secrets
from modelpool.auth._db import VERSION_TABLE, Database
from modelpool.auth._schema import api_keys, metadata, users
from modelpool.auth._store import Store, Usage


def test_a_fresh_database_gets_the_current_schema_and_the_migrations_match_the_tables(
    database_url: str,
) -> None:
    """First use creates the tables through the migrations; what they create is exactly what
    ``_schema`` declares (Alembic's own comparison finds no difference)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    async def check(store: Store) -> list[Any]:
        async with store.db.begin() as conn:

            def diff(sync: sa.Connection) -> list[Any]:
                context = MigrationContext.configure(sync, opts={"version_table": VERSION_TABLE})
                return list(compare_metadata(context, metadata))

            return await conn.run_sync(diff)

    assert store_do(database_url, check) == []
    if database_url.startswith("sqlite"):  # the file and its directory are the owner's alone
        path = database_url.removeprefix("sqlite:///")
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700


def test_a_database_behind_the_schema_is_refused_until_upgraded(database_url: str) -> None:
    async def downgrade(store: Store) -> None:
        async with store.db.begin() as conn:
            await conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '0000'"))

    store_do(database_url, downgrade)
    with pytest.raises(DatabaseError, match=r"revision 0000.*modelpool db upgrade"):
        store_do(database_url, lambda store: store.version())


def test_users_are_added_listed_disabled_and_removed_with_their_keys(database_url: str) -> None:
    async def scenario(store: Store) -> None:
        alice = await store.add_user("alice", "correct horse", admin=True)
        await store.add_user("bob", "battery staple")
        assert alice.admin
        with pytest.raises(DatabaseError, match="already exists"):
            await store.add_user("alice", "another password")
        key, _ = await store.create_key("bob")
        listed = {u.name: u for u in await store.users()}
        assert set(listed) == {"alice", "bob"}
        assert (listed["alice"].role, listed["bob"].role, listed["bob"].keys) == (
            "admin",
            "user",
            1,
        )

        assert await store.login("bob", "battery staple") is not None
        assert await store.login("bob", "wrong password") is None
        assert await store.login("nobody", "battery staple") is None

        await store.set_disabled("bob", True)
        assert await store.login("bob", "battery staple") is None
        record = await store.find_key(key)
        assert record is not None
        assert record.state(time.time()) == "user disabled"
        await store.set_disabled("bob", False)
        assert await store.login("bob", "battery staple") is not None

        await store.remove_user("bob")
        assert await store.find_key(key) is None
        assert [u.name for u in await store.users()] == ["alice"]
        with pytest.raises(DatabaseError, match="no user named 'bob'"):
            await store.remove_user("bob")

    store_do(database_url, scenario)


def test_only_hashes_are_stored_and_a_key_is_found_by_its_whole_value(database_url: str) -> None:
    async def scenario(store: Store) -> None:
        await store.add_user("carol", "a long password")
        key, record = await store.create_key("carol", models=["b", "a"], rate_limit=3.5)
        assert record.models == ("a", "b")
        assert record.rate_limit == 3.5
        assert key.startswith(record.prefix + "_")
        assert len(key) > 50
        async with store.db.begin() as conn:
            rows = (await conn.execute(sa.select(api_keys))).all()
            stored = (await conn.execute(sa.select(users.c.password_hash))).scalar_one()
        assert key not in str(rows)
        assert rows[0].key_hash == _secrets.digest(key)
        assert stored.startswith("$argon2id$")
        assert "a long password" not in stored
        assert (await store.find_key(key)) == record
        assert await store.find_key(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
        assert await store.find_key(record.prefix) is None  # the visible part alone is nothing

    store_do(database_url, scenario)


def test_revoking_expiring_and_every_loss_of_access_moves_the_version(database_url: str) -> None:
    async def scenario(store: Store) -> None:
        await store.add_user("dave", "a long password")
        version = await store.version()
        key, record = await store.create_key("dave", expires_in=60)
        assert await store.version() == version  # a new key takes nothing away
        found = await store.find_key(key)
        assert found is not None
        assert found.expires_at is not None
        assert found.state(found.expires_at - 1) == "active"  # (judged at a given time)
        assert found.state(found.expires_at) == "expired"
        _other, record = await store.create_key("dave")
        revoked = await store.revoke_key(record.prefix)
        assert revoked.state(time.time()) == "revoked"
        assert await store.version() == version + 1
        await store.revoke_key(str(record.id))  # again, by id: nothing changes
        assert await store.version() == version + 1
        await store.set_disabled("dave", True)
        await store.set_password("dave", "another long one")
        assert await store.version() == version + 3
        with pytest.raises(DatabaseError, match="no API key 'mp_nothing'"):
            await store.revoke_key("mp_nothing")

    store_do(database_url, scenario)


def test_usage_adds_up_and_sessions_start_and_end(database_url: str) -> None:
    async def scenario(store: Store) -> None:
        erin = await store.add_user("erin", "a long password")
        _, record = await store.create_key("erin")
        await store.add_usage({record.id: Usage(3, 12, 1, 1000.0)})
        await store.add_usage({record.id: Usage(2, 2, 0, 900.0)})  # an older flush, later
        (after,) = await store.keys("erin")
        assert (after.requests, after.rows, after.errors, after.last_used_at) == (5, 14, 1, 1000.0)

        token, csrf = await store.start_session(erin, ttl=60)
        found = await store.session(token)
        assert found is not None
        assert found[0].name == "erin"
        assert found[1] == csrf
        assert await store.session(token + "x") is None
        await store.end_session(token)
        assert await store.session(token) is None
        short, _ = await store.start_session(erin, ttl=0.01)
        deadline = time.monotonic() + 30
        while await store.session(short) is not None:  # until it has expired
            assert time.monotonic() < deadline, "a 10 ms session was still live after 30 s"

    store_do(database_url, scenario)


INJECTIONS = [
    "x' OR '1'='1",
    "'; DROP TABLE modelpool_users; --",
    'robert"); DROP TABLE modelpool_api_keys;--',
    "\\' UNION SELECT password_hash FROM modelpool_users --",
]


@pytest.mark.parametrize("attack", INJECTIONS)
def test_sql_injection_in_every_field_is_inert(database_url: str, attack: str) -> None:
    """Values go to the database as bound parameters: an attack in a name, a password, a key,
    a session token or a key id is a value that matches nothing (or is refused as a name),
    and every table is intact afterwards."""

    async def scenario(store: Store) -> None:
        await store.add_user("frank", "a long password")
        with pytest.raises(ValueError, match="not allowed"):
            await store.add_user(attack, "a long password")
        assert await store.login(attack, attack + "long enough") is None
        assert await store.login("frank", attack) is None
        assert await store.find_key(attack) is None
        assert await store.find_key(f"mp_abcdefgh_{attack}") is None
        assert await store.session(attack) is None
        with pytest.raises(DatabaseError):
            await store.revoke_key(attack)
        with pytest.raises(ValueError, match="not a model name"):
            await store.create_key("frank", models=[attack])
        assert [u.name for u in await store.users()] == ["frank"]
        assert await store.keys() == []

    store_do(database_url, scenario)


def test_an_unreachable_database_is_a_clear_error_without_the_password(postgres: Any) -> None:
    url = f"postgresql://someone:s3cret-pw@127.0.0.1:{postgres.port + 1}/nothing"
    with pytest.raises(DatabaseError) as info:
        store_do(url, lambda store: store.version())
    message = str(info.value)
    assert "cannot use the database postgresql://someone:***@127.0.0.1" in message
    assert "s3cret-pw" not in message


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("mysql://x/y", "SQLite or PostgreSQL"),
        ("sqlite://", "name a file"),
        ("sqlite:///:memory:", "name a file"),
        ("not a url", "is not a database URL"),
    ],
)
def test_database_urls_that_cannot_work_say_what_to_write(url: str, words: str) -> None:
    with pytest.raises(DatabaseError, match=words):
        Database(url)


def test_a_sqlite_file_that_cannot_be_created_says_where(tmp_path: Any) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DatabaseError, match="cannot create the database file"):
        store_do(f"sqlite:///{blocker}/sub/modelpool.db", lambda store: store.version())
