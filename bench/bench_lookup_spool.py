"""GET /v1/infer/{id} during a Postgres outage: the disk search, bounded by the id's time, against a full scan.

Run: ``python -m bench.bench_lookup_spool [--megabytes 200] [--batch-rows 5000] [--rate 5000] [--runs 7]``.

Builds a writer spool (``app.predlog.spool.BatchSpool``, real batch files with their id-time names) of
about ``--megabytes`` of prediction records, as a writer spools them while Postgres is away at
``--rate`` predictions a second, plus ``--overflow-files`` workers' overflow files with their mtimes
over the same outage. Then times the search that ``PredictionLog.find_on_disk`` runs
(``app.predlog.files.search_files``) for an id in the newest batch, an id in the oldest and an id
that is in no file (its time inside the outage), against the full scan that searched every file
before ids were v7 (reimplemented here as ``full_scan``). Median of ``--runs`` lookups each.
The files were just written, so the page cache is warm: a cold cache makes the full scan slower
still (it reads every byte from the disk), the bounded search hardly (one batch).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable

import orjson

from app.ids import id_time_ms
from app.predlog.files import (
    OVERFLOW_FILE_RECORDS,
    OverflowName,
    encode_frames,
    files_that_may_hold,
    search_file,
    search_files,
)
from app.predlog.log import BATCHES_DIR, OVERFLOW_DIR, record_prefix
from app.predlog.spool import BatchSpool

OUTAGE_START_MS = 1_800_000_000_000


def v7_at(ms: int, rng: random.Random) -> str:
    """A UUIDv7 made at ``ms``: the version and variant bits, random bits in the rest."""
    return str(uuid.UUID(int=(ms << 80) | (0x7 << 76) | (0b10 << 62) | rng.getrandbits(62)))


def record(prediction_id: str) -> bytes:
    """A record as app.predlog.log.encode_record writes it (about 330 bytes)."""
    return orjson.dumps({
        "prediction_id": prediction_id, "event_id": "evt-" + prediction_id[-12:], "product": "fraud_score",
        "model_id": "6f1c3f7e-2d1b-4c55-9a47-7d2f0c1e9b10", "model_role": "production",
        "score": 0.123456789, "decision": "allow",
        "explanation": [{"feature": "amount", "importance": 0.4123}, {"feature": "hour_of_day", "importance": -0.1}],
        "latency_ms": 0.812, "cached": False, "request_id": "a1b2c3d4e5f6-42", "created_at": 1800000000.123})


def build_spool(folder: str, megabytes: int, batch_rows: int, rate: int, rng: random.Random) -> list[list[str]]:
    """Batches of records until the spool holds ``megabytes``; the ids of each batch, oldest batch first."""
    spool = BatchSpool(os.path.join(folder, BATCHES_DIR), max_bytes=1 << 40).open()
    batches, ms_per_record = [], 1000 / rate
    while spool.bytes_used < megabytes << 20:
        start = len(batches) * batch_rows
        ids = [v7_at(OUTAGE_START_MS + int((start + i) * ms_per_record), rng) for i in range(batch_rows)]
        spool.append([record(prediction_id) for prediction_id in ids])
        batches.append(ids)
    return batches


def build_overflow(folder: str, files: int, outage_ms: int, rng: random.Random) -> None:
    """Sealed overflow files spread over the outage, each mtime'd at the time of its last record."""
    directory = os.path.join(folder, OVERFLOW_DIR)
    os.makedirs(directory)
    for n in range(files):
        last_ms = OUTAGE_START_MS + outage_ms * (n + 1) // (files + 1)
        ids = [v7_at(last_ms - OVERFLOW_FILE_RECORDS + i, rng) for i in range(OVERFLOW_FILE_RECORDS)]
        path = os.path.join(directory, OverflowName("bench", n % 4, 1, 1000 + n, n, True).file_name())
        with open(path, "wb") as handle:
            handle.write(encode_frames([record(prediction_id) for prediction_id in ids]))
        os.utime(path, ns=(last_ms * 1_000_000, last_ms * 1_000_000))


def full_scan(directories: list[str], prefix: bytes) -> bytes | None:
    """The search before ids were v7: every file of every folder, in name order."""
    for directory in directories:
        for name in sorted(os.listdir(directory)):
            if not name.endswith(".tmp"):
                found = search_file(os.path.join(directory, name), prefix)
                if found is not None:
                    return found
    return None


def median_ms(lookup: Callable[[], bytes | None], runs: int, expect_found: bool) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        found = lookup()
        samples.append((time.perf_counter() - start) * 1000)
        assert (found is not None) == expect_found
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=200, help="size of the spool (default 200)")
    parser.add_argument("--batch-rows", type=int, default=5000, help="records a batch (default 5000)")
    parser.add_argument("--rate", type=int, default=5000, help="predictions/s spooled during the outage")
    parser.add_argument("--overflow-files", type=int, default=20, help="workers' overflow files (default 20)")
    parser.add_argument("--runs", type=int, default=7, help="lookups per case; the median is shown")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="sira-bench-lookup-")
    rng = random.Random(7)
    try:
        started = time.perf_counter()
        batches = build_spool(folder, args.megabytes, args.batch_rows, args.rate, rng)
        outage_ms = len(batches) * args.batch_rows * 1000 // args.rate
        build_overflow(folder, args.overflow_files, outage_ms, rng)
        directories = [os.path.join(folder, OVERFLOW_DIR), os.path.join(folder, BATCHES_DIR)]
        size = sum(entry.stat().st_size for directory in directories for entry in os.scandir(directory))
        print(f"spool: {len(batches)} batches of {args.batch_rows} records, {args.overflow_files} overflow files, "
              f"{size / (1 << 20):.0f} MiB, a {outage_ms / 1000:.0f} s outage at {args.rate}/s "
              f"(built in {time.perf_counter() - started:.1f} s)")
        absent = v7_at(OUTAGE_START_MS + outage_ms // 2, rng)
        cases = [("newest batch", batches[-1][args.batch_rows // 2], True),
                 ("oldest batch", batches[0][args.batch_rows // 2], True),
                 ("absent", absent, False)]
        print(f"{'id':<14}{'full scan ms':>14}{'bounded ms':>12}{'ratio':>9}{'files read':>12}"
              f"  (median of {args.runs})")
        for label, prediction_id, found in cases:
            prefix, id_ms = record_prefix(prediction_id), id_time_ms(prediction_id)
            full = median_ms(lambda prefix=prefix: full_scan(directories, prefix), args.runs, found)
            bounded = median_ms(lambda prefix=prefix, id_ms=id_ms: search_files(directories, prefix, id_ms),
                                args.runs, found)
            chosen = sum(len(files_that_may_hold(directory, id_ms)) for directory in directories)
            print(f"{label:<14}{full:>14.2f}{bounded:>12.3f}{full / bounded:>8.0f}x{chosen:>12}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
