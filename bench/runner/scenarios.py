"""The load scenarios: each target at a fixed rate (k6, open loop) and at its maximum (wrk, closed loop).

uncached, cached, batch and mixed run against SIRA; uncached, the one request every stack serves,
also against the peers, round after round in turn so that they share the machine's moods.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from bench.runner import slo
from bench.runner.cpus import CpuPlan
from bench.runner.k6 import run_k6
from bench.runner.targets import Target
from bench.runner.wrk import run_wrk

LOAD_SCENARIOS = ("uncached", "cached", "batch", "mixed")
PEER_SCENARIOS = ("uncached",)  # the peers serve POST /v1/infer and nothing else
SUMMED = ("requests", "errors", "dropped", "non2xx", "socket_errors")


@dataclass(frozen=True)
class LoadOptions:
    seconds: float = 10.0
    warmup: float = 2.0
    rate: int = 500
    batch_rate: int = 50
    batch_size: int = 32
    hot_set: int = 64
    connections: int = 32
    rounds: int = 1
    modes: tuple[str, ...] = ("rate", "max")

    def rate_of(self, scenario: str) -> int:
        return self.batch_rate if scenario == "batch" else self.rate

    def lua_env(self) -> dict[str, str]:
        return {"SIRA_BATCH_SIZE": str(self.batch_size), "SIRA_HOT_SET": str(self.hot_set)}


def combine(rounds: list[dict]) -> dict:
    """Several rounds of one measurement: counts added up, every other figure the median."""
    if len(rounds) == 1:
        return {**rounds[0], "rounds": 1}
    out = {"rounds": len(rounds)}
    for key, value in rounds[0].items():
        if isinstance(value, dict):  # figures by job: the median of each
            out[key] = {job: statistics.median(r[key].get(job, 0.0) for r in rounds) for job in value}
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            out[key] = value
        elif key in SUMMED:
            out[key] = sum(r[key] for r in rounds)
        else:
            out[key] = statistics.median(r[key] for r in rounds)
    return out


def measure(target: Target, scenario: str, options: LoadOptions, plan: CpuPlan) -> dict[str, dict]:
    """Warm up (closed loop), then one open-loop run at the scenario's rate and one closed-loop run."""
    threads = plan.load_cpus
    env = options.lua_env()
    if options.warmup > 0:
        run_wrk(scenario, target.url, options.warmup, options.connections, threads, target.token, plan.load, env)
    out = {}
    if "rate" in options.modes:
        out["rate"] = run_k6(scenario, target.url, options.rate_of(scenario), options.seconds, target.token,
                             plan.load, extra_env=env)
    if "max" in options.modes:
        before = target.cpu_by_job()
        out["max"] = run_wrk(scenario, target.url, options.seconds, options.connections, threads, target.token,
                             plan.load, env)
        out["max"].update(cpu_per_request(before, target.cpu_by_job(), out["max"]["requests"]))
    return out


def cpu_per_request(before: dict[str, float] | None, after: dict[str, float] | None, requests: int) -> dict:
    """Server CPU microseconds per answered request, in all and by job (workers, writer, postgres ...):
    the figure that other jobs on a shared machine disturb least."""
    if before is None or after is None or not requests:
        return {"server_cpu_us_per_request": None}
    by_job = {job: round((after[job] - before.get(job, 0.0)) * 1e6 / requests, 1) for job in after}
    return {"server_cpu_us_per_request": round(sum(by_job.values()), 1), "server_cpu_us_by_job": by_job}


def row(scenario: str, target: str, mode: str, figures: dict, options: LoadOptions) -> dict:
    """One line of the report: what ran, its figures, and the seed's SLOs judged on them."""
    checks = slo.slo_checks(scenario, figures)
    out = {"scenario": scenario, "target": target, "mode": mode, "tool": "k6" if mode == "rate" else "wrk",
           "rate": options.rate_of(scenario) if mode == "rate" else None,
           "connections": options.connections if mode == "max" else None,
           "dropped": figures.get("dropped", 0), **figures, "slo": checks, "verdict": slo.verdict(checks)}
    if scenario == "batch":
        out["events_per_s"] = figures["rps"] * options.batch_size
    return out


def run_load(scenarios: list[str], targets: list[str], open_target: Callable[[str], contextlib.AbstractContextManager],
             options: LoadOptions, plan: CpuPlan, say: Callable[[str], None] = print) -> list[dict]:
    """Every scenario on every target that serves it; the report's rows."""
    rows = []
    for scenario in scenarios:
        names = [name for name in targets if name == "sira" or scenario in PEER_SCENARIOS]
        samples: dict[tuple[str, str], list[dict]] = {}
        for round_index in range(options.rounds):
            for name in names:
                say(f"  {scenario} on {name}, round {round_index + 1} of {options.rounds}")
                with open_target(name) as target:
                    for mode, figures in measure(target, scenario, options, plan).items():
                        samples.setdefault((name, mode), []).append(figures)
        rows += [row(scenario, name, mode, combine(found), options) for (name, mode), found in samples.items()]
    return rows


@contextlib.contextmanager
def kept_open(target: Target) -> Iterator[Target]:
    """An already running target (--url): used, never stopped."""
    yield target
