"""The prediction log: what an append costs on the request path, and how many rows/s the writer sustains.

Run: ``python -m bench.bench_writer [--rows N] [--no-fsync] [--seconds S]``.

1. Append: ``PredictionLog.append`` (encode the row as JSON + one ring append) timed per call
   (median and p99, timer included) and as a loop mean; the ring is emptied, untimed, when full.
   Also the spill path (ring full: one write to the overflow file).
2. Backlog: N rows waiting in the rings (as after an outage), then a real writer process
   (``python -m workers.writer_process``) drains them into a real Postgres (embedded, fsync on unless
   ``--no-fsync``); rows/s from the writer's start to the last commit, read from Postgres.
3. Live: two producer processes append as fast as they can for S seconds while the writer drains
   (the writer competes with them for the CPU, as with HTTP workers); rows/s committed.
Segments live in /dev/shm and are unlinked at the end; the Postgres and spool live in a temp folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import orjson
import psycopg

from app.ids import new_prediction_id
from app.predlog.log import PredictionLog, PredictionLogConfig, Stat, stat_cells
from shm.counters import CounterBlock
from shm.ring import QueueRings
from shm.segment import segment_name
from workers.migrate import apply_migrations
from workers.postgres import EmbeddedPostgres

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def answer() -> dict:
    """A response body like app.http.infer's, with a two-feature explanation."""
    return {"prediction_id": new_prediction_id(), "model_id": "6f1c3f7e-2d1b-4c55-9a47-7d2f0c1e9b10",
            "model_role": "production", "score": 0.123456789, "decision": "allow",
            "explain_summary": [{"feature": "amount", "importance": 0.4123},
                                {"feature": "hour_of_day", "importance": -0.1}],
            "latency_ms": 0.812, "cached": False}


def make_config(folder: str, dsn: str, slots: int, ring_bytes: int) -> PredictionLogConfig:
    instance = "bench" + uuid.uuid4().hex[:8]
    return PredictionLogConfig(instance_id=instance, rings_segment=segment_name(instance, "predlog"),
                               stats_segment=segment_name(instance, "predstats"), slots=slots,
                               ring_bytes=ring_bytes, spool_dir=os.path.join(folder, instance, "spool"),
                               database_url=dsn, spool_max_bytes=1 << 34, batch_rows=5000)


def bench_append(folder: str, iterations: int) -> None:
    config = make_config(folder, "", 1, 4 << 20)
    with QueueRings.create(config.rings_segment, 1, config.ring_bytes) as rings, \
            CounterBlock.create(config.stats_segment, stat_cells(1)) as stats:
        log = PredictionLog(config, 0, rings, stats)
        reader = rings.reader(0)
        bodies = [answer() for _ in range(1000)]
        samples, clock = [], time.perf_counter_ns
        for i in range(iterations):
            body = bodies[i % 1000]
            if reader.depth_bytes() > config.ring_bytes - 4096:
                reader.commit(reader.peek_batch(1 << 30, 1 << 40)[1])
            start = clock()
            log.append(body, "evt-123", "fraud_score", "a1b2c3d4e5f6-42")
            samples.append(clock() - start)
        timer = statistics.median([-(clock() - clock()) for _ in range(10000)])
        samples.sort()
        print(f"append (encode + ring), per call: median {statistics.median(samples) / 1000:.2f} us, "
              f"p99 {samples[int(len(samples) * 0.99)] / 1000:.2f} us (timer ~{timer / 1000:.2f} us)")
        elapsed, chunk = 0, 4000  # a chunk fits the ring; it is emptied between chunks, untimed
        for _ in range(max(1, iterations // chunk)):
            reader.commit(reader.peek_batch(1 << 30, 1 << 40)[1])
            start = clock()
            for i in range(chunk):
                log.append(bodies[i % 1000], "evt-123", "fraud_score", "a1b2c3d4e5f6-42")
            elapsed += clock() - start
        print(f"append, loop mean: {elapsed / (max(1, iterations // chunk) * chunk) / 1000:.2f} us "
              f"(record {len(reader.oldest() or b'')} bytes)")
        while rings.writer(0).free_bytes() > 1024:  # fill the ring: the next appends spill
            log.append(bodies[0], "evt", "fraud_score", None)
        log = PredictionLog(config, 0, rings, stats)
        spill = []
        for i in range(2000):
            start = clock()
            log.append(bodies[i % 1000], "evt-123", "fraud_score", "a1b2c3d4e5f6-42")
            spill.append(clock() - start)
        log.spill.seal()
        print(f"append when the ring is full (spill to the overflow file): median "
              f"{statistics.median(spill) / 1000:.2f} us")


def fill(config: PredictionLogConfig, slot: int, rows: int, rings=None, stats=None) -> None:
    """Append ``rows`` records to ``slot`` (in a producer process, or the caller's)."""
    own = rings is None
    rings = rings or QueueRings.attach(config.rings_segment)
    stats = stats or CounterBlock.attach(config.stats_segment)
    log = PredictionLog(config, slot, rings, stats)
    for _ in range(rows):
        log.append(answer(), "evt-123", "fraud_score", "a1b2c3d4e5f6-42")
    if own:
        stats.close()
        rings.close()


def produce_until(config: PredictionLogConfig, slot: int, stop_at: float, counter) -> None:
    """A producer process: append as fast as the ring takes them, until ``stop_at``."""
    rings = QueueRings.attach(config.rings_segment)
    stats = CounterBlock.attach(config.stats_segment)
    log = PredictionLog(config, slot, rings, stats)
    reader = rings.reader(slot)  # only to read the depth: it never commits
    sent = 0
    while time.time() < stop_at:
        if config.ring_bytes - reader.depth_bytes() < 65536:
            time.sleep(0.0005)  # the bench measures the writer: keep to the ring, no spill
            continue
        for _ in range(100):
            log.append(answer(), "evt-123", "fraud_score", "a1b2c3d4e5f6-42")
        sent += 100
    counter.value = sent


def start_writer(config: PredictionLogConfig, log_path: str) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "workers.writer_process",
                                 orjson.dumps(dataclasses.asdict(config))],
                                cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=log,
                                stderr=subprocess.STDOUT)


def rows_in(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM siramodel_predictions").fetchone()[0]


def bench_backlog(folder: str, dsn: str, rows: int) -> None:
    config = make_config(folder, dsn, 2, 128 << 20)
    with QueueRings.create(config.rings_segment, 2, config.ring_bytes) as rings, \
            CounterBlock.create(config.stats_segment, stat_cells(2)) as stats:
        for slot in range(2):
            fill(config, slot, rows // 2, rings, stats)
        writer = start_writer(config, os.path.join(folder, "writer-backlog.log"))
        started = time.perf_counter()
        try:
            while stats.get(Stat.ROWS_WRITTEN) < rows:
                time.sleep(0.01)
            elapsed = time.perf_counter() - started
        finally:
            writer.send_signal(signal.SIGTERM)
            writer.wait(60)
        batches = stats.get(Stat.BATCHES_WRITTEN)
        flush_ms = stats.get(Stat.FLUSH_US_TOTAL) / max(batches, 1) / 1000
        assert rows_in(dsn) == rows
        print(f"writer, backlog of {rows} rows: {rows / elapsed:,.0f} rows/s "
              f"({elapsed:.2f} s from process start; {batches} batches, mean flush {flush_ms:.1f} ms "
              f"for {rows / max(batches, 1):.0f} rows)")


def bench_live(folder: str, dsn: str, seconds: float) -> None:
    config = make_config(folder, dsn, 2, 64 << 20)
    with QueueRings.create(config.rings_segment, 2, config.ring_bytes), \
            CounterBlock.create(config.stats_segment, stat_cells(2)) as stats:
        writer = start_writer(config, os.path.join(folder, "writer-live.log"))
        while stats.get(Stat.WRITER_PID) != writer.pid:
            time.sleep(0.01)
        before = rows_in(dsn)
        stop_at = time.time() + seconds
        counters = [multiprocessing.Value("q", 0) for _ in range(2)]
        producers = [multiprocessing.Process(target=produce_until, args=(config, slot, stop_at, counters[slot]))
                     for slot in range(2)]
        started = time.perf_counter()
        written_at_start = stats.get(Stat.ROWS_WRITTEN)
        for process in producers:
            process.start()
        for process in producers:
            process.join()
        elapsed = time.perf_counter() - started
        written = stats.get(Stat.ROWS_WRITTEN) - written_at_start
        writer.send_signal(signal.SIGTERM)
        writer.wait(60)
        sent = sum(counter.value for counter in counters)
        assert rows_in(dsn) - before == sent
        print(f"writer, live ({seconds:.0f} s, 2 producer processes): {written / elapsed:,.0f} rows/s committed "
              f"while they appended {sent / elapsed:,.0f} rows/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--seconds", type=float, default=10.0, help="of the live run (0: skip it)")
    parser.add_argument("--iterations", type=int, default=100_000)
    parser.add_argument("--no-fsync", action="store_true", help="Postgres with fsync off (as in the tests)")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="sira-bench-writer-")
    server = EmbeddedPostgres(os.path.join(folder, "pg"), durable=not args.no_fsync)
    try:
        bench_append(folder, args.iterations)
        server.open()
        apply_migrations(server.url)
        print(f"Postgres: embedded, fsync {'off' if args.no_fsync else 'on'}")
        bench_backlog(folder, server.url, args.rows)
        if args.seconds > 0:
            bench_live(folder, server.url, args.seconds)
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
