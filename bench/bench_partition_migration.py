"""How long migrations/004 holds an existing prediction log while it converts it to day partitions.

Run: ``python -m bench.bench_partition_migration [--rows N] [--days D] [--no-fsync]``.

A database at migration 003 gets N rows spread over D days (with explanations, as the writer
writes them), then 004 runs, timed; the rate is rows per second of the conversion, the figure
docs/prediction-log.md quotes to size a maintenance window.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import psycopg

from bench.bench_pods import create_database
from workers.migrate import apply_migrations
from workers.postgres import EmbeddedPostgres

MIGRATIONS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "migrations")

FILL_SQL = """
INSERT INTO siramodel_predictions (prediction_id, event_id, product, model_id, model_role, score, decision,
    explanation, latency_ms, cached, request_id, created_at)
SELECT gen_random_uuid(), 'evt-' || n, 'fraud_score', '6f1c3f7e-2d1b-4c55-9a47-7d2f0c1e9b10', 'production',
       random(), 'allow', '[{"feature": "amount", "importance": 0.41}, {"feature": "hour_of_day", "importance": -0.1}]',
       0.8, false, 'req-' || n, now() - make_interval(secs => (n %% %(days)s) * 86400 + n %% 86400)
  FROM generate_series(1, %(rows)s) AS n
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--no-fsync", action="store_true")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="sira-bench-partitions-")
    server = EmbeddedPostgres(os.path.join(folder, "pg"), durable=not args.no_fsync)
    try:
        server.open()
        dsn = create_database(server.url, "sira_bench_partition_migration")
        before = os.path.join(folder, "migrations")
        os.mkdir(before)
        for name in sorted(os.listdir(MIGRATIONS)):
            if name.endswith(".sql") and name < "004":
                shutil.copy(os.path.join(MIGRATIONS, name), before)
        apply_migrations(dsn, before)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(FILL_SQL, {"rows": args.rows, "days": args.days})
            size = conn.execute("SELECT pg_total_relation_size('siramodel_predictions')").fetchone()[0]
        started = time.perf_counter()
        apply_migrations(dsn)
        elapsed = time.perf_counter() - started
        with psycopg.connect(dsn) as conn:
            kept = conn.execute("SELECT count(*) FROM siramodel_predictions").fetchone()[0]
        assert kept == args.rows
        print(f"migration 004 on {args.rows:,} rows over {args.days} days ({size / 2**20:,.0f} MiB with indexes, "
              f"fsync {'off' if args.no_fsync else 'on'}): {elapsed:.1f} s, {args.rows / elapsed:,.0f} rows/s")
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
