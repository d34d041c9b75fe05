"""app.db.Database: a lazily opened async pool against real Postgres, and a 503 when Postgres is away."""

from __future__ import annotations

import asyncio

import pytest

from app.db import Database
from app.errors import ServiceUnavailable
from tests.fixtures.server import free_port

pytestmark = pytest.mark.timeout(60)


def test_the_pool_opens_on_first_use_and_closes_idempotently(migrated_db):
    async def scenario():
        database = Database(migrated_db)
        assert database._pool is None, "nothing may connect before the first request"
        async with database.connection() as conn:
            cursor = await conn.execute("SELECT count(*) FROM siramodel_registry")
            assert (await cursor.fetchone())[0] == 0
        pool = await database.get_pool()
        assert pool is await database.get_pool()
        await database.close()
        await database.close()
        assert pool.closed

    asyncio.run(scenario())


def test_concurrent_first_uses_share_one_pool(migrated_db):
    async def scenario():
        database = Database(migrated_db)
        pools = await asyncio.gather(*(database.get_pool() for _ in range(5)))
        assert len({id(pool) for pool in pools}) == 1
        await database.close()

    asyncio.run(scenario())


def test_an_unreachable_database_is_a_503(tmp_path):
    async def scenario():
        database = Database(f"postgresql://sira@127.0.0.1:{free_port()}/sira", acquire_timeout_s=1.0)
        with pytest.raises(ServiceUnavailable) as caught:
            async with database.connection():
                pass
        await database.close()
        return caught.value

    error = asyncio.run(scenario())
    assert error.status == 503 and error.headers == {"Retry-After": "1"}
    assert "did not answer within 1 s" in error.message


def test_no_database_configured_is_a_503():
    async def scenario():
        with pytest.raises(ServiceUnavailable, match="no database is configured"):
            await Database(None).get_pool()

    asyncio.run(scenario())


def test_a_query_error_is_not_hidden_as_a_503(migrated_db):
    """Only connection trouble becomes a 503; a broken query is a bug and must surface as itself."""
    import psycopg

    async def scenario():
        database = Database(migrated_db)
        try:
            with pytest.raises(psycopg.errors.UndefinedTable):
                async with database.connection() as conn:
                    await conn.execute("SELECT * FROM no_such_table")
        finally:
            await database.close()

    asyncio.run(scenario())
