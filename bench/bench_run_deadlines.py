"""What a deadline adds to a model run, in one process: ``python -m bench.bench_run_deadlines``.

Side by side, in rounds (the median is printed): one demo-model score with no deadline (every
production request without ``options.timeout_ms``), and the same score with a deadline that does
not pass (a request with ``timeout_ms``, or a canary run within its budget): ``RunOptions``, the
watchdog's arm (which wakes its thread) and disarm (app/scoring/deadlines.py).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from app.scoring.features import FeatureSpec
from app.scoring.runner import ModelRunner
from app.scoring.runs import run_model
from bench.bench_shm import mean_ns
from workers.bootstrap import demo_files


class Served:
    def __init__(self, runner: ModelRunner):
        self.runner = runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    path, spec = demo_files()
    spec = FeatureSpec.from_dict(spec)
    model = Served(ModelRunner(path, spec))
    row = spec.baseline_row().copy()
    row[0] = 250.0
    plain, armed = [], []
    for _ in range(args.rounds):
        plain.append(mean_ns(lambda: run_model(model, row, False), args.iterations))
        armed.append(mean_ns(lambda: run_model(model, row, False, time.perf_counter() + 10.0), args.iterations))
    print(f"run deadlines, {args.rounds} rounds of {args.iterations} (python {sys.version.split()[0]}), medians:")
    print(f"  {'score, no deadline':<32} {statistics.median(plain) / 1000:6.2f} us")
    print(f"  {'score, with a deadline':<32} {statistics.median(armed) / 1000:6.2f} us")
    print(f"  {'added by the deadline':<32} {(statistics.median(armed) - statistics.median(plain)) / 1000:6.2f} us")


if __name__ == "__main__":
    main()
