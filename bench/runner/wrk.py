"""Closed-loop load with wrk: each connection sends its next request when the last one is answered.

That finds the maximum throughput; its latencies are those of a saturated server with its own
queue (coordinated omission), so the latency SLOs are judged on the open-loop runs (k6.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess

from bench.runner.cpus import pinned

WRK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "wrk")


def wrk_path() -> str:
    path = os.environ.get("WRK") or shutil.which("wrk")
    if path is None:
        raise RuntimeError("wrk not found on PATH (Debian/Ubuntu: apt-get install wrk), or set WRK=/path/to/wrk")
    return path


def run_wrk(scenario: str, url: str, seconds: float, connections: int, threads: int, token: str | None,
            cpus: tuple[int, ...] | None = None, extra_env: dict[str, str] | None = None) -> dict:
    """Run bench/wrk/<scenario>.lua against url for `seconds`; the figures of parse_wrk."""
    env = {**os.environ, "SIRA_WRK_DIR": WRK_DIR, "SIRA_TOKEN": token or "",
           "SIRA_RUN_SALT": str(random.randrange(1, 36500)), **(extra_env or {})}
    path = "/v1/infer/batch" if scenario == "batch" else "/v1/infer"
    command = [wrk_path(), "-t", str(max(1, min(threads, connections))), "-c", str(connections),
               "-d", f"{max(1, round(seconds))}s", "--timeout", "10s", "--latency",
               "-s", os.path.join(WRK_DIR, f"{scenario}.lua"), url + path]
    done = subprocess.run(pinned(command, cpus), env=env, capture_output=True, text=True,
                          timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return parse_wrk(done.stdout)


def parse_wrk(output: str) -> dict:
    """The figures of the `JSON {...}` line that bench/wrk/common.lua's done() writes, in ms and req/s."""
    line = next((line for line in output.splitlines() if line.startswith("JSON ")), None)
    if line is None:
        raise ValueError(f"no JSON line in wrk's output:\n{output}")
    raw = json.loads(line[5:])
    seconds = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"],
        "seconds": round(seconds, 3),
        "rps": raw["requests"] / seconds if seconds > 0 else 0.0,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p95_ms": raw["p95_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "mean_ms": raw["mean_us"] / 1000,
        "errors": raw["socket_errors"] + raw["timeouts"] + raw["non2xx"],
        "non2xx": raw["non2xx"],
        "socket_errors": raw["socket_errors"] + raw["timeouts"],
    }
