"""Writes batches of prediction records into ``siramodel_predictions``: COPY, then an idempotent INSERT.

A batch is COPYed, one typed row per record, into a session temp table and inserted with
``ON CONFLICT (prediction_id, created_at) DO NOTHING``, then committed; a batch sent twice (a
writer killed before it advanced the rings) lands once. A large batch goes as two halves on two
connections at once, so Postgres parses and indexes them on two cores.

The writer parses the records (orjson) and hands psycopg typed rows, rather than COPYing the JSON
lines for Postgres to take apart with jsonb_to_record: with many pods on one Postgres, Postgres's
CPU per row is what runs out, and each writer has its pod's CPU to itself. Measured by
bench/bench_pods.py (2 cores, fsync on, the two ways one after the other): Postgres's CPU per row
41.5 -> 36.8 us with one writer and 48.2 -> 37.4 us with four, for 12 us more in each writer.

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

# A record's fields, in the staging table's column order; created_at stays unix seconds until the INSERT.
FIELDS = ("prediction_id", "event_id", "product", "model_id", "model_role", "score", "decision", "explanation",
          "latency_ms", "cached", "request_id", "created_at", "trace_id")
TEMP_TABLE_SQL = """CREATE TEMP TABLE IF NOT EXISTS sira_predlog_rows (prediction_id uuid, event_id text,
    product text, model_id uuid, model_role text, score double precision, decision text, explanation jsonb,
    latency_ms double precision, cached boolean, request_id text, created_at double precision, trace_id text)
    ON COMMIT DELETE ROWS"""
COPY_SQL = "COPY sira_predlog_rows FROM STDIN"
INSERT_SQL = """
INSERT INTO siramodel_predictions (prediction_id, event_id, product, model_id, model_role, score,
    decision, explanation, latency_ms, cached, request_id, created_at, trace_id)
SELECT prediction_id, event_id, product, model_id, model_role, score, decision, explanation, latency_ms,
    coalesce(cached, false), request_id, coalesce(to_timestamp(created_at), now()), trace_id
FROM sira_predlog_rows
ON CONFLICT (prediction_id, created_at) DO NOTHING
"""
_SCALARS = (str, int, float, bool, type(None))
# A handed-off object (app/predlog/handoff.py) is replayed by one writer at a time, under this lock.
CLAIM_SQL = "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))"


class MalformedRecord(ValueError):
    """A record that is not a JSON object: no row can be made of it."""


# Postgres refuses these rows as data (or there is no row to give it): retried row by row, then set aside.
ROW_ERRORS = (psycopg.DataError, psycopg.IntegrityError, MalformedRecord)


def copy_row(record: bytes) -> tuple:
    """A record as the staging table's row. A field of the wrong JSON type goes as its JSON text,
    for Postgres to refuse as data like any other bad value; a record that is no JSON object is
    MalformedRecord."""
    try:
        fields = orjson.loads(record)
    except orjson.JSONDecodeError as exc:
        raise MalformedRecord(f"not JSON: {exc}") from None
    if type(fields) is not dict:
        raise MalformedRecord(f"a JSON {type(fields).__name__}, not an object")
    row = [fields.get(name) for name in FIELDS]
    row[7] = None if row[7] is None else orjson.dumps(row[7]).decode()  # explanation: jsonb from its JSON
    return tuple(value if type(value) in _SCALARS else orjson.dumps(value).decode() for value in row)


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
        rows = [copy_row(record) for record in records]  # MalformedRecord before anything is sent
        async with self.pool.connection(timeout=RETRY_S) as conn:
            async with conn.cursor() as cursor:
                if claim is not None:
                    await cursor.execute(CLAIM_SQL, (claim,))
                    if not (await cursor.fetchone())[0]:
                        await conn.rollback()
                        return False
                async with cursor.copy(COPY_SQL) as copy:
                    for row in rows:
                        await copy.write_row(row)
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
