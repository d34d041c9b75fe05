"""The false-positive rule: a canary judged by what turned out to be fraud (outcomes, app/outcomes.py).

At every metrics window boundary (``SIRA_METRICS_WINDOW_S``) the supervisor asks Postgres, for each
canary or shadow in force, ``compare_canary_quality`` over the predictions of the last
``SIRA_CANARY_FP_WINDOW_H`` hours: by the prediction's time, not the label's, since chargebacks
arrive weeks late. Once the canary and production each have ``SIRA_CANARY_MIN_LABELLED`` labelled
predictions, the canary is rolled back with reason ``fp_rate_threshold`` when the false-positive
rate of its ``block`` (blocked legit events over labelled legit events) is above
``SIRA_CANARY_MAX_FP_RATIO`` times production's and at least ``MIN_FP_RATE_SHIFT`` above it (so that
0.2 % against 0.1 % on a few hundred labels does not roll back a model). A shadow scores the same
events as production, so its comparison is paired, event by event; a canary's events are its
share of the traffic, drawn by a keyed hash, so both sides see the same mix.

The rollback goes the way the window rules' do (app/store/canary_config.py: percent 0 and one
``sira_canary_rollback_log`` row in one transaction, so two pods never both log it), with both
sides' labelled counts, false-positive rates, precision and recall as its figures.
"""

from __future__ import annotations

import dataclasses

import psycopg

from app.db import connect
from shm.control import ProductEntry
from workers.canary_watch import RollbackVerdict, in_force

MIN_FP_RATE_SHIFT = 0.01  # the canary's FP rate must also exceed production's by one percentage point

QUALITY_SQL = ("SELECT model_role, model_id::text, predictions, labelled, fraud, legit, block_precision, "
               "block_recall, block_fp_rate FROM compare_canary_quality(%s, %s, %s, %s)")
COLUMNS = ("role", "model_id", "predictions", "labelled", "fraud", "legit", "block_precision", "block_recall",
           "block_fp_rate")


@dataclasses.dataclass(frozen=True)
class FpRules:
    window_h: int = 168        # the predictions judged: those of the last week
    min_labelled: int = 100    # labelled predictions each side needs before it is judged
    max_ratio: float = 1.5


def judge_fp(canary: dict, production: dict, rules: FpRules) -> bool:
    """Whether the canary's block false-positive rate condemns it (see the module doc)."""
    if min(canary["labelled"], production["labelled"]) < rules.min_labelled:
        return False
    if canary["block_fp_rate"] is None or production["block_fp_rate"] is None:  # no legit label on a side
        return False
    canary_rate, production_rate = canary["block_fp_rate"], production["block_fp_rate"]
    return canary_rate > rules.max_ratio * production_rate and \
        round(canary_rate - production_rate, 9) >= MIN_FP_RATE_SHIFT


def fp_verdicts(dsn: str, table: dict[str, ProductEntry], rules: FpRules) -> list[RollbackVerdict]:
    """The canaries in force that the outcomes condemn; one query per product (run in a thread)."""
    verdicts = []
    with connect(dsn, "supervisor") as conn:
        for product, entry in sorted(table.items()):
            if not in_force(entry) or entry.production is None:
                continue
            sides = quality(conn, product, entry.canary.model_id, entry.production.model_id, rules.window_h)
            canary = sides.get(entry.canary.model_id)
            production = sides.get(entry.production.model_id)
            if canary is not None and production is not None and judge_fp(canary, production, rules):
                verdicts.append(RollbackVerdict(product, entry.canary.model_id, "fp_rate_threshold", {
                    "canary": canary, "production": production, "window_h": rules.window_h,
                    "thresholds": {"max_fp_ratio": rules.max_ratio, "min_labelled": rules.min_labelled,
                                   "min_fp_rate_shift": MIN_FP_RATE_SHIFT}}))
    return verdicts


def quality(conn: psycopg.Connection, product: str, canary_id: str, production_id: str,
            hours: int) -> dict[str, dict]:
    """model id -> its compare_canary_quality row (the canary's as canary or shadow; production's own)."""
    rows = conn.execute(QUALITY_SQL, (product, canary_id, production_id, hours)).fetchall()
    sides: dict[str, dict] = {}
    for row in rows:
        figures = dict(zip(COLUMNS, row, strict=True))
        if (figures["model_id"] == production_id) == (figures["role"] == "production"):
            sides[figures["model_id"]] = figures
    return sides
