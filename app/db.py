"""Connections to Postgres: ``connect`` and ``connect_async`` for every process, and the worker's pool.

Every connection SIRA makes is made here, named ``sira-<role>`` in ``pg_stat_activity`` (its
``application_name``) so that an operator sees which process holds it, and with a connect timeout.

The worker's async pool is opened on first use inside the worker's own event loop.

Never before the fork: a pool's connections and its background tasks belong to one process and
one loop, so the master only hands the DSN down and each worker opens its pool when a request
first needs the database. Resources of one worker share its `Database` (`create_app` builds it);
it is also a Falcon middleware whose `process_shutdown` closes the pool at lifespan shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from app.errors import ServiceUnavailable

log = logging.getLogger("sira.db")

POOL_MAX_SIZE = 4  # admin and canary endpoints only: the scoring path never waits on Postgres
CONNECT_TIMEOUT_S = 5
ACQUIRE_TIMEOUT_S = 5.0


def connection_options(role: str, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> dict:
    """The keyword arguments of every connection: its name, and libpq's whole-second connect timeout."""
    return {"application_name": f"sira-{role}", "connect_timeout": max(1, math.ceil(connect_timeout_s))}


def connect(dsn: str, role: str, *, autocommit: bool = True,
            connect_timeout_s: float = CONNECT_TIMEOUT_S) -> psycopg.Connection:
    """A connection for one job of a process (``role``: migrate, supervisor, cli...)."""
    return psycopg.connect(dsn, autocommit=autocommit, **connection_options(role, connect_timeout_s))


async def connect_async(dsn: str, role: str, *, autocommit: bool = True,
                        connect_timeout_s: float = CONNECT_TIMEOUT_S) -> psycopg.AsyncConnection:
    """``connect``, for an event loop."""
    return await psycopg.AsyncConnection.connect(dsn, autocommit=autocommit,
                                                 **connection_options(role, connect_timeout_s))


class Database:
    """One lazily opened AsyncConnectionPool; `connection()` turns database trouble into a 503.

    Not thread safe: used from the worker's single event loop.
    """

    def __init__(self, dsn: str | None, *, max_size: int = POOL_MAX_SIZE,
                 acquire_timeout_s: float = ACQUIRE_TIMEOUT_S):
        self.dsn = dsn
        self.max_size = max_size
        self.acquire_timeout_s = acquire_timeout_s
        self._pool: AsyncConnectionPool | None = None
        self._opening = asyncio.Lock()

    async def get_pool(self) -> AsyncConnectionPool:
        """The open pool, opened now if this is the first use (connections are made in the background)."""
        if self._pool is not None:
            return self._pool
        if not self.dsn:
            raise ServiceUnavailable("no database is configured for this worker")
        async with self._opening:
            if self._pool is None:
                pool = AsyncConnectionPool(
                    self.dsn, open=False, min_size=1, max_size=self.max_size, timeout=self.acquire_timeout_s,
                    kwargs=connection_options("worker"),
                    check=AsyncConnectionPool.check_connection, name="sira-worker", num_workers=1)
                await pool.open(wait=False)
                self._pool = pool
        return self._pool

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        """A pooled connection, committed when the block ends without error."""
        pool = await self.get_pool()
        try:
            async with pool.connection() as conn:
                yield conn
        except PoolTimeout:
            raise ServiceUnavailable(f"the database did not answer within {self.acquire_timeout_s:g} s",
                                     headers={"Retry-After": "1"}) from None
        except psycopg.OperationalError as exc:
            log.warning("database error: %s", exc)
            raise ServiceUnavailable("the database is unavailable", headers={"Retry-After": "1"}) from None

    async def close(self) -> None:
        """Close the pool if it was opened; idempotent."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def process_shutdown(self, scope, event) -> None:
        """Falcon lifespan hook: the worker is stopping."""
        await self.close()
