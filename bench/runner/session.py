"""One benchmark run: its working folder, CPU plan, time budget and report, and the steps in order."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

from bench.runner import slo
from bench.runner.cpus import CpuPlan
from bench.runner.k6 import k6_path
from bench.runner.locust import run_locust
from bench.runner.memory import run_memory
from bench.runner.report import machine, new_document
from bench.runner.scaling import run_scaling, worker_counts
from bench.runner.scenarios import LOAD_SCENARIOS, LoadOptions, kept_open, run_load
from bench.runner.swap import run_swap
from bench.runner.targets import Target, external_sira, start_peer, start_sira
from bench.runner.wrk import wrk_path

ALL_SCENARIOS = (*LOAD_SCENARIOS, "locust", "swap", "scaling", "memory")


class BenchRun:
    """Runs the chosen scenarios within the time budget; every step's failure is recorded, not fatal."""

    def __init__(self, args, plan: CpuPlan, say: Callable[[str], None] = print):
        self.args = args
        self.plan = plan
        self.say = say
        self.workers = args.workers or plan.server_cpus
        self.options = LoadOptions(seconds=args.seconds, warmup=args.warmup, rate=args.rate,
                                   batch_rate=args.batch_rate, batch_size=args.batch_size, hot_set=args.hot_set,
                                   connections=args.connections, rounds=args.rounds)
        self.workdir = tempfile.mkdtemp(prefix="sira-bench-")
        self.started = time.monotonic()
        self.deadline = self.started + args.max_minutes * 60
        self.document = new_document(sys.argv, {**vars(args), "workers": self.workers}, plan.describe(),
                                     machine(wrk_path(), k6_path()))
        role_tokens = dict(item.split("=", 1) for item in args.role_token)
        self.external = external_sira(args.url, args.token, {"sira_service": args.token, **role_tokens}) \
            if args.url else None

    @contextlib.contextmanager
    def open_target(self, name: str) -> Iterator[Target]:
        """The named server, started for the block and stopped after it (or --url's, left running)."""
        if name == "sira" and self.external is not None:
            with kept_open(self.external) as target:
                yield target
            return
        if name == "sira":
            target = start_sira(os.path.join(self.workdir, "sira"), self.workers, self.plan.server)
        else:
            target = start_peer(name, self.workers, self.plan.server, self.workdir)
        try:
            yield target
        finally:
            target.stop()

    def step(self, name: str, action: Callable[[], None]) -> None:
        """Run one step unless the time budget is spent; record its failure and go on."""
        if time.monotonic() > self.deadline:
            self.document["notes"].append(f"{name} skipped: the --max-minutes budget was spent")
            return
        self.say(f"{name} ...")
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - a benchmark reports a failed step and runs the others
            self.document["failures"].append(f"{name}: {type(exc).__name__}: {exc}")

    def run(self, scenarios: list[str], targets: list[str]) -> dict:
        doc = self.document
        try:
            for scenario in (s for s in scenarios if s in LOAD_SCENARIOS):
                self.step(scenario, lambda s=scenario: doc["results"].extend(
                    run_load([s], targets, self.open_target, self.options, self.plan, self.say)))
            if "locust" in scenarios:
                self.step("locust", self.locust)
            if "swap" in scenarios:
                self.step("swap", self.swap)
            if "scaling" in scenarios:
                self.step("scaling", self.scaling)
            if "memory" in scenarios:
                self.step("memory", lambda: doc.update(memory=run_memory(
                    [1, 2, 4], self.args.memory_hidden, self.args.memory_layers, say=self.say)))
        finally:
            if not self.args.keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
        doc["ratios"] = slo.ratios(doc["results"])
        doc["goals"] = slo.goal_checks(doc["results"], doc["swap"])
        doc["elapsed_s"] = round(time.monotonic() - self.started, 1)
        doc["machine"]["load_average_at_end"] = os.getloadavg()
        return doc

    def locust(self) -> None:
        with self.open_target("sira") as target:
            self.document["locust"] = run_locust(target, self.args.seconds, self.args.locust_users, self.plan.load)

    def swap(self) -> None:
        if self.external is not None:
            self.document["notes"].append("swap skipped: it publishes through the server's own data dir "
                                          "and database, which --url does not give")
            return
        with self.open_target("sira") as target:
            self.document["swap"] = run_swap(target, self.plan, self.options, self.args.swap_seconds, self.workdir)

    def scaling(self) -> None:
        if self.external is not None:
            self.document["notes"].append("scaling skipped: it starts its own servers, --url gives one")
            return
        counts = self.args.scaling_workers or worker_counts(self.plan.server_cpus)
        self.document["scaling"] = run_scaling(
            lambda n: start_sira(os.path.join(self.workdir, "sira"), n, self.plan.server),
            self.plan, self.options, counts, self.say)
