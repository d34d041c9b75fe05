"""`sira_inference_metrics`: one row per window, product, model and role, written by the supervisor.

At every multiple of ``SIRA_METRICS_WINDOW_S`` (default 60 s, aligned to the clock so that every
instance cuts the same windows) the supervisor reads the host's model stats segment
(shm/model_stats.py) and writes what happened since the last cut: requests, errors, p50/p95/p99 of
the model's own run time per event, and the answers by decision. So the runbook's SQL works from
the database alone, across instances: two instances writing the same window, product, model and
role add their counts up, and the percentiles kept are the larger of the two (a conservative
merge; percentiles cannot be added).

Rows that cannot be written (Postgres away) wait for the next window, up to ``MAX_PENDING_ROWS``;
older ones are dropped with a log line (the prediction log keeps every prediction regardless).

The reading of the last cut is kept in ``$SIRA_DATA_DIR/metrics-cut.json`` with the segment's name,
so a restarted supervisor goes on from it (nothing counted twice), and the first supervisor of a
server starts from zero (nothing served before it is lost).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging

from app.db import connect
from conf.datadir import write_atomically
from shm.control import ProductEntry
from shm.counters import CounterBlock
from shm.model_stats import ModelFigures, read_model_figures

log = logging.getLogger("sira.supervisor")

MAX_PENDING_ROWS = 10_000
METRICS_CUT_FILE = "metrics-cut.json"

UPSERT = """
INSERT INTO sira_inference_metrics
    (window_start, window_seconds, product, model_id, model_role, requests, errors, p50_ms, p95_ms, p99_ms,
     allow_count, review_count, block_count)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (window_start, product, model_id, model_role) DO UPDATE SET
    requests = sira_inference_metrics.requests + EXCLUDED.requests,
    errors = sira_inference_metrics.errors + EXCLUDED.errors,
    p50_ms = GREATEST(sira_inference_metrics.p50_ms, EXCLUDED.p50_ms),
    p95_ms = GREATEST(sira_inference_metrics.p95_ms, EXCLUDED.p95_ms),
    p99_ms = GREATEST(sira_inference_metrics.p99_ms, EXCLUDED.p99_ms),
    allow_count = sira_inference_metrics.allow_count + EXCLUDED.allow_count,
    review_count = sira_inference_metrics.review_count + EXCLUDED.review_count,
    block_count = sira_inference_metrics.block_count + EXCLUDED.block_count
"""


def next_boundary(now: float, window_s: float) -> float:
    """The next multiple of the window after ``now`` (unix time)."""
    return (int(now // window_s) + 1) * window_s


def window_row(start: float, window_s: float, product: str, model_id: str, role: str,
               figures: ModelFigures) -> tuple:
    allow, review, block = figures.decisions
    return (dt.datetime.fromtimestamp(start, dt.UTC), max(1, round(window_s)), product, model_id, role,
            figures.requests, figures.errors, figures.latency_quantile_ms(0.50), figures.latency_quantile_ms(0.95),
            figures.latency_quantile_ms(0.99), allow, review, block)


class MetricsWindows:
    """Cuts the stats segment into windows and keeps the rows not yet written."""

    def __init__(self, block: CounterBlock, window_s: float, state_path: str | None = None):
        self.block = block
        self.window_s = window_s
        self.state_path = state_path
        self.products: dict[str, str] = {}  # model id -> product, from every table seen
        self.previous = self.load_last_cut()
        self.pending: list[tuple] = []

    def load_last_cut(self) -> dict[tuple[str, str], ModelFigures]:
        """The last cut of this server's segment (a restarted supervisor), else zeros from now."""
        segment = self.block.segment.name
        try:
            with open(self.state_path, encoding="utf-8") as handle:
                state = json.load(handle)
            if state["segment"] == segment:
                return {(key["model_id"], key["role"]): ModelFigures(**key["figures"]) for key in state["cut"]}
        except (OSError, TypeError, ValueError, KeyError):
            pass  # none yet, or of another server: this server's counts start at zero
        return {}

    def save_last_cut(self) -> None:
        if self.state_path is None:
            return
        state = {"segment": self.block.segment.name,
                 "cut": [{"model_id": model_id, "role": role, "figures": dataclasses.asdict(figures)}
                         for (model_id, role), figures in self.previous.items()]}
        try:
            write_atomically(self.state_path, json.dumps(state))
        except OSError as exc:
            log.warning("cannot keep the last metrics cut in %s: %s", self.state_path, exc)

    def remember_products(self, table: dict[str, ProductEntry]) -> None:
        for product, entry in table.items():
            for slot in (entry.production, entry.canary):
                if slot is not None:
                    self.products[slot.model_id] = product

    def cut(self, boundary: float) -> None:
        """Close the window that ends at ``boundary``: its rows wait in ``pending``.

        A window is stamped with the boundary it started at (the first one, with the boundary
        before the supervisor started).
        """
        reading = read_model_figures(self.block)
        start = boundary - self.window_s
        for (model_id, role), figures in sorted(reading.items()):
            delta = figures.minus(self.previous.get((model_id, role), ModelFigures()))
            product = self.products.get(model_id)
            if delta.requests and product is not None:
                self.pending.append(window_row(start, self.window_s, product, model_id, role, delta))
        self.previous = reading
        self.save_last_cut()
        if len(self.pending) > MAX_PENDING_ROWS:
            dropped = len(self.pending) - MAX_PENDING_ROWS
            del self.pending[:dropped]
            log.warning("dropped %d inference metrics rows that Postgres did not take in time", dropped)

    def write(self, dsn: str) -> int:
        """Write the pending rows in one transaction; they stay pending if Postgres refuses."""
        if not self.pending:
            return 0
        with connect(dsn, "supervisor") as conn, conn.transaction():
            with conn.cursor() as cursor:
                cursor.executemany(UPSERT, self.pending)
        written, self.pending = len(self.pending), []
        return written
