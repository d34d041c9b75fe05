"""Whole days of the prediction log to the bucket as Parquet, and back; rows never deleted one by one.

``archive_day`` takes one UTC day's partition through every step, each safe to repeat:

1. Read the day in one snapshot and write it to a Parquet file (app/predlog/parquet.py).
2. Upload it and its manifest (day, rows, sha256, bytes, schema version) under ``<prefix><day>/``.
3. Fetch the object back, verified against the sha256 and size, and count its rows.
4. In one transaction: lock the partition, count it again (a late replay may have added rows: then
   the day starts over), record the archive in ``sira_prediction_archives``, detach and drop the
   partition.

Interrupted anywhere, a rerun finds the partition still there and does the day again: the object
keys are the day's, so an upload replaces the earlier one, and the catalogue row is written in the
transaction that drops the rows. Nothing is lost, nothing kept twice. ``restore_day`` brings a
day back into its partition in one transaction, after the same verification.

Rows of a day that fell into the default partition (no day partition existed when they were
written) get their day's partition first (``sira_prediction_partition`` moves them), so they are
archived with the rest.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import tempfile

import psycopg
from psycopg import sql

from app.predlog.parquet import COLUMNS, SCHEMA_VERSION, read_day, rows_in, write_day

PARTITION_PREFIX = "siramodel_predictions_p"
ARCHIVE_LOCK = "sira_prediction_archive"  # one archive or restore at a time, whatever the pod
FETCH_ROWS = 10_000                       # rows per round trip of the server-side cursor
DROP_LOCK_TIMEOUT = "10s"                 # writers wait at most this long for the detach


class ArchiveError(Exception):
    """A day that cannot be archived or restored now; the message says why, the data is untouched."""


class DayChanged(ArchiveError):
    """Rows of the day arrived between its upload and its drop: archive it again."""


@dataclasses.dataclass(frozen=True)
class DayArchive:
    day: dt.date
    part: int
    object_key: str
    manifest_key: str
    store: str
    rows: int
    sha256: str
    size_bytes: int
    schema_version: int = SCHEMA_VERSION


def partition_name(day: dt.date) -> str:
    return f"{PARTITION_PREFIX}{day:%Y%m%d}"


def object_keys(prefix: str, day: dt.date, part: int) -> tuple[str, str]:
    """The Parquet object and manifest keys of one part of a day."""
    return (f"{prefix}{day.isoformat()}/part-{part:04d}.parquet",
            f"{prefix}{day.isoformat()}/part-{part:04d}.manifest.json")


def next_part(conn: psycopg.Connection, day: dt.date) -> int:
    """The part the day's rows in Postgres become: after the parts still only in the bucket. Parts
    that were restored hold rows that are in the partition again: the new part replaces them."""
    return conn.execute("SELECT coalesce(max(part) + 1, 0) FROM sira_prediction_archives "
                        "WHERE day = %s AND restored_at IS NULL", (day,)).fetchone()[0]


def days_to_archive(conn: psycopg.Connection, before: dt.date) -> list[dt.date]:
    """Days before ``before`` that still have rows in Postgres: first the default partition's days
    get partitions of their own, then every day partition before the date, oldest first."""
    stray = conn.execute(
        "SELECT DISTINCT (created_at AT TIME ZONE 'UTC')::date FROM siramodel_predictions_default "
        "WHERE created_at < %s ORDER BY 1", (utc_midnight(before),)).fetchall()
    for (day,) in stray:
        conn.execute("SELECT sira_prediction_partition(%s)", (day,))
    names = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'siramodel_predictions'::regclass AND c.relname ~ %s",
        (f"^{PARTITION_PREFIX}[0-9]{{8}}$",)).fetchall()
    days = sorted(dt.datetime.strptime(name[len(PARTITION_PREFIX):], "%Y%m%d").date() for (name,) in names)
    return [day for day in days if day < before]


def archive_day(conn: psycopg.Connection, store, prefix: str, day: dt.date, workdir: str) -> DayArchive:
    """Archive one day (steps in the module doc); the record that was written."""
    part = next_part(conn, day)
    data_key, manifest_key = object_keys(prefix, day, part)
    with tempfile.TemporaryDirectory(dir=workdir, prefix=f".archive-{day}-") as scratch:
        parquet_path = os.path.join(scratch, "predictions.parquet")
        rows = _write_parquet(conn, day, parquet_path)
        sha256, size = store.put_as(data_key, parquet_path)
        record = DayArchive(day, part, data_key, manifest_key, store.describe(), rows, sha256, size)
        manifest_path = os.path.join(scratch, "manifest.json")
        with open(manifest_path, "w", encoding="utf-8") as handle:
            json.dump(manifest(record), handle, indent=2, sort_keys=True)
        store.put_as(manifest_key, manifest_path)
        check_object(store, record, os.path.join(scratch, "fetched.parquet"))
    _record_and_drop(conn, record)
    return record


def manifest(record: DayArchive) -> dict:
    return {"day": record.day.isoformat(), "part": record.part, "rows": record.rows, "sha256": record.sha256,
            "bytes": record.size_bytes, "schema_version": record.schema_version,
            "object": record.object_key, "columns": list(COLUMNS)}


def check_object(store, record: DayArchive, scratch_path: str) -> None:
    """Fetch the object back, verified against its sha256 and size; its footer must state its rows."""
    store.fetch(record.object_key, scratch_path, record.sha256, record.size_bytes)
    stored_rows = rows_in(scratch_path)
    if stored_rows != record.rows:
        raise ArchiveError(f"{record.object_key}: the object holds {stored_rows} rows, the day {record.rows}")


def _write_parquet(conn: psycopg.Connection, day: dt.date, path: str) -> int:
    """The day's rows, read in one snapshot, into a Parquet file; how many."""
    select = sql.SQL("SELECT prediction_id::text, event_id, product, model_id::text, model_role, score, decision, "
                     "explanation::text, latency_ms, cached, request_id, created_at, trace_id FROM {} "
                     "ORDER BY created_at, prediction_id").format(sql.Identifier(partition_name(day)))
    with conn.transaction(), conn.cursor(name=f"archive_{day:%Y%m%d}") as cursor:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        cursor.execute(select)
        return write_day(path, iter(lambda: cursor.fetchmany(FETCH_ROWS), []))


def _record_and_drop(conn: psycopg.Connection, record: DayArchive) -> None:
    """Catalogue the archive and drop the day's partition, in one transaction, if it is still the same day."""
    table = sql.Identifier(partition_name(record.day))
    with conn.transaction():
        conn.execute(f"SET LOCAL lock_timeout = '{DROP_LOCK_TIMEOUT}'")
        conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table))
        (rows_now,) = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
        if rows_now != record.rows:
            raise DayChanged(f"{record.day}: {rows_now - record.rows} rows arrived while it was archived")
        conn.execute("DELETE FROM sira_prediction_archives WHERE day = %s AND restored_at IS NOT NULL",
                     (record.day,))  # replaced: their rows are in this part
        conn.execute(
            "INSERT INTO sira_prediction_archives (day, part, object_key, manifest_key, store, rows, sha256, "
            "size_bytes, schema_version) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (record.day, record.part, record.object_key, record.manifest_key, record.store, record.rows,
             record.sha256, record.size_bytes, record.schema_version))
        conn.execute(sql.SQL("ALTER TABLE siramodel_predictions DETACH PARTITION {}").format(table))
        conn.execute(sql.SQL("DROP TABLE {}").format(table))


def restore_day(conn: psycopg.Connection, store, day: dt.date, workdir: str) -> int:
    """Bring every archived part of a day back into its partition, in one transaction; the rows restored."""
    parts = conn.execute("SELECT part, object_key, sha256, size_bytes, rows FROM sira_prediction_archives "
                         "WHERE day = %s AND restored_at IS NULL ORDER BY part", (day,)).fetchall()
    if not parts:
        restored = conn.execute("SELECT max(restored_at) FROM sira_prediction_archives WHERE day = %s",
                                (day,)).fetchone()[0]
        if restored is None:
            raise ArchiveError(f"{day} was never archived")
        raise ArchiveError(f"{day} was restored already, at {restored:%Y-%m-%d %H:%M:%S}Z")
    with tempfile.TemporaryDirectory(dir=workdir, prefix=f".restore-{day}-") as scratch:
        paths = []
        for part, object_key, sha256, size, rows in parts:  # every part checked before any row moves
            paths.append(os.path.join(scratch, f"part-{part}.parquet"))
            check_object(store, DayArchive(day, part, object_key, "", store.describe(), rows, sha256, size),
                         paths[-1])
        with conn.transaction():
            name = conn.execute("SELECT sira_prediction_partition(%s)", (day,)).fetchone()[0]
            copy = sql.SQL("COPY {} ({}) FROM STDIN").format(
                sql.Identifier(name), sql.SQL(", ").join(map(sql.Identifier, COLUMNS)))
            with conn.cursor().copy(copy) as load:
                for path in paths:
                    for batch in read_day(path):
                        for row in batch:
                            load.write_row(row)
            conn.execute("UPDATE sira_prediction_archives SET restored_at = now() WHERE day = %s "
                         "AND restored_at IS NULL", (day,))
    return sum(rows for *_, rows in parts)



def utc_midnight(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)

