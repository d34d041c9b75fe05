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
from workers.canary_watch import MIN_BLOCK_RATE_SHIFT, CanaryWatch, RollbackRules, block_rate, judge

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


def deciding(requests: int, blocks: int, errors: int = 0, **kwargs) -> ModelFigures:
    """Window figures whose answered events (requests less errors) are ``blocks`` blocks, the rest allowed."""
    result = figures(requests, errors=errors, **kwargs)
    result.decisions[:] = [requests - errors - blocks, 0, blocks]
    return result


def test_decision_shift_rolls_back_a_canary_blocking_three_times_as_often():
    assert MIN_BLOCK_RATE_SHIFT == 0.01
    assert judge(deciding(1000, blocks=60), deciding(1000, blocks=20), RULES) == "decision_shift"  # 6% vs 2%
    assert judge(deciding(100, blocks=3), deciding(100, blocks=0), RULES) == "decision_shift"  # production blocks none
    # shadow-sized sides, each at exactly SIRA_CANARY_MIN_REQUESTS answers
    assert judge(deciding(100, blocks=30), deciding(100, blocks=10), RULES) == "decision_shift"


def test_decision_shift_needs_enough_answers_on_both_sides():
    assert judge(deciding(99, blocks=60), deciding(1000, blocks=20), RULES) is None
    assert judge(deciding(1000, blocks=600), deciding(99, blocks=1), RULES) is None
    # Enough requests, but failures answer nothing: 99 answers on the canary's side are too few
    # (production, which failed too, keeps the error rule quiet).
    assert judge(deciding(200, blocks=60, errors=101), deciding(1000, blocks=10, errors=600), RULES) is None


def test_decision_shift_tolerates_a_canary_within_the_ratio():
    assert judge(deciding(1000, blocks=39), deciding(1000, blocks=20), RULES) is None  # 1.95 times
    assert judge(deciding(1000, blocks=40), deciding(1000, blocks=20), RULES) is None  # twice: not above
    assert judge(deciding(1000, blocks=41), deciding(1000, blocks=20), RULES) == "decision_shift"
    assert judge(deciding(1000, blocks=5), deciding(1000, blocks=200), RULES) is None  # blocking less is no shift
    looser = RollbackRules(window_s=60, min_requests=100, max_block_ratio=5.0)
    assert judge(deciding(1000, blocks=60), deciding(1000, blocks=20), looser) is None


def test_decision_shift_ignores_a_shift_under_one_percentage_point():
    # 0.2% against 0.05%: four times production's, but 0.15 points
    canary, production = deciding(10_000, blocks=20), deciding(20_000, blocks=10)
    assert (block_rate(canary), block_rate(production)) == (0.002, 0.0005)
    assert judge(canary, production, RULES) is None
    assert judge(deciding(1000, blocks=9), deciding(1000, blocks=0), RULES) is None  # 0.9% against none
    assert judge(deciding(1000, blocks=10), deciding(1000, blocks=0), RULES) == "decision_shift"  # one point
    # exactly one point above (1.5% against 0.5%, 0.00999... in floating point) is enough
    assert judge(deciding(1000, blocks=15), deciding(1000, blocks=5), RULES) == "decision_shift"
    assert judge(deciding(1000, blocks=30), deciding(1000, blocks=20), RULES) is None  # a point above, 1.5 times


def test_block_rates_are_over_answered_events_not_requests():
    # 40 blocks in 600 answers (6.7%) against 21 in 700 (3%): 2.2 times. Over requests, failures
    # included, it would be 4% against 2.1%, under the ratio: the canary's failures would hide its shift.
    canary, production = deciding(1000, blocks=40, errors=400), deciding(1000, blocks=21, errors=300)
    assert judge(canary, production, RollbackRules(window_s=60, min_requests=100, max_error_ratio=1.5)) == \
        "decision_shift"


def test_error_and_latency_rules_come_before_decision_shift():
    shifted, production = dict(requests=1000, blocks=100), deciding(1000, blocks=10)
    assert judge(deciding(**shifted, errors=20), production, RULES) == "error_rate"
    assert judge(deciding(**shifted, latency_ms=5.0), production, RULES) == "latency_p95"
    assert judge(deciding(**shifted), production, RULES) == "decision_shift"


def test_cache_hits_count_in_the_block_rate_and_failures_do_not(block, writer):
    counting = writer(0)
    canary = counting.counters(CANARY, "canary")
    canary.answered(0.0003, "block")
    canary.answered(None, "block")  # a cache hit: the canary's own decision on the event
    canary.answered(0.0003, "allow")
    canary.answered(0.0003, "review")
    canary.failed()  # production answered it: no decision of the canary's
    figures_read = read_model_figures(block)[(CANARY, "canary")]
    assert (figures_read.requests, figures_read.decisions) == (5, [1, 1, 2])
    assert block_rate(figures_read) == 0.5


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


@pytest.mark.parametrize("mode, role", [("canary", "canary"), ("shadow", "shadow")])
def test_a_decision_shift_verdict_logs_both_block_rates(block, writer, mode, role):
    now = [0.0]
    watch = CanaryWatch(block, RollbackRules(window_s=10, min_requests=20), clock=lambda: now[0])
    counting = writer(1)
    table = {"fraud_score": ProductEntry("fraud_score", slot(PROD), slot(CANARY), canary_bp=5000, mode=mode)}
    watch.observe()
    for index in range(40):  # production blocks 1 in 20, the canary 1 in 4
        counting.counters(PROD, "production").answered(0.0003, "block" if index % 20 == 0 else "allow")
        counting.counters(CANARY, role).answered(0.0003, "block" if index % 4 == 0 else "review")
    now[0] = 1.0
    watch.observe()
    (verdict,) = watch.verdicts(table)
    assert (verdict.reason, verdict.canary_model_id) == ("decision_shift", CANARY)
    canary, production = verdict.figures["canary"], verdict.figures["production"]
    assert (canary["block_rate"], production["block_rate"]) == (0.25, 0.05)
    assert canary["decisions"] == {"allow": 0, "review": 30, "block": 10} and canary["answered"] == 40
    assert production["decisions"] == {"allow": 38, "review": 0, "block": 2}
    assert verdict.figures["thresholds"]["max_block_ratio"] == 2.0
    assert verdict.figures["thresholds"]["min_block_rate_shift"] == MIN_BLOCK_RATE_SHIFT


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
