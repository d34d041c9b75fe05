"""Automatic canary rollback: the supervisor compares each canary with production over a window.

Every ``CHECK_S`` the supervisor reads the host's model stats block (shm/model_stats.py: what every
worker counted per model and role) and keeps the readings of the last ``SIRA_CANARY_WINDOW_S``.
The difference between the newest and the oldest reading is the window. A canary (or shadow)
model is rolled back when, in the window, it served at least ``SIRA_CANARY_MIN_REQUESTS`` requests
and production as many, and one of these rules holds (judged in this order; the first that holds is
the reason logged):

- ``error_rate``: its error rate is above ``SIRA_CANARY_MAX_ERROR_RATIO`` times production's and it
  had at least one error (so a canary that fails where production never does is rolled back);
- ``latency_p95``: its p95 latency is above ``SIRA_CANARY_MAX_LATENCY_RATIO`` times production's,
  both measured as the model's own run time per event (a batch's run divided by its events), so
  that parsing, queueing and the other model of a batch do not blur the comparison; cache hits run
  no model and are left out, a canary's failed runs too;
- ``decision_shift``: its block rate is above ``SIRA_CANARY_MAX_BLOCK_RATIO`` times production's
  *and* at least ``MIN_BLOCK_RATE_SHIFT`` (one percentage point) above it, so that a ratio of tiny
  rates (0.2% against 0.05%) does not trip it. Decisions are known when an event is scored: the
  rule needs no fraud labels and judges as soon as both sides have enough answers.

A block rate is the block decisions over the events the model answered with a decision (allow,
review or block; ``ModelFigures.decisions``), not over ``requests``: a failed request has no
decision (production answers it, ``fallback``), so counting it would dilute the canary's rate by its
failures while production's hardly has any. Cache hits are in: the cache is keyed by model, so a
hit repeats that model's own decision on the event, on both sides alike. Both sides need
``SIRA_CANARY_MIN_REQUESTS`` answered events for this rule.

The order goes from the plainest fault to the subtlest: a canary that fails is rolled back for its
failures (its failed events have no decision, so its block rate is read on a biased part of its
events), a slow one for its slowness; a shift of decisions is judged on a canary that runs
correctly and fast enough. A canary that breaks several rules gets one rollback, with the first
reason; the figures logged hold every side's error rate, p95 and block rate all the same.

In canary mode the two sides answer different events, split by the keyed hash of their ids (the
same mix of traffic, give or take chance and what a client steers: docs/canary.md). A shadow scores
the very events production answers, each after its answer left, so for a shadow the comparison is
paired event by event: a shift of block rates is the model's, never the traffic's.

Latency is compared like with like: plain runs with plain runs, explained runs (occlusion: one
extra row per feature off its baseline) with explained runs, each only when both sides have
``SIRA_CANARY_MIN_REQUESTS`` runs of that kind. A client chooses ``include_explanation`` and sees
``model_role``, so it could otherwise ask for explanations on the canary's events alone and make
the canary look slow (and roll it back) without the canary model being any slower.

Rolling back sets the product's canary percent to 0 in Postgres and writes a row to
``sira_canary_rollback_log`` with the reason and the figures (app/store/canary_config.py, in one
transaction, so two instances never both log it), which NOTIFYs every instance to re-sync; the
supervisor logs it and counts it in ``sira_canary_rollbacks_total``. The window is cleared after a
rollback so that the figures of a rolled-back canary never judge the next one.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable

from shm import breakers
from shm.control import ProductEntry
from shm.counters import CounterBlock
from shm.model_stats import DECISIONS, ModelFigures, read_model_figures

log = logging.getLogger("sira.supervisor")

CHECK_S = 1.0


@dataclasses.dataclass(frozen=True)
class RollbackRules:
    window_s: float = 60.0
    min_requests: int = 100
    max_error_ratio: float = 1.5
    max_latency_ratio: float = 1.3
    max_block_ratio: float = 2.0


# The decision_shift rule also wants the canary's block rate this far above production's (an absolute
# difference of rates: 0.01 is one percentage point), so that a ratio of tiny rates (2 blocks in 1000
# against 1 in 2000) never rolls a canary back on its own.
MIN_BLOCK_RATE_SHIFT = 0.01


@dataclasses.dataclass(frozen=True)
class BreakerRules:
    failures: int = 5        # canary failures within window_s that open the breaker
    window_s: float = 10.0
    cooldown_s: float = 30.0  # open this long, then half-open
    probes: int = 20          # answers without a failure, half-open, that close it again


@dataclasses.dataclass(frozen=True)
class RollbackVerdict:
    """A canary to roll back: which, why (``error_rate``, ``latency_p95``, ``decision_shift`` or
    ``circuit_breaker``) and the figures."""

    product: str
    canary_model_id: str
    reason: str
    figures: dict


RUN_KINDS = (("plain", False), ("explained", True))
BLOCK = DECISIONS.index("block")


def answered(figures: ModelFigures) -> int:
    """Events the model answered with a decision (runs and cache hits; failures have none)."""
    return sum(figures.decisions)


def block_rate(figures: ModelFigures) -> float:
    """Block decisions over the events answered with a decision; 0 without any."""
    total = answered(figures)
    return figures.decisions[BLOCK] / total if total else 0.0


def figures_json(figures: ModelFigures) -> dict:
    """The figures a rollback logs: totals, the runs of each kind the latency rule compares, and the
    decisions the decision_shift rule compares."""
    by_kind = {kind: figures.runs(explained) for kind, explained in RUN_KINDS}
    return {"requests": figures.requests, "errors": figures.errors, "error_rate": round(figures.error_rate, 6),
            "model_runs": figures.scored, "p95_ms": figures.latency_quantile_ms(0.95),
            **{kind: {"model_runs": runs.scored, "p95_ms": runs.latency_quantile_ms(0.95)}
               for kind, runs in by_kind.items()},
            "answered": answered(figures), "decisions": dict(zip(DECISIONS, figures.decisions)),
            "block_rate": round(block_rate(figures), 6)}


def judge(canary: ModelFigures, production: ModelFigures, rules: RollbackRules) -> str | None:
    """The reason to roll the canary back, or None (not enough requests, or it is doing fine)."""
    if canary.requests < rules.min_requests or production.requests < rules.min_requests:
        return None
    if canary.errors and canary.error_rate > rules.max_error_ratio * production.error_rate:
        return "error_rate"
    if any(slower(canary.runs(explained), production.runs(explained), rules) for _, explained in RUN_KINDS):
        return "latency_p95"
    if blocks_more(canary, production, rules):
        return "decision_shift"
    return None


def slower(canary: ModelFigures, production: ModelFigures, rules: RollbackRules) -> bool:
    """Runs of one kind: the canary's p95 above the ratio times production's, with enough of both."""
    if min(canary.scored, production.scored) < max(rules.min_requests, 1):
        return False
    return canary.latency_quantile_ms(0.95) > rules.max_latency_ratio * production.latency_quantile_ms(0.95)


def blocks_more(canary: ModelFigures, production: ModelFigures, rules: RollbackRules) -> bool:
    """The canary's block rate above the ratio times production's and at least MIN_BLOCK_RATE_SHIFT
    above it, with enough answers on both sides."""
    if min(answered(canary), answered(production)) < max(rules.min_requests, 1):
        return False
    canary_rate, production_rate = block_rate(canary), block_rate(production)
    # rounded: 0.03 - 0.02 is 0.00999... in floating point, and a shift of exactly one point counts
    return (canary_rate > rules.max_block_ratio * production_rate
            and round(canary_rate - production_rate, 9) >= MIN_BLOCK_RATE_SHIFT)


class CanaryWatch:
    """Readings of the stats block over the window, and the verdicts they give."""

    def __init__(self, block: CounterBlock, rules: RollbackRules, clock: Callable[[], float] = time.monotonic,
                 breaker_rules: BreakerRules | None = None, wall_clock: Callable[[], float] = time.time):
        self.block = block
        self.rules = rules
        self.breaker_rules = breaker_rules or BreakerRules()
        self.clock = clock
        self.wall_clock = wall_clock
        self.readings: collections.deque[tuple[float, dict]] = collections.deque()

    def observe(self) -> None:
        """Take a reading; keep the newest one that is at least the window old, and all after it."""
        now = self.clock()
        self.readings.append((now, read_model_figures(self.block)))
        keep_s = max(self.rules.window_s, self.breaker_rules.window_s)
        while len(self.readings) > 1 and self.readings[1][0] <= now - keep_s:
            self.readings.popleft()

    def clear(self) -> None:
        self.readings.clear()

    def window(self, seconds: float | None = None) -> dict[tuple[str, str], ModelFigures]:
        """(model id, role) -> what happened over the last ``seconds`` (default: the rollback window)."""
        if not self.readings:
            return {}
        newest_at, newest = self.readings[-1]
        since = newest_at - (self.rules.window_s if seconds is None else seconds)
        oldest = self.readings[0][1]
        for taken_at, reading in self.readings:
            if taken_at > since:
                break
            oldest = reading
        return {key: figures.minus(oldest.get(key, ModelFigures())) for key, figures in newest.items()}

    def verdicts(self, table: dict[str, ProductEntry]) -> list[RollbackVerdict]:
        """The canaries of the published table that break the rules in the current window."""
        window = self.window()
        found = []
        for product, entry in sorted(table.items()):
            if entry.canary is None or entry.production is None:
                continue
            if not in_force(entry):
                continue
            role = role_of(entry)
            canary = window.get((entry.canary.model_id, role), ModelFigures())
            production = window.get((entry.production.model_id, "production"), ModelFigures())
            reason = judge(canary, production, self.rules)
            if reason is not None:
                found.append(RollbackVerdict(product, entry.canary.model_id, reason, {
                    "window_s": self.rules.window_s,
                    "canary": figures_json(canary), "production": figures_json(production),
                    "thresholds": {**dataclasses.asdict(self.rules), "min_block_rate_shift": MIN_BLOCK_RATE_SHIFT},
                    "mode": entry.mode,
                    "production_model_id": entry.production.model_id,
                }))
        return found

    # -- circuit breakers ---------------------------------------------------------------------

    def claim_breakers(self, table: dict[str, ProductEntry]) -> None:
        """Every canary of a table about to be published gets its breaker (closed) first, so the
        workers find it when they load the canary."""
        keep = {entry.canary.model_id for entry in table.values() if entry.canary is not None}
        for model_id in sorted(keep):
            if breakers.claim_breaker(self.block, model_id, keep) is None:
                log.warning("no free circuit breaker for canary %s: it runs without one", model_id)

    def update_breakers(self, table: dict[str, ProductEntry]) -> list[RollbackVerdict]:
        """Open, half-open or close each canary's breaker; one that fails again half-open is rolled back."""
        rules, block = self.breaker_rules, self.block
        recent = self.window(rules.window_s)
        totals = self.readings[-1][1] if self.readings else {}
        now_ms = int(self.wall_clock() * 1000)
        self.close_breakers_out_of_force(table, now_ms)
        verdicts = []
        for product, entry in sorted(table.items()):
            if entry.canary is None or entry.production is None or not in_force(entry):
                continue
            cell = breakers.find_breaker(block, entry.canary.model_id)
            if cell is None:
                continue
            key = (entry.canary.model_id, role_of(entry))
            total = totals.get(key, ModelFigures())
            state = block.get(cell + breakers.STATE)
            if state == breakers.CLOSED and recent.get(key, ModelFigures()).errors >= rules.failures:
                self._set_breaker(cell, breakers.OPEN, now_ms, total, product, entry)
            elif state == breakers.OPEN and now_ms - block.get(cell + breakers.CHANGED_MS) >= rules.cooldown_s * 1000:
                self._set_breaker(cell, breakers.HALF_OPEN, now_ms, total, product, entry)
            elif state == breakers.HALF_OPEN:
                errors = total.errors - block.get(cell + breakers.ERRORS_MARK)
                answered = total.requests - block.get(cell + breakers.REQUESTS_MARK) - errors
                if errors > 0:
                    self._set_breaker(cell, breakers.OPEN, now_ms, total, product, entry)
                    verdicts.append(RollbackVerdict(product, entry.canary.model_id, "circuit_breaker", {
                        "breaker": {"failures_after_cooldown": errors,
                                    "times_opened": block.get(cell + breakers.TRIPS)},
                        "canary": figures_json(recent.get(key, ModelFigures())),
                        "production": figures_json(recent.get((entry.production.model_id, "production"),
                                                              ModelFigures())),
                        "window_s": rules.window_s, "mode": entry.mode,
                        "production_model_id": entry.production.model_id,
                        "thresholds": dataclasses.asdict(rules)}))
                elif answered >= rules.probes:
                    self._set_breaker(cell, breakers.CLOSED, now_ms, total, product, entry)
        return verdicts

    def close_breakers_out_of_force(self, table: dict[str, ProductEntry], now_ms: int) -> None:
        """A canary stopped or rolled back leaves its breaker closed (its opening count stays)."""
        in_force_ids = {entry.canary.model_id for entry in table.values() if in_force(entry)}
        for cell, model_id in breakers.used_breakers(self.block):
            if self.block.get(cell + breakers.STATE) != breakers.CLOSED and model_id not in in_force_ids:
                self.block.set(cell + breakers.CHANGED_MS, now_ms)
                self.block.set(cell + breakers.STATE, breakers.CLOSED)
                log.info("circuit breaker of %s is closed: the canary is no longer in force", model_id)

    def _set_breaker(self, cell: int, state: int, now_ms: int, total: ModelFigures, product: str,
                     entry: ProductEntry) -> None:
        block = self.block
        block.set(cell + breakers.CHANGED_MS, now_ms)
        block.set(cell + breakers.ERRORS_MARK, total.errors)
        block.set(cell + breakers.REQUESTS_MARK, total.requests)
        if state == breakers.OPEN:
            block.add(cell + breakers.TRIPS)
        block.set(cell + breakers.STATE, state)  # last: the workers act on it
        log.warning("circuit breaker of %s %s of %s is %s", role_of(entry), entry.canary.model_id, product,
                    breakers.STATE_NAMES[state])


def in_force(entry: ProductEntry) -> bool:
    """A canary that gets traffic, or a shadow."""
    return entry.canary is not None and (entry.mode == "shadow" or entry.canary_bp > 0)


def role_of(entry: ProductEntry) -> str:
    return "shadow" if entry.mode == "shadow" else "canary"
