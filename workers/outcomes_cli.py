"""`sira outcomes load FILE.csv`: the chargeback files and analysts' exports that arrive by batch.

The CSV has a header row naming its columns: ``prediction_id`` or ``product`` and ``event_id``,
``label`` (fraud or legit), ``source`` (or ``--source`` for every row), and optionally
``observed_at`` (ISO 8601 with its offset). Every row goes through what POST /v1/outcomes does
(app/outcomes.py): kept, a duplicate of an outcome kept before, or refused with its reason. The
good rows are kept whatever the others did; each refused row is printed with its line number.
Exit 0 when every row was kept or a duplicate, 1 when some were refused (the rest kept), 2 for a
file that cannot be read as such a CSV (nothing kept).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys

import psycopg

from app.db import connect_async
from app.outcomes import FIELDS, SOURCE, record_outcomes
from conf.settings import Settings
from workers.cli_usage import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError
from workers.models_cli import registry_database

CHUNK = 1000           # rows read and sent per round
SHOWN_REFUSALS = 50    # refused rows printed one by one; the rest are counted


def add_outcomes_parser(commands: argparse._SubParsersAction) -> None:
    outcomes = commands.add_parser("outcomes", help="load outcomes (fraud or legit labels of events)",
                                   description=__doc__.splitlines()[0])
    actions = outcomes.add_subparsers(dest="outcomes_command", required=True, metavar="ACTION")
    load = actions.add_parser("load", help="load a CSV of outcomes", description=__doc__.split("\n\n")[1])
    load.add_argument("file", metavar="FILE.csv")
    load.add_argument("--source", help="the source of every row without a source column, such as chargeback")


def command_outcomes(settings: Settings, args: argparse.Namespace) -> int:
    try:
        rows = read_rows(args.file, args.source)
    except UsageError as exc:
        print(f"sira outcomes load: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with registry_database(settings) as dsn:
            answers = asyncio.run(load(dsn, rows))
    except psycopg.OperationalError as exc:
        print(f"sira outcomes load: database: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_FAILURE
    refused = [(line, answer) for (line, _), answer in zip(rows, answers, strict=True) if "error_code" in answer]
    for line, answer in refused[:SHOWN_REFUSALS]:
        print(f"line {line}: {answer['status']} {answer['error_code']}: {answer['message']}", file=sys.stderr)
    kept = sum(1 for answer in answers if answer["status"] == "kept")
    print(f"{kept} kept, {len(answers) - kept - len(refused)} duplicates, {len(refused)} refused")
    return EXIT_FAILURE if refused else EXIT_OK


def read_rows(path: str, source: str | None) -> list[tuple[int, dict]]:
    """(line number, item) of every data row; UsageError for a file that is not such a CSV."""
    if source is not None and SOURCE.fullmatch(source) is None:
        raise UsageError(f"--source: expected a lower-case word such as chargeback, got {source!r}")
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = set(reader.fieldnames or ())
            unknown = sorted(columns - FIELDS)
            if not columns or unknown:
                raise UsageError(f"{path}: the header must name columns among {', '.join(sorted(FIELDS))}"
                                 + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
            if "source" not in columns and source is None:
                raise UsageError(f"{path}: no source column: give --source")
            rows = [(reader.line_num, item_of(row, source)) for row in reader]
    except OSError as exc:
        raise UsageError(f"cannot read {path!r} ({exc.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"{path}: not a UTF-8 CSV ({exc})") from None
    if not rows:
        raise UsageError(f"{path}: no outcomes after the header")
    return rows


def item_of(row: dict, source: str | None) -> dict:
    """A CSV row as the API's item: empty cells are absent; --source fills a missing source."""
    item = {name: value for name, value in row.items() if name is not None and value not in (None, "")}
    if source is not None:
        item.setdefault("source", source)
    return item


async def load(dsn: str, rows: list[tuple[int, dict]]) -> list[dict]:
    answers: list[dict] = []
    async with await connect_async(dsn, "cli") as conn:
        for start in range(0, len(rows), CHUNK):
            answers += await record_outcomes(conn, [item for _, item in rows[start:start + CHUNK]], None)
    return answers
