"""Writes batches of prediction records into ``siramodel_predictions``: COPY, then an idempotent INSERT.

A batch is COPYed (text format: a record is one line of JSON) into a session temp table and
inserted with ``ON CONFLICT (prediction_id) DO NOTHING``, then committed; a batch sent twice (a
writer killed before it advanced the rings) lands once. A large batch goes as two halves on two
connections at once, so Postgres parses and indexes them on two cores.

Errors sort into two kinds. Postgres refusing rows as data (a constraint, a malformed record):
the batch is retried row by row and the rows it still refuses are kept, fsynced, under
``<spool>/rejected`` with the error: never lost silently. Anything else from the database
(down, restarting, unreachable, a statement over ``WRITE_TIMEOUT_S``) is ``DatabaseAway``: the
caller spools the batch and tries again later.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

import orjson
import psycopg
from psycopg_pool import AsyncConnectionPool

from app.db import connection_options
from conf.datadir import fsync_directory

log = logging.getLogger("sira.writer")

RETRY_S = 1.0                # the pool's wait for a connection; the writer's probes back off (workers/retry.py)
WRITE_TIMEOUT_S = 15.0       # a batch that takes longer counts as Postgres away
WRITE_CONNECTIONS = 2        # measured: ~24,000 rows/s against ~16,600 with one (bench_writer)
PARALLEL_MIN_ROWS = 1000     # smaller batches go in one piece

TEMP_TABLE_SQL = "CREATE TEMP TABLE IF NOT EXISTS sira_predlog_incoming (r jsonb) ON COMMIT DELETE ROWS"
COPY_SQL = "COPY sira_predlog_incoming (r) FROM STDIN"
INSERT_SQL = """
INSERT INTO siramodel_predictions (prediction_id, event_id, product, model_id, model_role, score,
    decision, explanation, latency_ms, cached, request_id, created_at, trace_id)
SELECT p.prediction_id, p.event_id, p.product, p.model_id, p.model_role, p.score, p.decision,
    p.explanation, p.latency_ms, coalesce(p.cached, false), p.request_id,
    coalesce(to_timestamp(p.created_at), now()), p.trace_id
FROM sira_predlog_incoming AS i
CROSS JOIN LATERAL jsonb_to_record(i.r) AS p(prediction_id uuid, event_id text, product text,
    model_id uuid, model_role text, score double precision, decision text, explanation jsonb,
    latency_ms double precision, cached boolean, request_id text, created_at double precision,
    trace_id text)
ON CONFLICT (prediction_id) DO NOTHING
"""
# A handed-off object (app/predlog/handoff.py) is replayed by one writer at a time, under this lock.
CLAIM_SQL = "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))"
# Postgres refuses these rows as data: retried row by row, then set aside.
ROW_ERRORS = (psycopg.DataError, psycopg.IntegrityError)


class DatabaseAway(Exception):
    """Postgres cannot take the batch now (down, restarting, unreachable, misconfigured)."""


class PostgresSink:
    """Writes batches of prediction records into ``siramodel_predictions`` through a psycopg pool."""

    def __init__(self, dsn: str, rejected_dir: str, connections: int = WRITE_CONNECTIONS) -> None:
        self.dsn = dsn
        self.rejected_dir = rejected_dir
        self.connections = connections
        self.pool = None
        self.rows_rejected = 0

    async def open(self) -> None:
        self.pool = AsyncConnectionPool(self.dsn, min_size=1, max_size=self.connections, open=False,
                                        kwargs=connection_options("writer"),
                                        configure=_prepare_connection, name="sira-writer",
                                        timeout=RETRY_S, reconnect_timeout=2 * RETRY_S)
        await self.pool.open(wait=False)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def write(self, records: list[bytes]) -> None:
        """Commit every record (or set aside those Postgres refuses); DatabaseAway if it can't now."""
        parts = _split(records, self.connections if len(records) >= PARALLEL_MIN_ROWS else 1)
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                outcomes = await asyncio.gather(*(self._insert(part) for part in parts),
                                                return_exceptions=True)
                for part, outcome in zip(parts, outcomes):
                    if isinstance(outcome, ROW_ERRORS):
                        log.error("Postgres refused a batch of %d rows (%s); retrying row by row",
                                  len(part), outcome)
                        await self._insert_row_by_row(part)
                    elif isinstance(outcome, BaseException):
                        raise outcome
        except (psycopg.Error, TimeoutError) as exc:
            raise DatabaseAway(str(exc).strip().splitlines()[0] if str(exc).strip() else
                               type(exc).__name__) from exc

    async def write_claimed(self, claim: str, records: list[bytes]) -> bool:
        """Commit ``records`` while holding the advisory lock named ``claim``; False if another holds it.

        Rows Postgres refuses as data are retried through ``write`` without the claim: the insert
        is idempotent, the claim only keeps two writers from doing the same work at once.
        """
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                try:
                    return await self._insert(records, claim)
                except ROW_ERRORS:
                    await self.write(records)
                    return True
        except (psycopg.Error, TimeoutError) as exc:
            raise DatabaseAway(str(exc).strip().splitlines()[0] if str(exc).strip() else
                               type(exc).__name__) from exc

    async def reachable(self) -> bool:
        """One round trip, to learn that Postgres is back."""
        try:
            async with asyncio.timeout(2 * RETRY_S):
                async with self.pool.connection(timeout=RETRY_S) as conn:
                    await conn.execute("SELECT 1")
            return True
        except (psycopg.Error, TimeoutError):
            return False

    async def _insert(self, records: list[bytes], claim: str | None = None) -> bool:
        """One transaction: COPY, INSERT, COMMIT; with ``claim``, only if its lock is free (else False)."""
        # COPY text format: a record is one line (orjson escapes control characters); only the
        # backslash is special.
        data = b"\n".join(records).replace(b"\\", b"\\\\") + b"\n"
        async with self.pool.connection(timeout=RETRY_S) as conn:
            async with conn.cursor() as cursor:
                if claim is not None:
                    await cursor.execute(CLAIM_SQL, (claim,))
                    if not (await cursor.fetchone())[0]:
                        await conn.rollback()
                        return False
                async with cursor.copy(COPY_SQL) as copy:
                    await copy.write(data)
                await cursor.execute(INSERT_SQL)
            await conn.commit()
        return True

    async def _insert_row_by_row(self, records: list[bytes]) -> None:
        rejected = []
        for record in records:
            try:
                await self._insert([record])
            except ROW_ERRORS as exc:
                rejected.append({"error": str(exc).strip(), "record": record.decode("utf-8", "replace")})
        if rejected:
            self._keep_rejected(rejected)

    def _keep_rejected(self, rejected: list[dict]) -> None:
        """Rows Postgres will never take: kept on disk, durably, for a person to look at."""
        os.makedirs(self.rejected_dir, exist_ok=True)
        path = os.path.join(self.rejected_dir, f"rejected-{time.time_ns()}.jsonl")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"".join(orjson.dumps(item) + b"\n" for item in rejected))
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_directory(self.rejected_dir)
        self.rows_rejected += len(rejected)
        log.error("Postgres refused %d prediction rows; kept in %s", len(rejected), path)


def _split(records: list[bytes], parts: int) -> list[list[bytes]]:
    """``records`` in ``parts`` contiguous slices of near-equal size."""
    size = -(-len(records) // parts)
    return [records[i:i + size] for i in range(0, len(records), size)]


async def _prepare_connection(conn: psycopg.AsyncConnection) -> None:
    """Pool configure hook: the session's staging table."""
    await conn.execute(TEMP_TABLE_SQL)
    await conn.commit()
