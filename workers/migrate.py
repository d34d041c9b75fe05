"""Apply the plain SQL files of `migrations/` in order, each once, under a Postgres advisory lock.

A file is `NNN_name.sql`; it runs in one transaction together with its row in `schema_migrations`
(version, name, sha256 checksum, applied_at), so it is either applied and recorded or neither.
Every instance that starts at once takes the same advisory lock first, so each file is applied by
exactly one of them. A file that changed after it was applied stops everything: fix it with a new
migration. A file cannot use statements that refuse a transaction (CREATE INDEX CONCURRENTLY).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import re
import time
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path

import psycopg

from app.db import connect

log = logging.getLogger("sira.migrate")

# One fixed key for every SIRA database: the bytes "SIRAMIGR" as a signed 64-bit integer.
MIGRATION_LOCK_KEY = int.from_bytes(b"SIRAMIGR", "big", signed=True)
FILE_NAME = re.compile(r"(?P<version>\d{3,})_(?P<name>[A-Za-z0-9_]+)\.sql")

CREATE_HISTORY_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL CHECK (checksum ~ '^[0-9a-f]{64}$'),
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    """A migration file, or the recorded history, is wrong; the message names the file."""


@dataclass(frozen=True)
class Migration:
    """One SQL file of the migrations folder."""

    version: int
    file_name: str
    sql: str
    checksum: str


def apply_migrations(dsn: str, directory: str | None = None) -> list[str]:
    """Apply the pending migrations of directory (default: the migrations package); return their file names."""
    migrations = load_migrations(directory)
    with connect(dsn, "migrate", connect_timeout_s=10) as conn:
        # Session lock on this very connection: it is released when the connection closes, even
        # if this process dies, and the migrations run on the session that holds it.
        hold_migration_lock(conn)
        conn.execute(CREATE_HISTORY_TABLE)
        pending = pending_migrations(migrations, read_applied(conn))
        return [apply_migration(conn, migration) for migration in pending]


def load_migrations(directory: str | None = None) -> list[Migration]:
    """Read and check every *.sql file of the folder, in version order."""
    folder = Path(directory) if directory is not None else importlib.resources.files("migrations")
    migrations = []
    for entry in folder.iterdir():
        if entry.name.startswith(".") or not entry.name.lower().endswith(".sql"):
            continue
        migrations.append(read_migration(entry))
    migrations.sort(key=lambda migration: migration.version)
    for earlier, later in zip(migrations, migrations[1:]):
        if earlier.version == later.version:
            raise MigrationError(f"{earlier.file_name} and {later.file_name} have the same version")
    return migrations


def read_migration(entry: Traversable) -> Migration:
    """One migration from a file (a Path or an importlib.resources Traversable)."""
    match = FILE_NAME.fullmatch(entry.name)
    if match is None:
        raise MigrationError(f"{entry.name}: a migration file must be named NNN_name.sql (e.g. 002_add_index.sql)")
    data = entry.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MigrationError(f"{entry.name}: not UTF-8 ({err.reason} at byte {err.start})") from None
    return Migration(int(match["version"]), entry.name, text, hashlib.sha256(data).hexdigest())


def hold_migration_lock(conn: psycopg.Connection) -> None:
    """Take the session advisory lock, saying so in the log when another instance holds it."""
    if conn.execute("SELECT pg_try_advisory_lock(%s)", (MIGRATION_LOCK_KEY,)).fetchone()[0]:
        return
    log.info("another instance is migrating; waiting for it")
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))


def read_applied(conn: psycopg.Connection) -> dict[int, tuple[str, str]]:
    """version -> (file name, checksum) of the migrations already applied."""
    rows = conn.execute("SELECT version, name, checksum FROM schema_migrations").fetchall()
    return {version: (name, checksum) for version, name, checksum in rows}


def pending_migrations(migrations: list[Migration], applied: dict[int, tuple[str, str]]) -> list[Migration]:
    """The migrations still to apply, after checking that the applied ones are unchanged."""
    by_version = {migration.version: migration for migration in migrations}
    newest_known = max(by_version, default=0)
    for version, (name, checksum) in sorted(applied.items()):
        migration = by_version.get(version)
        if migration is None and version > newest_known:
            # A newer release applied it (a rollback of the code, or a rolling deploy): not our business.
            log.warning("%s is applied but unknown to this release", name)
        elif migration is None:
            raise MigrationError(f"{name} is recorded as applied but its file is missing")
        elif migration.file_name != name:
            raise MigrationError(f"{migration.file_name}: version {version} was applied as {name}")
        elif migration.checksum != checksum:
            raise MigrationError(
                f"{name} changed after it was applied (sha256 {checksum[:12]}… recorded, "
                f"{migration.checksum[:12]}… now); put the change in a new migration")
    newest_applied = max(applied, default=0)
    pending = [migration for migration in migrations if migration.version not in applied]
    for migration in pending:
        if migration.version < newest_applied:
            raise MigrationError(
                f"{migration.file_name} is older than {applied[newest_applied][0]}, which is applied; "
                "give it a higher number")
    return pending


def apply_migration(conn: psycopg.Connection, migration: Migration) -> str:
    """Run one file and record it in the same transaction; roll both back on any error."""
    started = time.perf_counter()
    try:
        with conn.transaction():
            conn.execute(migration.sql)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.file_name, migration.checksum))
    except psycopg.Error as err:
        reason = err.diag.message_primary or str(err).strip()
        raise MigrationError(f"{migration.file_name} failed and was rolled back: {reason}") from err
    log.info("applied %s in %.0f ms", migration.file_name, (time.perf_counter() - started) * 1000)
    return migration.file_name
