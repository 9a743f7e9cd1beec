"""What a server instance keeps in memory so that checking a request costs no database trip.

* **Keys and sessions** are looked up once and cached by the SHA-256 of the secret (the
  secret itself is not kept). A request with a cached key costs a hash and a dict lookup.
* **Revocation**: every ``POLL_INTERVAL`` seconds one tiny query reads ``auth_state.version``;
  when another process revoked a key, disabled or removed a user or ended a session, the
  version moved and the whole cache is dropped, so a revoked key stops working within a
  second on every instance sharing the database.
* **Usage** (requests, rows, errors, last use per key) is counted here and added to the
  database in one transaction every ``FLUSH_INTERVAL`` seconds, and at shutdown.
* **Rate limits**: a token bucket per key (its ``rate_limit`` requests per second, a burst of
  one second's worth), per process.
* **The database down**: cached keys and sessions keep working; a lookup that misses the
  cache fails with ``DatabaseError`` (the server answers 503); polling goes on and the cache
  is dropped once the database answers again, in case something was revoked meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from typing import Any

from ._store import KeyRecord, Store, Usage, User

__all__ = ["FLUSH_INTERVAL", "POLL_INTERVAL", "Keyring", "Throttle"]

log = logging.getLogger("modelpool.auth")

POLL_INTERVAL = 0.25
FLUSH_INTERVAL = 2.0
#: entries kept per cache; past it the oldest go (a flood of made-up keys cannot grow it)
CACHE_SIZE = 10_000
#: a key or session looked up this long ago is looked up again (its user may have changed
#: role, a key its models, by a path that did not move the version)
RECHECK_AFTER = 60.0


class _Bucket:
    __slots__ = ("rate", "stamp", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.tokens = max(rate, 1.0)  # a burst of one second's worth (at least one request)
        self.stamp = now

    def take(self, now: float) -> float:
        """0.0 when a request may go now, else the seconds until one may."""
        capacity = max(self.rate, 1.0)
        self.tokens = min(capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Keyring:
    """The per-process cache of keys and sessions, with its revocation poll and usage
    flush (``start`` / ``stop`` on the server's event loop)."""

    def __init__(self, store: Store, *, poll_interval: float = POLL_INTERVAL) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self._keys: OrderedDict[str, tuple[KeyRecord | None, float]] = OrderedDict()
        self._sessions: OrderedDict[str, tuple[tuple[User, str, float] | None, float]] = (
            OrderedDict()
        )
        self._buckets: dict[int, _Bucket] = {}
        self._usage: dict[int, Usage] = {}
        #: held while usage is written: a reader of the written and the pending counts
        #: (``counted_keys``) never sees counts in neither, nor in both
        self._writing = asyncio.Lock()
        self._version: int | None = None
        #: goes up each time the cache is dropped: what others derived from it is stale then
        self.generation = 0
        self._dropped_at = time.monotonic()
        self.database_up = True
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._version = await self.store.version()
        self._tasks = [
            asyncio.create_task(self._poll(), name="modelpool auth: revocation poll"),
            asyncio.create_task(self._flush_loop(), name="modelpool auth: usage"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.flush()

    # ------------------------------------------------------------------ keys

    @staticmethod
    def digest(secret: str) -> str:
        return hashlib.sha256(secret.encode()).hexdigest()

    def cached_key(self, digest: str, now: float) -> tuple[bool, KeyRecord | None]:
        """(found in the cache, the record or None for a key that is not ours)."""
        entry = self._keys.get(digest)
        if entry is None or now - entry[1] > RECHECK_AFTER:
            return False, None
        return True, entry[0]

    async def key(self, key: str, digest: str) -> KeyRecord | None:
        """``key``'s record, from the cache or the database (``DatabaseError`` when the
        database cannot be reached)."""
        now = time.monotonic()
        found, record = self.cached_key(digest, now)
        if found:
            return record
        record = await self.store.find_key(key)
        self._remember(self._keys, digest, record, now)
        return record

    # ------------------------------------------------------------------ sessions

    async def session(self, token: str) -> tuple[User, str, float] | None:
        """(user, CSRF token, expiry, wall clock) of a live session, else None."""
        digest = self.digest(token)
        now = time.monotonic()
        entry = self._sessions.get(digest)
        if entry is not None and now - entry[1] <= RECHECK_AFTER:
            found = entry[0]
        else:
            found = await self.store.session(token)
            self._remember(self._sessions, digest, found, now)
        if found is not None and found[2] <= time.time():
            return None
        return found

    def forget_session(self, token: str) -> None:
        self._sessions.pop(self.digest(token), None)

    @staticmethod
    def _remember(cache: OrderedDict[str, Any], digest: str, value: Any, now: float) -> None:
        cache[digest] = (value, now)
        cache.move_to_end(digest)
        while len(cache) > CACHE_SIZE:
            cache.popitem(last=False)

    # ------------------------------------------------------------------ rate and usage

    def admit(self, record: KeyRecord, now: float) -> float:
        """0.0 when ``record``'s rate limit lets a request through now, else seconds to wait."""
        if record.rate_limit is None:
            return 0.0
        bucket = self._buckets.get(record.id)
        if bucket is None or bucket.rate != record.rate_limit:
            bucket = self._buckets[record.id] = _Bucket(record.rate_limit, now)
        return bucket.take(now)

    def count(self, record: KeyRecord, error: bool, rows: int = 0) -> None:
        """Count one request with ``record`` as it ends (``error``: answered 400 or above).
        The time of last use is taken at the next flush, when ``requests`` moved."""
        usage = self._usage.get(record.id)
        if usage is None:
            usage = self._usage[record.id] = Usage()
        usage.requests += 1
        usage.rows += rows
        usage.errors += error

    def pending_usage(self) -> dict[int, Usage]:
        """Counts not yet written to the database (key id -> usage; ``last_used_at`` is 0.0
        until the next flush)."""
        return dict(self._usage)

    async def counted_keys(self, user: str | None) -> tuple[list[KeyRecord], dict[int, Usage]]:
        """``user``'s keys (None: every key) as the database has them, and the usage counted
        here and not yet written, read together (no flush in between)."""
        async with self._writing:
            return await self.store.keys(user), self.pending_usage()

    async def flush(self) -> None:
        """Write the counted usage to the database; kept for the next flush if it is down."""
        async with self._writing:
            await self._flush()

    async def _flush(self) -> None:
        usage, self._usage = self._usage, {}
        flushed_at = time.time()
        for counts in usage.values():
            if counts.requests and not counts.last_used_at:
                counts.last_used_at = flushed_at  # (used since the last flush: within 2 s)
        try:
            await self.store.add_usage(usage)
        except Exception:
            for key_id, counts in usage.items():  # merge back, to try again
                now = self._usage.setdefault(key_id, Usage())
                now.requests += counts.requests
                now.rows += counts.rows
                now.errors += counts.errors
                now.last_used_at = max(now.last_used_at, counts.last_used_at)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self.flush()
            except Exception:  # a bug: logged, and the counts are tried again next time
                log.exception("could not write the API keys' usage")

    # ------------------------------------------------------------------ revocation

    def drop_cache(self) -> None:
        self._keys.clear()
        self._sessions.clear()
        self.generation += 1
        self._dropped_at = time.monotonic()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            await self.check_version()

    async def check_version(self) -> None:
        """Read the revocation counter; drop the cache when it moved (or when the database
        answers again after an outage)."""
        try:
            version = await self.store.version()
        except Exception as exc:  # (anything: the poll must outlive every failure)
            if self.database_up:
                log.warning(
                    "the authentication database is unreachable (%s); cached keys "
                    "and sessions keep working, new ones cannot be checked",
                    exc,
                )
            self.database_up = False
            return
        if not self.database_up:
            log.warning("the authentication database answers again")
            self.database_up = True
            self.drop_cache()
        if version != self._version:
            self._version = version
            self.drop_cache()
        elif time.monotonic() - self._dropped_at > RECHECK_AFTER:
            self.drop_cache()  # now and then, everything is looked up again


class Throttle:
    """Failed attempts per name (an account, a client address) within a sliding window:
    ``blocked(name)`` says how long to wait once ``limit`` failures are reached."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def blocked(self, name: str, now: float) -> float:
        recent = self._recent(name, now)
        if len(recent) < self.limit:
            return 0.0
        return max(0.0, recent[0] + self.window - now)

    def failed(self, name: str, now: float) -> None:
        recent = self._recent(name, now)
        recent.append(now)
        self._failures[name] = recent
        self._failures.move_to_end(name)
        while len(self._failures) > CACHE_SIZE:
            self._failures.popitem(last=False)

    def succeeded(self, name: str) -> None:
        self._failures.pop(name, None)

    def _recent(self, name: str, now: float) -> list[float]:
        return [t for t in self._failures.get(name, ()) if now - t < self.window]
