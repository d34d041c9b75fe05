"""Per-request costs of the scoring path on the demo model: `python -m bench.bench_scoring`.

Times build_row, score_row, explain_row and a 256-row score_rows with time.perf_counter_ns, one
call per sample after a warm-up, and prints the median and p99 in microseconds, then what an
explanation costs relative to a plain score.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.scoring.features import load_spec
from app.scoring.runner import ModelRunner
from workers.demo.train import generate_transactions

DEMO = Path(__file__).resolve().parents[1] / "workers" / "demo"

LEGIT = {
    "amount": 52.3, "currency": "usd", "country": "US", "payment_method": "card",
    "features": {"hour_of_day": 14, "is_weekend": 0, "account_age_days": 800, "txn_count_24h": 1,
                 "amount_avg_30d": 60.0, "distinct_cards_7d": 1, "ip_country_mismatch": 0,
                 "failed_logins_24h": 0, "is_new_device": 0},
}
HIGH_RISK = {
    "amount": 2000.0, "currency": "USD", "country": "NG", "payment_method": "crypto",
    "features": {"hour_of_day": 3, "is_weekend": 1, "account_age_days": 2, "txn_count_24h": 12,
                 "amount_avg_30d": 100.0, "distinct_cards_7d": 3, "ip_country_mismatch": 1,
                 "failed_logins_24h": 2, "is_new_device": 1},
}


def measure(call: Callable[[], object], iterations: int, warmup: int) -> tuple[float, float]:
    """Median and p99 of one call, in microseconds; GC off so it does not land in a sample."""
    for _ in range(warmup):
        call()
    samples = [0] * iterations
    clock = time.perf_counter_ns
    gc.disable()
    try:
        for i in range(iterations):
            start = clock()
            call()
            samples[i] = clock() - start
    finally:
        gc.enable()
    samples.sort()
    return statistics.median(samples) / 1000, samples[int(iterations * 0.99)] / 1000


def run(iterations: int, warmup: int) -> dict[str, tuple[float, float]]:
    spec = load_spec(DEMO / "fraud_score.spec.json")
    runner = ModelRunner(str(DEMO / "fraud_score.onnx"), spec)
    row = np.empty(len(spec), dtype=np.float32)
    legit_row, risky_row = np.empty_like(row), np.empty_like(row)
    spec.build_row(LEGIT, legit_row)
    spec.build_row(HIGH_RISK, risky_row)
    batch, _ = generate_transactions(256, seed=99)
    changed = {name: int((r != spec.baseline_row()).sum()) for name, r in
               (("legit", legit_row), ("high-risk", risky_row))}
    print(f"features: {len(spec)}; changed from baseline: {changed}")

    results = {
        "build_row": measure(lambda: spec.build_row(HIGH_RISK, row), iterations, warmup),
        "score_row": measure(lambda: runner.score_row(risky_row), iterations, warmup),
        "explain_row (legit)": measure(lambda: runner.explain_row(legit_row), iterations, warmup),
        "explain_row (high-risk)": measure(lambda: runner.explain_row(risky_row), iterations,
                                           warmup),
        "score_rows x256": measure(lambda: runner.score_rows(batch), max(iterations // 20, 100),
                                   max(warmup // 20, 10)),
    }
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    args = parser.parse_args(argv)
    print(f"python {platform.python_version()}, onnxruntime {ort.__version__}, numpy "
          f"{np.__version__}, {platform.processor() or platform.machine()}")
    results = run(args.iterations, args.warmup)
    print(f"{'operation':<26}{'median us':>12}{'p99 us':>12}")
    for name, (median, p99) in results.items():
        print(f"{name:<26}{median:>12.2f}{p99:>12.2f}")
    per_row = results["score_rows x256"][0] / 256
    print(f"{'score_rows, per row':<26}{per_row:>12.2f}")
    plain = results["score_row"][0]
    for name in ("explain_row (legit)", "explain_row (high-risk)"):
        print(f"{name} costs {results[name][0] / plain:.1f}x a plain score_row "
              f"(+{results[name][0] - plain:.1f} us)")


if __name__ == "__main__":
    main()
