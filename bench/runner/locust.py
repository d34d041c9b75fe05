"""The locust mix (bench/locustfile.py), headless, for a bounded time; per-endpoint figures from its CSV."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from bench.runner.cpus import pinned
from bench.runner.targets import REPO, Target

LOCUSTFILE = os.path.join(REPO, "bench", "locustfile.py")


def locust_path() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "locust")
    path = beside if os.access(beside, os.X_OK) else shutil.which("locust")
    if path is None:
        raise RuntimeError("locust not found: pip install locust (the bench extra)")
    return path


def run_locust(target: Target, seconds: float, users: int, cpus: tuple[int, ...] | None) -> list[dict]:
    """Rows per endpoint plus 'all': requests, errors, req/s, p50, p95, p99, max (ms)."""
    env = {**os.environ, **{f"SIRA_TOKEN_{role.upper()}": value for role, value in target.tokens.items()}}
    with tempfile.TemporaryDirectory(prefix="sira-bench-locust-") as folder:
        stats = os.path.join(folder, "stats.json")
        command = [locust_path(), "-f", LOCUSTFILE, "--host", target.url, "--headless", "--skip-log",
                   "-u", str(users), "-r", str(max(1, users // 2)), "-t", f"{max(1, round(seconds))}s",
                   "--json-file", os.path.splitext(stats)[0], "--loglevel", "WARNING", "--stop-timeout", "5"]
        done = subprocess.run(pinned(command, cpus), env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=seconds + 120, check=False)
        if not os.path.exists(stats):
            raise RuntimeError(f"locust exited {done.returncode} without stats: {done.stderr.strip()[-2000:]}")
        with open(stats, encoding="utf-8") as handle:
            return parse_locust_stats(json.load(handle))


def percentile(histogram: dict[float, int], q: float) -> float | None:
    """The q-quantile of locust's response-time histogram ({rounded ms: count})."""
    total = sum(histogram.values())
    if not total:
        return None
    rank, seen = q * total, 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= rank:
            return value
    return max(histogram)


def figures(name: str, requests: int, errors: int, seconds: float, histogram: dict[float, int],
            max_ms: float) -> dict:
    return {"endpoint": name, "requests": requests, "errors": errors,
            "rps": requests / seconds if seconds > 0 else 0.0, "p50_ms": percentile(histogram, 0.50),
            "p95_ms": percentile(histogram, 0.95), "p99_ms": percentile(histogram, 0.99), "max_ms": max_ms}


def parse_locust_stats(entries: list[dict]) -> list[dict]:
    """locust's --json-file stats as report rows, one per endpoint and one for all of them; req/s over
    the whole run (its first request to its last), latencies from locust's rounded-ms histograms."""
    rows, merged = [], {}
    first = min((e["start_time"] for e in entries), default=0.0)
    last = max((e["last_request_timestamp"] or e["start_time"] for e in entries), default=0.0)
    for entry in entries:
        histogram = {float(ms): count for ms, count in entry["response_times"].items()}
        for ms, count in histogram.items():
            merged[ms] = merged.get(ms, 0) + count
        rows.append(figures(entry["name"], entry["num_requests"], entry["num_failures"], last - first, histogram,
                            entry["max_response_time"]))
    rows.sort(key=lambda item: item["endpoint"])
    rows.append(figures("all", sum(r["requests"] for r in rows), sum(r["errors"] for r in rows), last - first,
                        merged, max((r["max_ms"] for r in rows), default=0.0)))
    return rows
