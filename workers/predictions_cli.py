"""`sira predictions`: archive whole days of the prediction log to the bucket, restore them, list them.

    sira predictions archive --before 2026-09-01      # every day before it (UTC), oldest first
    sira predictions archive --older-than 90d         # the same, counted back from today
    sira predictions restore 2026-08-14
    sira predictions archives

The steps of a day and why a rerun finishes an interrupted one: app/predlog/archive.py. Objects go
to the model store (MODEL_BUCKET, else $SIRA_DATA_DIR/store) under SIRA_ARCHIVE_PREFIX. One run at
a time across pods: a second one waits for the first's advisory lock. Nothing is archived unless
asked: the default is to keep every row.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys

import psycopg

from app.db import connect
from app.predlog.archive import ARCHIVE_LOCK, ArchiveError, DayChanged, archive_day, days_to_archive, restore_day
from app.store.buckets import ModelStoreError, open_model_store
from conf.datadir import data_path
from conf.settings import Settings
from workers.cli_usage import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError
from workers.models_cli import registry_database

DAY_ATTEMPTS = 3  # a day that keeps receiving rows while it is archived is left for the next run


def day_argument(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a day as YYYY-MM-DD, got {value!r}") from None


def age_argument(value: str) -> int:
    """'90d' -> 90: a whole number of days, 1 to 36500."""
    match = re.fullmatch(r"(\d{1,5})d", value.strip())
    if match is None or not 1 <= int(match.group(1)) <= 36_500:
        raise argparse.ArgumentTypeError(f"expected a number of days such as 90d (1d to 36500d), got {value!r}")
    return int(match.group(1))


def add_predictions_parser(commands: argparse._SubParsersAction) -> None:
    """Register `sira predictions` and its actions on the sira parser."""
    predictions = commands.add_parser("predictions", help="archive, restore and list days of the prediction log",
                                      description=__doc__.splitlines()[0])
    actions = predictions.add_subparsers(dest="predictions_command", required=True, metavar="ACTION")
    archive = actions.add_parser(
        "archive", help="move whole days before a date to the bucket as Parquet, then drop their partitions",
        description="Write each UTC day before the date to the model store as Parquet with a manifest, read it "
                    "back and check it, record it in sira_prediction_archives, then drop the day's partition.")
    when = archive.add_mutually_exclusive_group(required=True)
    when.add_argument("--before", type=day_argument, metavar="YYYY-MM-DD", help="archive the days before this one")
    when.add_argument("--older-than", type=age_argument, metavar="DAYS",
                      help="archive the days before today minus DAYS, such as 90d")
    archive.add_argument("--dry-run", action="store_true", help="list the days it would archive and stop")
    restore = actions.add_parser("restore", help="bring an archived day back into Postgres",
                                 description="Fetch the day's object, check it against its record, and copy its "
                                             "rows back into the day's partition in one transaction.")
    restore.add_argument("day", type=day_argument, metavar="YYYY-MM-DD")
    actions.add_parser("archives", help="list the archived days", description="List sira_prediction_archives.")


def command_predictions(settings: Settings, args: argparse.Namespace) -> int:
    """Run one `sira predictions` action; every error the user can act on is one line."""
    action = {"archive": archive_days, "restore": restore, "archives": list_archives}[args.predictions_command]
    try:
        return action(settings, args)
    except UsageError as exc:
        print(f"sira predictions {args.predictions_command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ArchiveError, ModelStoreError) as exc:
        print(f"sira predictions {args.predictions_command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except psycopg.OperationalError as exc:
        print(f"sira predictions {args.predictions_command}: database: {' '.join(str(exc).split())}",
              file=sys.stderr)
        return EXIT_FAILURE


def cutoff(args: argparse.Namespace, today: dt.date) -> dt.date:
    """The first day kept. A day is archived only once it ended a full day ago: late replays of a
    spool still land in yesterday."""
    before = args.before or (today - dt.timedelta(days=args.older_than))
    latest = today - dt.timedelta(days=1)
    if before > latest:
        raise UsageError(f"--before {before} would archive days that may still receive rows; "
                         f"the latest allowed is {latest} (UTC)")
    return before


def archive_days(settings: Settings, args: argparse.Namespace) -> int:
    before = cutoff(args, dt.datetime.now(dt.UTC).date())
    store = open_model_store(settings)
    with registry_database(settings) as dsn, connect(dsn, "archive") as conn:
        conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (ARCHIVE_LOCK,))
        days = days_to_archive(conn, before)
        if args.dry_run or not days:
            print(f"{len(days)} day(s) before {before} to archive" + (": " + ", ".join(map(str, days)) if days else ""))
            return EXIT_OK
        for day in days:
            record = archive_with_retries(conn, store, settings, day)
            print(f"{day}: {record.rows} rows, {record.size_bytes} bytes -> {store.describe()}/{record.object_key} "
                  f"(sha256 {record.sha256})")
    return EXIT_OK


def scratch_dir(settings: Settings) -> str:
    """The data dir, where a day's Parquet file is written before its upload (and fetched back)."""
    folder = data_path(settings.data_dir)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    return folder


def archive_with_retries(conn: psycopg.Connection, store, settings: Settings, day: dt.date):
    for attempt in range(1, DAY_ATTEMPTS + 1):
        try:
            return archive_day(conn, store, settings.archive_prefix, day, scratch_dir(settings))
        except DayChanged:
            if attempt == DAY_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def restore(settings: Settings, args: argparse.Namespace) -> int:
    store = open_model_store(settings)
    with registry_database(settings) as dsn, connect(dsn, "archive") as conn:
        conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (ARCHIVE_LOCK,))
        rows = restore_day(conn, store, args.day, scratch_dir(settings))
    print(f"{args.day}: {rows} rows restored")
    return EXIT_OK


def list_archives(settings: Settings, args: argparse.Namespace) -> int:
    with registry_database(settings) as dsn, connect(dsn, "archive") as conn:
        rows = conn.execute("SELECT day, rows, size_bytes, store, object_key, archived_at, restored_at "
                            "FROM sira_prediction_archives ORDER BY day").fetchall()
    print("day         rows        bytes       archived_at          restored_at          object")
    for day, count, size, where, key, archived_at, restored_at in rows:
        restored = f"{restored_at:%Y-%m-%d %H:%M:%S}" if restored_at else "-"
        print(f"{day}  {count:<10}  {size:<10}  {archived_at:%Y-%m-%d %H:%M:%S}  {restored:<19}  {where}/{key}")
    return EXIT_OK
