"""What canary routing and the per-model stats add to a request, in one process.

Run: ``python -m bench.bench_canary [--iterations N]``. Mean nanoseconds of a tight loop of calls
(no per-call timer): the event's bucket (sha256 of product and event id), a counted answer and a
counted failure in the model stats block (shm/model_stats.py). The block lives in a temporary
folder and is removed at the end.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import uuid

from app.scoring.routing import canary_bucket
from bench.bench_shm import mean_ns
from shm.counters import CounterBlock
from shm.model_stats import ModelStatsWriter, stats_cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200_000)
    args = parser.parse_args()
    event_id = str(uuid.uuid4())
    rows = [("canary bucket (sha256)", mean_ns(lambda: canary_bucket("fraud_score", event_id), args.iterations))]
    with tempfile.TemporaryDirectory() as folder:
        block = CounterBlock.create("bench-stats", stats_cells(4), directory=folder)
        try:
            writer = ModelStatsWriter(block, 1)
            model_id = str(uuid.uuid4())
            rows.append(("stats: find the entry", mean_ns(lambda: writer.counters(model_id, "production"),
                                                          args.iterations)))
            counters = writer.counters(model_id, "production")
            rows.append(("stats: answered, timed",
                         mean_ns(lambda: counters.answered(0.00031, "allow"), args.iterations)))
            rows.append(("stats: answered, cache hit",
                         mean_ns(lambda: counters.answered(None, "allow"), args.iterations)))
            rows.append(("stats: failed", mean_ns(counters.failed, args.iterations)))
            writer.close()
        finally:
            block.close()
            block.unlink()
    print(f"canary bench, {args.iterations} iterations (python {sys.version.split()[0]})")
    for label, nanoseconds in rows:
        print(f"  {label:<32} {nanoseconds / 1000:6.2f} us")


if __name__ == "__main__":
    main()
