"""The worker's connection pool, with every checkout bounded by DB_OPERATION_TIMEOUT so that a
connection that stopped answering fails its operation instead of hanging it."""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from outbox import db
from outbox.errors import describe_error

# What a lost or unanswering database raises from an engine operation: retried or waited out,
# never a crash.
UNREACHABLE = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout, TimeoutError)


class BoundedPool:
    def __init__(self, url: str, max_size: int, timeout_s: float, min_size: int = 1,
                 application_name: str | None = None):
        self.url = url
        self.timeout_s = timeout_s
        # The worker's id on its connections: `workers list` reads liveness from pg_stat_activity.
        kwargs = {**db.POOL_KWARGS, **({"application_name": application_name} if application_name else {})}
        self.pool = AsyncConnectionPool(url, min_size=min_size, max_size=max_size, open=False, kwargs=kwargs)

    @property
    def safe_url(self) -> str:
        return db.safe_url(self.url)

    async def open(self, wait: bool = False) -> None:
        await self.pool.open(wait=wait)

    async def close(self) -> None:
        await self.pool.close()

    async def drain(self) -> None:
        await self.pool.drain()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        """A pooled connection for one engine operation, bounded by timeout_s. psycopg then
        cancels the query or, failing that within 10 s, closes the connection, and the pool
        replaces it.

        The TimeoutError raised says what timed out: asyncio's own has no message, and the logs
        then read "heartbeat failed ()" or "worker stopped: " with no reason at all."""
        try:
            async with asyncio.timeout(self.timeout_s) as scope:
                async with self.pool.connection() as conn:
                    yield conn
        except TimeoutError:
            if not scope.expired():
                raise  # a TimeoutError of the caller's own, not our bound
            raise TimeoutError(f"no answer from the database within {self.timeout_s:g} s "
                               "(DB_OPERATION_TIMEOUT)") from None

    async def why_unreachable(self) -> str:
        """One direct connection attempt, outside the pool, for its error message."""
        try:
            async with asyncio.timeout(self.timeout_s):
                conn = await db.connect_async(self.url)
        except Exception as exc:
            # context=False: this runs while the pool's timeout is handled, which the caller
            # already names.
            return f"a direct connection attempt failed: {describe_error(exc, context=False)}"
        await conn.close()
        return "a direct connection attempt succeeded just after (was the database starting up?)"
