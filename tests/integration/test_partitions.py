"""The prediction log's day partitions against a real Postgres: made ahead, immutable, converted in place.

Rows go in as the writer puts them (``PostgresSink``: COPY, then INSERT ... ON CONFLICT).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import threading

import orjson
import psycopg
import pytest
from uuid_utils import uuid7

from app.http.lookup import SELECT_PREDICTION
from app.ids import id_time_window, new_prediction_id
from app.predlog.log import encode_record
from app.predlog.sink import PostgresSink
from app.store.buckets import LocalModelStore
from workers.bootstrap import prepare_database
from workers.migrate import apply_migrations

MIGRATIONS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "migrations")
UTC = dt.UTC


def record(created_at: dt.datetime, prediction_id: str | None = None) -> bytes:
    body = {"prediction_id": prediction_id or new_prediction_id(), "model_id": "6f1c3f7e-2d1b-4c55-9a47-7d2f0c1e9b10",
            "model_role": "production", "score": 0.25, "decision": "allow",
            "explain_summary": [{"feature": "amount", "importance": 0.4}], "latency_ms": 0.8, "cached": False}
    return encode_record(body, "evt-1", "fraud_score", "req-1", created_at.timestamp())


def write(dsn: str, tmp_path, records: list[bytes]) -> None:
    async def run() -> None:
        sink = PostgresSink(dsn, str(tmp_path / "rejected"))
        await sink.open()
        try:
            await sink.write(records)
        finally:
            await sink.close()

    asyncio.run(run())


def partitions(conn: psycopg.Connection) -> list[str]:
    return sorted(name for (name,) in conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'siramodel_predictions'::regclass"))


def day_name(day: dt.date) -> str:
    return f"siramodel_predictions_p{day:%Y%m%d}"


def today() -> dt.date:
    return dt.datetime.now(UTC).date()


def test_the_log_is_partitioned_by_day_with_partitions_made_ahead(migrated_db):
    with psycopg.connect(migrated_db) as conn:
        (strategy,) = conn.execute("SELECT partstrat FROM pg_partitioned_table "
                                   "WHERE partrelid = 'siramodel_predictions'::regclass").fetchone()
        names = partitions(conn)
    assert strategy == "r"
    expected = {day_name(today() + dt.timedelta(days=offset)) for offset in range(-1, 4)}
    assert expected | {"siramodel_predictions_default"} <= set(names)


def test_every_partition_refuses_update_delete_and_truncate(migrated_db, tmp_path):
    write(migrated_db, tmp_path, [record(dt.datetime.now(UTC)), record(dt.datetime.now(UTC) - dt.timedelta(days=40))])
    statements = [f"{verb} {table}" for table in ("siramodel_predictions", day_name(today()),
                                                  "siramodel_predictions_default")
                  for verb in ("DELETE FROM", "TRUNCATE")]
    statements += [f"UPDATE {table} SET score = 1" for table in ("siramodel_predictions", day_name(today()),
                                                                 "siramodel_predictions_default")]
    for statement in statements:
        with psycopg.connect(migrated_db) as conn, pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute(statement)
    with psycopg.connect(migrated_db) as conn:
        assert conn.execute("SELECT count(*) FROM siramodel_predictions").fetchone()[0] == 2


def test_a_row_of_a_day_without_a_partition_lands_and_later_moves_to_its_day(migrated_db, tmp_path):
    old = dt.datetime.now(UTC).replace(hour=12) - dt.timedelta(days=40)
    rows = [record(old), record(old + dt.timedelta(minutes=1))]
    write(migrated_db, tmp_path, rows)  # never an error on the write path
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM siramodel_predictions_default").fetchone()[0] == 2
        assert conn.execute("SELECT sira_prediction_partition(%s)", (old.date(),)).fetchone()[0] == day_name(old.date())
        assert conn.execute("SELECT count(*) FROM siramodel_predictions_default").fetchone()[0] == 0
        assert conn.execute(f"SELECT count(*) FROM {day_name(old.date())}").fetchone()[0] == 2
        with pytest.raises(psycopg.errors.RaiseException):  # the moved day is immutable too
            conn.execute(f"DELETE FROM {day_name(old.date())}")


def test_replayed_records_land_once(migrated_db, tmp_path):
    batch = [record(dt.datetime.now(UTC)) for _ in range(50)]
    write(migrated_db, tmp_path, batch)
    write(migrated_db, tmp_path, batch + [record(dt.datetime.now(UTC))])
    with psycopg.connect(migrated_db) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT prediction_id) FROM siramodel_predictions").fetchone() \
            == (51, 51)


def test_many_pods_making_partitions_at_once_never_race(migrated_db):
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        before = partitions(conn)
    errors: list[BaseException] = []

    def ensure() -> None:
        try:
            with psycopg.connect(migrated_db, autocommit=True) as conn:
                conn.execute("SELECT sira_ensure_prediction_partitions(10)")
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=ensure) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        after = partitions(conn)
    assert len(after) == len(before) + 7  # days 4 to 10 ahead, once each
    assert day_name(today() + dt.timedelta(days=10)) in after


def test_a_lookup_by_id_reads_one_partition(migrated_db, tmp_path):
    noon = dt.datetime.now(UTC).replace(hour=12, minute=0) - dt.timedelta(days=1)  # its window is within one day
    prediction_id = str(uuid7(nanoseconds=int(noon.timestamp() * 1e9)))
    write(migrated_db, tmp_path, [record(noon, prediction_id)])
    window = id_time_window(prediction_id)
    assert window is not None
    with psycopg.connect(migrated_db) as conn:
        plan = "\n".join(line for (line,) in conn.execute("EXPLAIN " + SELECT_PREDICTION,
                                                          (prediction_id, *window)))
        found = conn.execute(SELECT_PREDICTION, (prediction_id, *window)).fetchone()
    assert found is not None and found[0] == prediction_id
    scanned = {name for name in partitions(psycopg.connect(migrated_db)) if name in plan}
    assert scanned == {day_name(dt.datetime.fromtimestamp(window[0].timestamp(), UTC).date())}, plan


def test_the_migration_converts_a_log_with_rows_in_place(fresh_db, tmp_path):
    earlier = tmp_path / "migrations"
    earlier.mkdir()
    for name in sorted(os.listdir(MIGRATIONS)):
        if name.endswith(".sql") and name < "004":
            shutil.copy(os.path.join(MIGRATIONS, name), earlier / name)
    apply_migrations(fresh_db, str(earlier))
    now = dt.datetime.now(UTC)
    days = [now - dt.timedelta(days=40), now - dt.timedelta(days=1), now]
    rows = [(new_prediction_id(), day - dt.timedelta(seconds=index)) for day in days for index in range(100)]
    with psycopg.connect(fresh_db) as conn:
        for prediction_id, created_at in rows:
            conn.execute(
                "INSERT INTO siramodel_predictions (prediction_id, event_id, product, model_id, model_role, score, "
                "decision, explanation, created_at, trace_id) VALUES (%s, 'e', 'fraud_score', "
                "'6f1c3f7e-2d1b-4c55-9a47-7d2f0c1e9b10', 'production', 0.5, 'allow', %s, %s, NULL)",
                (prediction_id, orjson.dumps([{"feature": "amount"}]).decode(), created_at))
    assert apply_migrations(fresh_db) == [name for name in sorted(os.listdir(MIGRATIONS))
                                          if name.endswith(".sql") and name >= "004"]
    with psycopg.connect(fresh_db) as conn:
        kept = conn.execute("SELECT prediction_id::text, created_at FROM siramodel_predictions").fetchall()
        in_default = conn.execute("SELECT count(*) FROM siramodel_predictions_default").fetchone()[0]
        names = partitions(conn)
    assert sorted(kept) == sorted(rows)
    assert in_default == 0
    assert {day_name(day.date()) for day in days} <= set(names)


def test_every_start_makes_the_coming_partitions(migrated_db, tmp_path):
    ahead = day_name(today() + dt.timedelta(days=3))
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {ahead}")  # as if the days ahead had run out while every pod was down
    prepare_database(migrated_db, LocalModelStore(str(tmp_path / "store")))
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        assert ahead in partitions(conn)
