"""PASS or FAIL: the seed's SLOs for each run, and the issue's goals for the whole benchmark.

Seed (sira-inference-README, "Target SLOs"): p50 < 2 ms on a cache hit, p50 < 10 ms on a miss,
p95 < 30 ms, p99 < 100 ms; a run with an error does not pass either. Goals (issue 10): at 500
requests/s uncached p50 <= 1 ms and p99 <= 5 ms; cached p50 <= 0.5 ms; maximum throughput at least
twice FastAPI's and at least 80% of the bare Falcon ceiling; no error in the swap scenario.
"""

from __future__ import annotations

from collections.abc import Iterable

# scenario -> the seed's p50 bound that applies to it (every other scenario's events are cache misses)
P50_BOUND_MS = {"cached": 2.0}
UNCACHED_P50_MS = 10.0
P95_MS = 30.0
P99_MS = 100.0


def check(name: str, value: float | None, limit: float, strict: bool = True) -> dict:
    """One comparison; value None (not measured) passes nothing and fails nothing."""
    if value is None:
        return {"name": name, "value": None, "limit": limit, "pass": None}
    ok = value < limit if strict else value <= limit
    return {"name": name, "value": value, "limit": limit, "pass": ok}


def slo_checks(scenario: str, figures: dict) -> list[dict]:
    """The seed's SLOs for one run of `scenario` (latencies in ms)."""
    p50_limit = P50_BOUND_MS.get(scenario, UNCACHED_P50_MS)
    kind = "cached" if scenario == "cached" else "uncached"
    return [
        check(f"p50 < {p50_limit:g} ms ({kind})", figures["p50_ms"], p50_limit),
        check(f"p95 < {P95_MS:g} ms", figures["p95_ms"], P95_MS),
        check(f"p99 < {P99_MS:g} ms", figures["p99_ms"], P99_MS),
        check("no errors", figures["errors"], 1),
    ]


def verdict(checks: Iterable[dict]) -> str:
    """PASS when every measured check passed, FAIL when one failed, n/a when none was measured."""
    outcomes = [item["pass"] for item in checks if item["pass"] is not None]
    if not outcomes:
        return "n/a"
    return "PASS" if all(outcomes) else "FAIL"


def find(results: list[dict], scenario: str, target: str, mode: str) -> dict | None:
    return next((row for row in results
                 if row["scenario"] == scenario and row["target"] == target and row["mode"] == mode), None)


def ratios(results: list[dict]) -> dict:
    """SIRA's uncached figures over each peer's, same run: throughput (closed loop) and latency (open loop)."""
    out = {}
    for peer in ("fastapi", "bare_falcon"):
        entry = {}
        sira_max, peer_max = find(results, "uncached", "sira", "max"), find(results, "uncached", peer, "max")
        if sira_max and peer_max and peer_max["rps"]:
            entry["max_rps"] = sira_max["rps"] / peer_max["rps"]
            sira_cpu, peer_cpu = sira_max.get("server_cpu_us_per_request"), peer_max.get("server_cpu_us_per_request")
            if sira_cpu and peer_cpu:
                entry["cpu_per_request"] = sira_cpu / peer_cpu
        sira_rate, peer_rate = find(results, "uncached", "sira", "rate"), find(results, "uncached", peer, "rate")
        if sira_rate and peer_rate:
            for field in ("p50_ms", "p99_ms"):
                if peer_rate[field]:
                    entry[f"{field} at rate"] = sira_rate[field] / peer_rate[field]
        if entry:
            out[peer] = entry
    return out


def goal_checks(results: list[dict], swap: dict | None) -> list[dict]:
    """The issue's goals, from this run's rows; a goal whose run was not part of it is not measured."""
    uncached = find(results, "uncached", "sira", "rate")
    cached = find(results, "cached", "sira", "rate")
    rate = f" at {uncached['rate']} req/s" if uncached else ""
    cached_rate = f" at {cached['rate']} req/s" if cached else ""
    ratio = ratios(results)
    return [
        check(f"uncached p50 <= 1 ms{rate}", uncached and uncached["p50_ms"], 1.0, strict=False),
        check(f"uncached p99 <= 5 ms{rate}", uncached and uncached["p99_ms"], 5.0, strict=False),
        check(f"cached p50 <= 0.5 ms{cached_rate}",
              cached and cached["p50_ms"], 0.5, strict=False),
        at_least("max throughput >= 2x FastAPI's", ratio.get("fastapi", {}).get("max_rps"), 2.0),
        at_least("max throughput >= 80% of bare Falcon's", ratio.get("bare_falcon", {}).get("max_rps"), 0.8),
        check("zero errors in the swap scenario", swap and swap["errors"], 1),
    ]


def at_least(name: str, value: float | None, limit: float) -> dict:
    if value is None:
        return {"name": name, "value": None, "limit": limit, "pass": None}
    return {"name": name, "value": value, "limit": limit, "pass": value >= limit}
