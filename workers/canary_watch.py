"""Automatic canary rollback: the supervisor compares each canary with production over a window.

Every ``CHECK_S`` the supervisor reads the host's model stats block (shm/model_stats.py: what every
worker counted per model and role) and keeps the readings of the last ``SIRA_CANARY_WINDOW_S``.
The difference between the newest and the oldest reading is the window. A canary (or shadow)
model is rolled back when, in the window, it served at least ``SIRA_CANARY_MIN_REQUESTS`` requests
and production as many, and either

- its error rate is above ``SIRA_CANARY_MAX_ERROR_RATIO`` times production's and it had at least
  one error (so a canary that fails where production never does is rolled back), or
- its p95 latency is above ``SIRA_CANARY_MAX_LATENCY_RATIO`` times production's, both measured
  as the model's own run time per event (a batch's run divided by its events), so that parsing,
  queueing and the other model of a batch do not blur the comparison; cache hits run no model and
  are left out, a canary's failed runs too.

Rolling back sets the product's canary percent to 0 in Postgres and writes a row to
``sira_canary_rollback_log`` with the reason and the figures (workers/canary_config.py, in one
transaction, so two instances never both log it), which NOTIFYs every instance to re-sync; the
supervisor logs it and counts it in ``sira_canary_rollbacks_total``. The window is cleared after a
rollback so that the figures of a rolled-back canary never judge the next one.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable

from shm.control import ProductEntry
from shm.counters import CounterBlock
from shm.model_stats import ModelFigures, read_model_figures

CHECK_S = 1.0


@dataclasses.dataclass(frozen=True)
class RollbackRules:
    window_s: float = 60.0
    min_requests: int = 100
    max_error_ratio: float = 1.5
    max_latency_ratio: float = 1.3


@dataclasses.dataclass(frozen=True)
class RollbackVerdict:
    """A canary to roll back: which, why (``error_rate`` or ``latency_p95``) and the figures."""

    product: str
    canary_model_id: str
    reason: str
    figures: dict


def figures_json(figures: ModelFigures) -> dict:
    return {"requests": figures.requests, "errors": figures.errors, "error_rate": round(figures.error_rate, 6),
            "model_runs": figures.scored, "p95_ms": figures.latency_quantile_ms(0.95)}


def judge(canary: ModelFigures, production: ModelFigures, rules: RollbackRules) -> str | None:
    """The reason to roll the canary back, or None (not enough requests, or it is doing fine)."""
    if canary.requests < rules.min_requests or production.requests < rules.min_requests:
        return None
    if canary.errors and canary.error_rate > rules.max_error_ratio * production.error_rate:
        return "error_rate"
    if canary.scored >= rules.min_requests and production.scored >= rules.min_requests:
        canary_p95 = canary.latency_quantile_ms(0.95)
        production_p95 = production.latency_quantile_ms(0.95)
        if canary_p95 > rules.max_latency_ratio * production_p95:
            return "latency_p95"
    return None


class CanaryWatch:
    """Readings of the stats block over the window, and the verdicts they give."""

    def __init__(self, block: CounterBlock, rules: RollbackRules, clock: Callable[[], float] = time.monotonic):
        self.block = block
        self.rules = rules
        self.clock = clock
        self.readings: collections.deque[tuple[float, dict]] = collections.deque()

    def observe(self) -> None:
        """Take a reading; keep the newest one that is at least the window old, and all after it."""
        now = self.clock()
        self.readings.append((now, read_model_figures(self.block)))
        while len(self.readings) > 1 and self.readings[1][0] <= now - self.rules.window_s:
            self.readings.popleft()

    def clear(self) -> None:
        self.readings.clear()

    def window(self) -> dict[tuple[str, str], ModelFigures]:
        """(model id, role) -> what happened between the oldest and the newest reading."""
        if not self.readings:
            return {}
        oldest, newest = self.readings[0][1], self.readings[-1][1]
        return {key: figures.minus(oldest.get(key, ModelFigures())) for key, figures in newest.items()}

    def verdicts(self, table: dict[str, ProductEntry]) -> list[RollbackVerdict]:
        """The canaries of the published table that break the rules in the current window."""
        window = self.window()
        found = []
        for product, entry in sorted(table.items()):
            if entry.canary is None or entry.production is None:
                continue
            if entry.mode != "shadow" and entry.canary_bp == 0:
                continue
            role = "shadow" if entry.mode == "shadow" else "canary"
            canary = window.get((entry.canary.model_id, role), ModelFigures())
            production = window.get((entry.production.model_id, "production"), ModelFigures())
            reason = judge(canary, production, self.rules)
            if reason is not None:
                found.append(RollbackVerdict(product, entry.canary.model_id, reason, {
                    "window_s": self.rules.window_s,
                    "canary": figures_json(canary), "production": figures_json(production),
                    "thresholds": dataclasses.asdict(self.rules), "mode": entry.mode,
                    "production_model_id": entry.production.model_id,
                }))
        return found
