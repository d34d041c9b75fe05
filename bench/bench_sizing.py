"""What a day of the prediction log weighs: one measured day of demo rows, scaled to many pods.

Run: ``python -m bench.bench_sizing [--rows N] [--pods 12] [--rate 5000]``.

N rows of yesterday are scored by the demo model (random events around its baseline, with their
five-feature explanations), written as the writer writes them (``PostgresSink``: COPY, then INSERT
... ON CONFLICT) into a fresh database on an embedded Postgres, VACUUM ANALYZEd, and measured: the
day partition's heap and each index (pg_relation_size), then the day archived to a local store as
Parquet (``archive_day``). Bytes per row times pods x rate x 86,400 give a day at that scale;
docs/sizing.md quotes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shutil
import tempfile

import numpy as np
import psycopg
from uuid_utils import uuid7

from app.predlog.archive import archive_day, days_to_archive, partition_name
from app.predlog.log import encode_record
from app.predlog.sink import PostgresSink
from app.scoring.features import load_spec
from app.scoring.runner import ModelRunner
from app.scoring.runs import decide
from app.store.buckets import LocalModelStore
from bench.bench_pods import create_database
from workers.migrate import apply_migrations
from workers.postgres import EmbeddedPostgres

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "workers", "demo")
BATCH = 5000


def demo_records(day: dt.date, rows: int) -> list[bytes]:
    """Rows as the server logs them: scored and explained by the demo model, UUIDv7 ids of their time."""
    runner = ModelRunner(os.path.join(DEMO, "fraud_score.onnx"), load_spec(os.path.join(DEMO, "fraud_score.spec.json")))
    random = np.random.default_rng(7)
    base = np.asarray(runner.spec.baseline_row(), dtype=np.float32)
    inputs = base * random.uniform(0.2, 3.0, size=(rows, base.size)).astype(np.float32)
    scores, explanations = runner.explain_rows(inputs, top_k=5)
    start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()
    records = []
    for index, (score, explanation) in enumerate(zip(scores.tolist(), explanations, strict=True)):
        at = start + index * 86_400 / rows
        body = {"prediction_id": str(uuid7(nanoseconds=int(at * 1e9))),
                "model_id": "6f1c3f7e-2d1b-4c55-9a47-7d2f0c1e9b10", "model_role": "production",
                "score": score, "decision": decide(score, 0.8),
                "explain_summary": explanation, "latency_ms": 0.8, "cached": False}
        records.append(encode_record(body, f"evt-{index:012d}", "fraud_score", f"{index:012x}-1", at))
    return records


def write(dsn: str, folder: str, records: list[bytes]) -> None:
    async def run() -> None:
        sink = PostgresSink(dsn, os.path.join(folder, "rejected"))
        await sink.open()
        try:
            for offset in range(0, len(records), BATCH):
                await sink.write(records[offset:offset + BATCH])
        finally:
            await sink.close()

    asyncio.run(run())


def relation_sizes(conn: psycopg.Connection, table: str) -> dict[str, int]:
    sizes = {"heap (with TOAST)": conn.execute("SELECT pg_table_size(%s)", (table,)).fetchone()[0]}
    for (index,) in conn.execute("SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = %s::regclass "
                                 "ORDER BY 1", (table,)).fetchall():
        sizes[f"index {index}"] = conn.execute("SELECT pg_relation_size(%s)", (index,)).fetchone()[0]
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--pods", type=int, default=12)
    parser.add_argument("--rate", type=int, default=5000, help="predictions per second per pod")
    args = parser.parse_args()
    per_day = args.pods * args.rate * 86_400
    folder = tempfile.mkdtemp(prefix="sira-bench-sizing-")
    server = EmbeddedPostgres(os.path.join(folder, "pg"), durable=False)
    try:
        server.open()
        dsn = create_database(server.url, "sira_bench_sizing")
        apply_migrations(dsn)
        day = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
        write(dsn, folder, demo_records(day, args.rows))
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"VACUUM ANALYZE {partition_name(day)}")
            sizes = relation_sizes(conn, partition_name(day))
            days_to_archive(conn, day + dt.timedelta(days=1))
            store = LocalModelStore(os.path.join(folder, "store"))
            archived = archive_day(conn, store, "prediction-archive/", day, folder)
        sizes["Parquet archive (zstd)"] = archived.size_bytes
        sizes["Postgres in all"] = sum(size for name, size in sizes.items() if not name.startswith("Parquet"))
        print(f"one day of {args.rows:,} demo rows; at {args.pods} pods x {args.rate:,}/s: {per_day:,} rows/day")
        print(f"{'':32}{'bytes/row':>10}{'GiB/day':>10}")
        for name, size in sizes.items():
            name = name.replace(partition_name(day) + "_", "")  # index names without the day's prefix
            print(f"{name:32}{size / args.rows:>10.1f}{size / args.rows * per_day / 2**30:>10,.0f}")
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
