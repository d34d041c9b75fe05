"""Archiving days of the prediction log where it breaks: interrupted, raced by late rows, damaged objects.

A real Postgres and a real store (the local folder store; the S3 path runs end to end in
tests/e2e/test_prediction_archive.py). Faults are injected around the store's real calls.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import psycopg
import pytest

from app.predlog.archive import ArchiveError, DayChanged, archive_day, days_to_archive, restore_day
from app.store.buckets import LocalModelStore, ModelIntegrityError
from tests.integration.test_partitions import day_name, partitions, record, write

PREFIX = "prediction-archive/"


class Crash(Exception):
    """The process died here."""


class FaultyStore:
    """A real store whose ``fetch`` first runs ``before_fetch`` (a crash, a late row...)."""

    def __init__(self, store: LocalModelStore, before_fetch):
        self.store, self.before_fetch = store, before_fetch

    def __getattr__(self, name):
        return getattr(self.store, name)

    def fetch(self, *args):
        self.before_fetch()
        return self.store.fetch(*args)


def old_day() -> dt.date:
    return dt.datetime.now(dt.UTC).date() - dt.timedelta(days=40)


def fill_day(dsn: str, tmp_path, day: dt.date, count: int) -> None:
    noon = dt.datetime(day.year, day.month, day.day, 12, tzinfo=dt.UTC)
    write(dsn, tmp_path, [record(noon + dt.timedelta(seconds=index)) for index in range(count)])


def archived(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute("SELECT day, rows, restored_at FROM sira_prediction_archives ORDER BY day, part").fetchall()


def test_an_archive_interrupted_after_its_upload_is_finished_by_a_rerun(migrated_db, tmp_path):
    day = old_day()
    fill_day(migrated_db, tmp_path, day, 120)
    store = LocalModelStore(str(tmp_path / "store"))

    def crash():
        raise Crash()

    with psycopg.connect(migrated_db, autocommit=True) as conn:
        assert days_to_archive(conn, day + dt.timedelta(days=1)) == [day]
        with pytest.raises(Crash):
            archive_day(conn, FaultyStore(store, crash), PREFIX, day, str(tmp_path))
        assert day_name(day) in partitions(conn) and archived(conn) == []  # nothing dropped, nothing recorded
        assert archive_day(conn, store, PREFIX, day, str(tmp_path)).rows == 120
        assert day_name(day) not in partitions(conn)
        assert archived(conn) == [(day, 120, None)]
        assert days_to_archive(conn, day + dt.timedelta(days=1)) == []  # a third run finds nothing to do


def test_rows_arriving_while_a_day_is_archived_start_the_day_over(migrated_db, tmp_path):
    day = old_day()
    fill_day(migrated_db, tmp_path, day, 50)
    store = LocalModelStore(str(tmp_path / "store"))
    late = [record(dt.datetime(day.year, day.month, day.day, 18, tzinfo=dt.UTC))]

    with psycopg.connect(migrated_db, autocommit=True) as conn:
        days_to_archive(conn, day + dt.timedelta(days=1))
        with pytest.raises(DayChanged):
            archive_day(conn, FaultyStore(store, lambda: write(migrated_db, tmp_path, late)), PREFIX, day,
                        str(tmp_path))
        assert conn.execute(f"SELECT count(*) FROM {day_name(day)}").fetchone()[0] == 51
        assert archive_day(conn, store, PREFIX, day, str(tmp_path)).rows == 51
        assert restore_day(conn, store, day, str(tmp_path)) == 51
        assert conn.execute(f"SELECT count(*) FROM {day_name(day)}").fetchone()[0] == 51


def test_a_damaged_object_is_refused_and_nothing_is_restored(migrated_db, tmp_path):
    day = old_day()
    fill_day(migrated_db, tmp_path, day, 30)
    store = LocalModelStore(str(tmp_path / "store"))
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        days_to_archive(conn, day + dt.timedelta(days=1))
        done = archive_day(conn, store, PREFIX, day, str(tmp_path))
        with open(store.object_path(done.object_key), "r+b") as handle:
            handle.seek(100)
            handle.write(b"\xff\xfe\xfd")
        with pytest.raises(ModelIntegrityError, match="expected sha256"):
            restore_day(conn, store, day, str(tmp_path))
        assert day_name(day) not in partitions(conn) and archived(conn) == [(day, 30, None)]
        with pytest.raises(ArchiveError, match="never archived"):
            restore_day(conn, store, day - dt.timedelta(days=1), str(tmp_path))


def test_the_workers_never_load_pyarrow():
    """Only the archive command needs it: the app a worker serves imports nothing of it."""
    code = "import sys, app.http.assembly; print('pyarrow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


def test_rows_arriving_after_a_day_was_archived_become_its_next_part(migrated_db, tmp_path):
    day = old_day()
    fill_day(migrated_db, tmp_path, day, 40)
    store = LocalModelStore(str(tmp_path / "store"))
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        days_to_archive(conn, day + dt.timedelta(days=1))
        first = archive_day(conn, store, PREFIX, day, str(tmp_path))
        fill_day(migrated_db, tmp_path / "late", day, 3)  # a late replay: into the default partition
        assert days_to_archive(conn, day + dt.timedelta(days=1)) == [day]
        second = archive_day(conn, store, PREFIX, day, str(tmp_path))
        assert (first.part, first.rows, second.part, second.rows) == (0, 40, 1, 3)
        assert store.exists(first.object_key) and store.exists(second.object_key)
        assert [row[:2] for row in archived(conn)] == [(day, 40), (day, 3)]
        assert restore_day(conn, store, day, str(tmp_path)) == 43
        assert conn.execute(f"SELECT count(*) FROM {day_name(day)}").fetchone()[0] == 43
        again = archive_day(conn, store, PREFIX, day, str(tmp_path))  # replaces both restored parts
        assert (again.part, again.rows) == (0, 43)
        assert [row[:3] for row in archived(conn)] == [(day, 43, None)]
