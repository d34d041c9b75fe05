"""Canary routing (app/scoring/routing.py), the model stats block (shm/model_stats.py) and the
rollback rules (workers/canary_watch.py), each in one process."""

from __future__ import annotations

import bisect
import hashlib
import secrets
import uuid

import pytest

from app.scoring.routing import BUCKETS, canary_bucket, goes_to_canary
from shm.control import ModelSlot, ProductEntry
from shm.counters import CounterBlock
from shm.model_stats import (
    BOUNDS_US,
    ModelFigures,
    ModelStatsWriter,
    read_model_figures,
    stats_cells,
)
from workers.canary_watch import CanaryWatch, RollbackRules, judge

PROD, CANARY = str(uuid.uuid4()), str(uuid.uuid4())


SEED = bytes.fromhex("5eed" * 8)


def test_the_bucket_is_the_documented_keyed_hash():
    digest = hashlib.sha256(SEED + b"fraud_score\x00evt-42").digest()
    assert canary_bucket("fraud_score", "evt-42", SEED) == int.from_bytes(digest[:8], "big") % 10_000
    unkeyed = hashlib.sha256(b"fraud_score\x00evt-42").digest()
    assert canary_bucket("fraud_score", "evt-42") == int.from_bytes(unkeyed[:8], "big") % 10_000


def test_buckets_spread_evenly_and_raising_the_percent_only_adds_events():
    events = [f"evt-{i}" for i in range(20_000)]
    at_10 = {e for e in events if goes_to_canary("fraud_score", e, 1000, SEED)}
    at_25 = {e for e in events if goes_to_canary("fraud_score", e, 2500, SEED)}
    assert 0.09 * len(events) <= len(at_10) <= 0.11 * len(events)
    assert at_10 <= at_25
    assert not any(goes_to_canary("fraud_score", e, 0, SEED) for e in events[:1000])
    assert all(goes_to_canary("fraud_score", e, BUCKETS, SEED) for e in events[:1000])


def test_another_seed_picks_other_events():
    """Event ids found to meet one canary say nothing about the next one (another seed)."""
    events = [f"evt-{i}" for i in range(20_000)]
    first = {e for e in events if goes_to_canary("fraud_score", e, 1000, secrets.token_bytes(16))}
    second_seed = secrets.token_bytes(16)
    second = {e for e in events if goes_to_canary("fraud_score", e, 1000, second_seed)}
    assert 0.09 * len(events) <= len(second) <= 0.11 * len(events)
    # independent draws: about 10% of the first canary's events are in the second one too
    assert len(first & second) <= 0.2 * len(first)


def test_the_product_takes_part_in_the_hash():
    events = [f"evt-{i}" for i in range(2000)]
    a = {e for e in events if goes_to_canary("fraud_score", e, 1000)}
    b = {e for e in events if goes_to_canary("risk_score", e, 1000)}
    assert a != b


class Writers:
    """ModelStatsWriters over one block, released before the block is closed."""

    def __init__(self, block: CounterBlock):
        self.block = block
        self.made: list[ModelStatsWriter] = []

    def __call__(self, slot: int) -> ModelStatsWriter:
        self.made.append(ModelStatsWriter(self.block, slot))
        return self.made[-1]


@pytest.fixture
def block(tmp_path):
    made = CounterBlock.create("stats", stats_cells(3), directory=str(tmp_path))
    yield made
    made.close()
    made.unlink()


@pytest.fixture
def writer(block):
    writers = Writers(block)
    yield writers
    for made in writers.made:
        made.close()


def test_counts_of_every_worker_add_up_and_a_successor_continues_its_slot(block, writer):
    first, second = writer(0), writer(2)
    for _ in range(5):
        first.counters(PROD, "production").answered(0.0004, "allow")
    first.counters(CANARY, "canary").failed()
    second.counters(PROD, "production").answered(None, "allow")  # a cache hit: counted, not timed
    writer(0).counters(PROD, "production").answered(0.0004, "allow")  # a restarted worker 0
    figures = read_model_figures(block)
    production = figures[(PROD, "production")]
    assert (production.requests, production.errors, production.scored) == (7, 0, 6)
    assert 0.36 <= production.latency_quantile_ms(0.95) <= 0.44
    assert figures[(CANARY, "canary")].errors == 1 and figures[(CANARY, "canary")].error_rate == 1.0


def test_a_full_region_frees_entries_of_models_no_longer_served(block, writer):
    one = writer(1)
    old = [str(uuid.uuid4()) for _ in range(12)]
    for model_id in old:
        one.counters(model_id, "production").answered(None, "allow")
    assert one.counters(PROD, "production") is None
    one.retire({(old[0], "production")})
    assert one.counters(PROD, "production") is not None
    assert set(read_model_figures(block)) == {(old[0], "production"), (PROD, "production")}


def figures(requests: int, errors: int = 0, latency_ms: float = 0.3, explained: int = 0,
            explained_ms: float = 3.0) -> ModelFigures:
    """Window figures whose every plain timed run took ``latency_ms``, and ``explained`` more
    runs (of the same requests) ``explained_ms``."""
    result = ModelFigures(requests=requests, errors=errors, scored=requests - errors)
    result.histogram[bisect.bisect_left(BOUNDS_US, latency_ms * 1000)] = result.scored - explained
    bucket = bisect.bisect_left(BOUNDS_US, explained_ms * 1000)
    result.histogram[bucket] += explained
    result.explained_histogram[bucket] = result.explained_scored = explained
    return result


RULES = RollbackRules(window_s=60, min_requests=100, max_error_ratio=1.5, max_latency_ratio=1.3)


def test_judge_needs_enough_requests_on_both_sides():
    assert judge(figures(99, errors=99), figures(1000), RULES) is None
    assert judge(figures(1000, errors=500), figures(99), RULES) is None


def test_judge_rolls_back_errors_above_the_ratio_and_tolerates_those_below():
    assert judge(figures(200, errors=1), figures(1000), RULES) == "error_rate"  # production never fails
    assert judge(figures(1000, errors=16), figures(1000, errors=10), RULES) == "error_rate"
    assert judge(figures(1000, errors=14), figures(1000, errors=10), RULES) is None


def test_judge_rolls_back_a_slow_canary_and_tolerates_noise():
    assert judge(figures(500, latency_ms=5.0), figures(500, latency_ms=0.3), RULES) == "latency_p95"
    assert judge(figures(500, latency_ms=0.33), figures(500, latency_ms=0.3), RULES) is None


def test_judge_compares_explained_runs_only_with_explained_runs():
    # Explanations asked on the canary's events alone: its total p95 is ten times production's,
    # its plain runs are as fast, and production has no explained run to compare with.
    steered = figures(1000, explained=400, explained_ms=3.0)
    assert steered.latency_quantile_ms(0.95) > 5 * figures(1000).latency_quantile_ms(0.95)
    assert judge(steered, figures(1000), RULES) is None
    # Both explain: like with like, a canary as fast is kept and a slow one is rolled back.
    assert judge(steered, figures(1000, explained=300, explained_ms=3.0), RULES) is None
    assert judge(steered, figures(1000, explained=300, explained_ms=1.0), RULES) == "latency_p95"
    # Slow plain runs are still caught, whatever the explained runs do.
    assert judge(figures(1000, latency_ms=1.0, explained=400), figures(1000, explained=300), RULES) == "latency_p95"


def test_plain_and_explained_runs_are_counted_apart(block, writer):
    counting = writer(1)
    for _ in range(4):
        counting.counters(CANARY, "canary").answered(0.0003, "allow")
    counting.counters(CANARY, "canary").answered(0.004, "block", explained=True)
    counting.counters(CANARY, "canary").answered(None, "allow")  # a cache hit: not a run
    canary = read_model_figures(block)[(CANARY, "canary")]
    assert (canary.requests, canary.scored, canary.explained_scored) == (6, 5, 1)
    plain, explained = canary.runs(False), canary.runs(True)
    assert (plain.scored, explained.scored) == (4, 1)
    assert 0.27 <= plain.latency_quantile_ms(0.95) <= 0.33 and 3.6 <= explained.latency_quantile_ms(0.95) <= 4.4
    assert sum(plain.histogram) == 4 and plain.latency_sum_us == 4 * 300
    later = canary.plus(canary)
    assert later.minus(canary).explained_scored == 1 and later.minus(canary).runs(False).scored == 4


def slot(model_id: str) -> ModelSlot:
    return ModelSlot(model_id=model_id, version="v", path="/m.onnx", spec_path="/m.spec.json",
                     threshold=0.5, loaded_at=0.0)


def test_the_watch_judges_the_window_and_forgets_what_is_older(block, writer):
    now = [0.0]
    watch = CanaryWatch(block, RollbackRules(window_s=10, min_requests=10), clock=lambda: now[0])
    writer = writer(0)
    table = {"fraud_score": ProductEntry("fraud_score", slot(PROD), slot(CANARY), canary_bp=1000)}
    for _ in range(50):
        writer.counters(CANARY, "canary").failed()  # old failures, before the window
        writer.counters(PROD, "production").answered(0.0003, "allow")
    watch.observe()
    now[0] = 20.0
    watch.observe()
    now[0] = 31.0
    for _ in range(50):
        writer.counters(CANARY, "canary").answered(0.0003, "allow")
        writer.counters(PROD, "production").answered(0.0003, "allow")
    watch.observe()
    assert watch.verdicts(table) == []  # the failures are older than the window
    for _ in range(20):
        writer.counters(CANARY, "canary").failed()
    now[0] = 32.0
    watch.observe()
    (verdict,) = watch.verdicts(table)
    assert verdict.reason == "error_rate" and verdict.canary_model_id == CANARY
    assert verdict.figures["canary"]["errors"] == 20
    stopped = {"fraud_score": ProductEntry("fraud_score", slot(PROD), slot(CANARY), canary_bp=0)}
    assert watch.verdicts(stopped) == []  # a stopped canary is not judged


def test_metrics_windows_cut_the_counts_between_boundaries(block, writer, tmp_path):
    from workers.metrics_windows import MetricsWindows, next_boundary

    assert next_boundary(125.0, 60) == 180.0 and next_boundary(180.0, 60) == 240.0
    state = str(tmp_path / "cut.json")
    windows = MetricsWindows(block, 60, state)
    windows.remember_products({"fraud_score": ProductEntry("fraud_score", slot(PROD), slot(CANARY), canary_bp=500)})
    counting = writer(0)
    counting.counters(PROD, "production").answered(0.0003, "allow")  # before the first cut: counted in it
    windows.cut(120.0)
    (first,) = windows.pending
    assert first[0].timestamp() == 60.0 and first[5] == 1
    windows.pending.clear()
    for decision in ("allow", "allow", "review", "block"):
        counting.counters(PROD, "production").answered(0.0003, decision)
    counting.counters(CANARY, "canary").failed()
    counting.counters(str(uuid.uuid4()), "production").answered(None, "allow")  # a product never seen: left out
    restarted = MetricsWindows(block, 60, state)  # a restarted supervisor goes on from the last cut
    restarted.products = windows.products
    restarted.cut(180.0)
    rows = {row[4]: row for row in restarted.pending}
    production, canary = rows["production"], rows["canary"]
    assert production[0].timestamp() == 120.0 and production[1] == 60 and production[2] == "fraud_score"
    assert production[5:7] == (4, 0) and production[10:] == (2, 1, 1)
    assert 0.28 <= production[8] <= 0.32  # p95 ms of 0.3 ms runs
    assert canary[5:7] == (1, 1) and canary[7] is None  # no run timed
    restarted.pending.clear()
    restarted.cut(240.0)
    assert restarted.pending == []  # nothing happened in that window


def test_the_breaker_opens_half_opens_and_closes_or_rolls_back(block, writer):
    from shm import breakers
    from workers.canary_watch import BreakerRules

    now = [0.0]
    watch = CanaryWatch(block, RollbackRules(window_s=60, min_requests=10**6), clock=lambda: now[0],
                        breaker_rules=BreakerRules(failures=3, window_s=10, cooldown_s=5, probes=4),
                        wall_clock=lambda: now[0])
    table = {"fraud_score": ProductEntry("fraud_score", slot(PROD), slot(CANARY), canary_bp=1000)}
    watch.claim_breakers(table)
    cell = breakers.find_breaker(block, CANARY)
    state = lambda: block.get(cell + breakers.STATE)  # noqa: E731
    canary = writer(0).counters(CANARY, "canary")
    watch.observe()
    for _ in range(3):
        canary.failed()
    now[0] = 1.0
    watch.observe()
    assert watch.update_breakers(table) == [] and state() == breakers.OPEN
    now[0] = 7.0
    watch.observe()
    watch.update_breakers(table)
    assert state() == breakers.HALF_OPEN
    for _ in range(4):
        canary.answered(0.0003, "allow")
    now[0] = 8.0
    watch.observe()
    watch.update_breakers(table)
    assert state() == breakers.CLOSED  # four answers and no failure: closed again
    for _ in range(3):
        canary.failed()
    now[0] = 9.0
    watch.observe()
    watch.update_breakers(table)
    now[0] = 15.0
    watch.observe()
    watch.update_breakers(table)
    assert state() == breakers.HALF_OPEN
    canary.failed()
    now[0] = 16.0
    watch.observe()
    (verdict,) = watch.update_breakers(table)
    assert verdict.reason == "circuit_breaker" and state() == breakers.OPEN
    assert breakers.breaker_states(block)[CANARY] == (breakers.OPEN, 3)
    watch.update_breakers({"fraud_score": ProductEntry("fraud_score", slot(PROD))})  # rolled back
    assert state() == breakers.CLOSED and breakers.breaker_states(block)[CANARY][1] == 3
