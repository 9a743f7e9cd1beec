"""Reaching the user and key database from a test, as the CLI or another server instance
would: ``store_do(url, action)`` opens it, runs ``action(store)`` and closes it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from modelpool.auth._db import Database
from modelpool.auth._store import Store

T = TypeVar("T")


def store_do(url: str, action: Callable[[Store], Awaitable[T]]) -> T:
    async def main() -> T:
        db = Database(url)
        try:
            await db.open()
            return await action(Store(db))
        finally:
            await db.close()

    return asyncio.run(main())
