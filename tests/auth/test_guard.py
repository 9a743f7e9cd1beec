"""The per-process cache (``modelpool.auth._guard``): no database trip for a cached key,
revocation seen through the version, the database down, usage batching, rate limits and the
login throttle. The store is a real one on SQLite, wrapped to count and to fail on demand."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

import pytest

from modelpool import DatabaseError
from modelpool.auth._db import Database
from modelpool.auth._guard import Keyring, Throttle
from modelpool.auth._store import Store, Usage


class _Flaky(Store):
    """A real store that counts key lookups and can be made unreachable."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.lookups = 0
        self.down = False
        self.writing: tuple[asyncio.Event, asyncio.Event] | None = None  # (started, go on)

    def _check(self) -> None:
        if self.down:
            raise DatabaseError("cannot use the database (down on purpose)")

    async def find_key(self, key: str) -> Any:
        self._check()
        self.lookups += 1
        return await super().find_key(key)

    async def version(self) -> int:
        self._check()
        return await super().version()

    async def add_usage(self, counts: Any) -> None:
        self._check()
        if self.writing is not None:  # a write the test holds open
            self.writing[0].set()
            await self.writing[1].wait()
        await super().add_usage(counts)


def _run(tmp_path: Path, scenario: Any) -> None:
    async def main() -> None:
        db = Database(f"sqlite:///{tmp_path / 'm.db'}")
        await db.open()
        store = _Flaky(db)
        await store.add_user("ann", "a long password")
        ring = Keyring(store, poll_interval=0.05)
        await ring.start()
        try:
            await scenario(store, ring)
        finally:
            store.down = False
            await ring.stop()
            await db.close()

    asyncio.run(main())


def test_a_cached_key_costs_no_lookup_and_a_revoked_one_is_dropped_by_the_poll(
    tmp_path: Path,
) -> None:
    async def scenario(store: _Flaky, ring: Keyring) -> None:
        key, record = await store.create_key("ann")
        digest = ring.digest(key)
        for _ in range(100):
            assert (await ring.key(key, digest)) == record
        assert store.lookups == 1
        await store.revoke_key(record.prefix)  # as another process would
        started = time.monotonic()
        while ring.cached_key(digest, time.monotonic())[0]:
            assert time.monotonic() - started < 1.0, "the cache kept a revoked key for 1 s"
            await asyncio.sleep(0.01)
        found = await ring.key(key, digest)
        assert found is not None
        assert found.state(time.time()) == "revoked"

    _run(tmp_path, scenario)


def test_with_the_database_down_cached_keys_work_and_new_ones_fail_clearly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(store: _Flaky, ring: Keyring) -> None:
        key, record = await store.create_key("ann")
        other, _ = await store.create_key("ann")
        assert await ring.key(key, ring.digest(key)) == record
        store.down = True
        await ring.check_version()
        assert not ring.database_up
        assert await ring.key(key, ring.digest(key)) == record  # cached: still served
        with pytest.raises(DatabaseError):
            await ring.key(other, ring.digest(other))
        ring.count(record, error=False, rows=4)
        await ring.flush()  # cannot be written: kept for later
        assert ring.pending_usage()[record.id].rows == 4
        store.down = False
        await ring.check_version()
        assert ring.database_up
        assert not ring.cached_key(ring.digest(key), time.monotonic())[0]  # re-checked now
        await ring.flush()
        assert ring.pending_usage() == {}
        (row, _) = await store.keys("ann")
        assert (row.requests, row.rows) == (1, 4)

    with caplog.at_level("WARNING", logger="modelpool.auth"):
        _run(tmp_path, scenario)
    messages = [r.getMessage() for r in caplog.records]
    assert any("unreachable" in m for m in messages)
    assert any("answers again" in m for m in messages)


def test_the_rate_limit_is_a_token_bucket_per_key(tmp_path: Path) -> None:
    async def scenario(store: _Flaky, ring: Keyring) -> None:
        _, limited = await store.create_key("ann", rate_limit=2)
        _, free = await store.create_key("ann")
        now = 1000.0
        assert [ring.admit(limited, now) for _ in range(2)] == [0.0, 0.0]  # a 1 s burst
        wait = ring.admit(limited, now)
        assert wait == pytest.approx(0.5)
        assert ring.admit(limited, now + 0.5) == 0.0  # one token back after 1/rate
        assert all(ring.admit(free, now) == 0.0 for _ in range(1000))

    _run(tmp_path, scenario)


def test_the_throttle_blocks_after_the_limit_for_the_rest_of_the_window() -> None:
    throttle = Throttle(limit=3, window=60)
    for t in (0.0, 1.0, 2.0):
        assert throttle.blocked("ann", t) == 0.0
        throttle.failed("ann", t)
    assert throttle.blocked("ann", 3.0) == pytest.approx(57.0)
    assert throttle.blocked("bob", 3.0) == 0.0  # per name
    assert throttle.blocked("ann", 60.5) == 0.0  # the first failure left the window
    throttle.succeeded("ann")
    assert throttle.blocked("ann", 3.0) == 0.0


def test_keys_read_during_a_usage_write_count_each_use_once(tmp_path: Path) -> None:
    """The status page reads the keys' written usage and the usage counted here together: a
    flush under way (counts taken from memory, not yet in the database) makes it wait, so no
    use is shown in neither place, nor in both."""

    async def scenario(store: _Flaky, ring: Keyring) -> None:
        key, _ = await store.create_key("ann")
        record = await ring.key(key, hashlib.sha256(key.encode()).hexdigest())
        assert record is not None
        for _ in range(3):
            ring.count(record, error=False, rows=2)
        store.writing = (asyncio.Event(), asyncio.Event())
        flushing = asyncio.ensure_future(ring.flush())
        await store.writing[0].wait()  # the counts left memory; the database has not got them
        reading = asyncio.ensure_future(ring.counted_keys("ann"))
        try:
            await asyncio.sleep(0.05)
            assert not reading.done(), "the keys were read in the middle of a usage write"
        finally:
            store.writing[1].set()  # (the write goes on, whatever the check found)
        await flushing
        (written,), pending = await reading
        assert written.requests + pending.get(written.id, Usage()).requests == 3
        assert written.rows == 6

    _run(tmp_path, scenario)
