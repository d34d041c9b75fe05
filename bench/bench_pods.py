"""Many pods, one Postgres: K prediction writers copying into the partitioned log at once.

Run: ``python -m bench.bench_pods [--writers 1,2,4,8] [--rows-per-writer N] [--no-fsync]``.

Each of the K writers is a real ``python -m workers.writer_process`` with rings of its own, filled
beforehand with N records each (untimed; UUIDv7 ids, the demo model's explanation), as K pods
would drain a backlog after an outage. All K start at once against one embedded Postgres (fsync on
unless ``--no-fsync``), on a fresh database per K, migrated: the table is the day-partitioned one.
Measured from the writers' start to the last row committed (counted in Postgres):

- rows/s in all, and per writer;
- Postgres CPU per row: user + system time of the postmaster and every backend (those that ended
  are in the postmaster's children's time), read from /proc before and after;
- writers' CPU per row, from /proc the same way.

On a machine with fewer cores than K writers plus Postgres needs, the writers and Postgres share
them: the figure is the machine's, say which machine it was.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import time

import psycopg
import psycopg.conninfo
import psycopg.sql

from app.ids import new_prediction_id
from app.predlog.log import stat_cells
from bench.bench_writer import fill, make_config, start_writer
from shm.counters import CounterBlock
from shm.ring import QueueRings
from workers.migrate import apply_migrations
from workers.postgres import EmbeddedPostgres

TICKS = os.sysconf("SC_CLK_TCK")
RING_BYTES = 128 << 20


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime of a process (and of its reaped children): /proc/<pid>/stat fields 14-17."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    used = int(fields[11]) + int(fields[12])  # utime, stime
    if children:
        used += int(fields[13]) + int(fields[14])  # cutime, cstime
    return used / TICKS


def postgres_cpu(postmaster: int) -> float:
    """The postmaster's CPU with its reaped children's, plus every live backend's."""
    total = cpu_seconds(postmaster, children=True)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
                if parent == postmaster:
                    total += cpu_seconds(int(entry))
            except (OSError, ValueError):
                continue  # it ended meanwhile: its time is in the postmaster's children's
    return total


def postmaster_of(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        with open(f"/proc/{backend}/stat", encoding="ascii") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])


def database_url(server_url: str, name: str) -> str:
    return psycopg.conninfo.make_conninfo(server_url, dbname=name)


def create_database(server_url: str, name: str) -> str:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {}").format(psycopg.sql.Identifier(name)))
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    return database_url(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {}").format(psycopg.sql.Identifier(name)))


def rows_in(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM siramodel_predictions").fetchone()[0]


def run(folder: str, dsn: str, writers: int, rows: int) -> dict:
    configs = [make_config(folder, dsn, 1, RING_BYTES) for _ in range(writers)]
    segments = []
    try:
        for config in configs:
            rings = QueueRings.create(config.rings_segment, 1, config.ring_bytes)
            stats = CounterBlock.create(config.stats_segment, stat_cells(1))
            segments += [rings, stats]
            fill(config, 0, rows, rings, stats)
        postmaster = postmaster_of(dsn)
        pg_before = postgres_cpu(postmaster)
        started = time.perf_counter()
        processes = [start_writer(config, os.path.join(folder, f"writer-{writers}-{index}.log"))
                     for index, config in enumerate(configs)]
        try:
            while rows_in(dsn) < writers * rows:
                time.sleep(0.02)
            elapsed = time.perf_counter() - started
            pg_used = postgres_cpu(postmaster) - pg_before
            writers_used = sum(cpu_seconds(process.pid) for process in processes)
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                process.wait(60)
        total = writers * rows
        return {"writers": writers, "rows": total, "seconds": elapsed, "rows_per_s": total / elapsed,
                "pg_us_per_row": pg_used / total * 1e6, "writer_us_per_row": writers_used / total * 1e6}
    finally:
        for segment in segments:
            segment.close()
            segment.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", default="1,2,4,8", help="comma-separated counts of writers (pods)")
    parser.add_argument("--rows-per-writer", type=int, default=150_000)
    parser.add_argument("--no-fsync", action="store_true", help="Postgres with fsync off (as in the tests)")
    args = parser.parse_args()
    counts = [int(part) for part in args.writers.split(",")]
    folder = tempfile.mkdtemp(prefix="sira-bench-pods-")
    server = EmbeddedPostgres(os.path.join(folder, "pg"), durable=not args.no_fsync)
    try:
        server.open()
        print(f"Postgres: embedded, fsync {'off' if args.no_fsync else 'on'}; {os.cpu_count()} cores; "
              f"{args.rows_per_writer:,} rows per writer (ids like {new_prediction_id()})")
        print(f"{'writers':>7}  {'rows/s':>9}  {'per writer':>10}  {'seconds':>7}  {'pg us/row':>9}  "
              f"{'writer us/row':>13}")
        for count in counts:
            dsn = create_database(server.url, f"sira_bench_pods_{count}")
            try:
                apply_migrations(dsn)
                result = run(folder, dsn, count, args.rows_per_writer)
            finally:
                drop_database(server.url, f"sira_bench_pods_{count}")
            print(f"{count:>7}  {result['rows_per_s']:>9,.0f}  {result['rows_per_s'] / count:>10,.0f}  "
                  f"{result['seconds']:>7.2f}  {result['pg_us_per_row']:>9.1f}  {result['writer_us_per_row']:>13.1f}")
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
