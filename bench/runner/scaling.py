"""Scaling: SIRA's maximum uncached throughput with 1, 2, 4 ... workers, up to the server's CPUs.

Each count gets a fresh `sira serve` (same data dir, so the same Postgres); each worker's PSS is
read from /proc while it is warm, to show what one more worker costs in memory.
"""

from __future__ import annotations

from collections.abc import Callable

from bench.runner.cpus import CpuPlan
from bench.runner.memory import pss_mib
from bench.runner.scenarios import LoadOptions
from bench.runner.targets import Target
from bench.runner.wrk import run_wrk


def worker_counts(cpus: int) -> list[int]:
    """1, 2, 4 ... up to cpus, and cpus itself (6 cores: 1, 2, 4, 6)."""
    counts, count = [], 1
    while count <= cpus:
        counts.append(count)
        count *= 2
    if cpus >= 1 and counts[-1] != cpus:
        counts.append(cpus)
    return counts


def run_scaling(start: Callable[[int], Target], plan: CpuPlan, options: LoadOptions,
                counts: list[int], say: Callable[[str], None] = print) -> list[dict]:
    rows = []
    for workers in counts:
        say(f"  scaling: {workers} worker(s)")
        target = start(workers)
        try:
            env = options.lua_env()
            threads = plan.load_cpus
            run_wrk("uncached", target.url, options.warmup or 1, options.connections, threads, target.token,
                    plan.load, env)
            figures = run_wrk("uncached", target.url, options.seconds, options.connections, threads,
                              target.token, plan.load, env)
            pss = [pss_mib(pid) for pid in target.worker_pids()]
        finally:
            target.stop()
        rows.append({"workers": workers, "rps": figures["rps"], "p50_ms": figures["p50_ms"],
                     "p99_ms": figures["p99_ms"], "errors": figures["errors"],
                     "worker_pss_mib": [round(value, 1) for value in pss]})
    base = rows[0]["rps"] if rows and rows[0]["rps"] else None
    for item in rows:
        item["speedup"] = item["rps"] / base if base else None
    return rows
