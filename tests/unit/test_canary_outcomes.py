"""The false-positive rule of workers/canary_outcomes.py, on figures as compare_canary_quality gives them."""

from __future__ import annotations

import pytest

from workers.canary_outcomes import MIN_FP_RATE_SHIFT, FpRules, judge_fp

RULES = FpRules(window_h=168, min_labelled=100, max_ratio=1.5)


def side(labelled: int, fp_rate: float | None) -> dict:
    return {"labelled": labelled, "block_fp_rate": fp_rate}


@pytest.mark.parametrize("canary, production, condemned", [
    (side(200, 0.10), side(200, 0.04), True),    # 2.5 times, six points above
    (side(200, 0.05), side(200, 0.04), False),   # under the ratio
    (side(200, 0.012), side(200, 0.004), False),  # three times, but under one point
    (side(200, 0.02), side(200, 0.0), True),     # production never wrong, the canary two points
    (side(99, 0.50), side(200, 0.04), False),    # the canary has too few labels
    (side(200, 0.50), side(99, 0.04), False),    # production has too few labels
    (side(200, None), side(200, 0.04), False),   # no legit label on the canary's side
    (side(200, 0.50), side(200, None), False),
    (side(200, 0.04 * 1.5 + MIN_FP_RATE_SHIFT), side(200, 0.04), True),
])
def test_the_rule_needs_labels_on_both_sides_a_ratio_and_a_point(canary, production, condemned):
    assert judge_fp(canary, production, RULES) is condemned


def test_a_looser_ratio_keeps_the_canary():
    assert judge_fp(side(200, 0.10), side(200, 0.04), FpRules(max_ratio=3.0)) is False
