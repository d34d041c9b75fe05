"""The ONNX scorer of app/scoring/runner.py on the committed demo model."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from app.scoring.features import FeatureSpec, decide
from app.scoring.runner import ModelLoadError, ModelRunner, ModelSpecMismatch, logit, make_session_options
from workers.demo.train import generate_transactions

DEMO = Path(__file__).resolve().parents[2] / "workers" / "demo"
MODEL = DEMO / "fraud_score.onnx"
SPEC_DICT = json.loads((DEMO / "fraud_score.spec.json").read_text())
RISK_FEATURES = {"account_age_days", "txn_count_24h", "hour_of_day", "amount", "amount_avg_30d",
                 "payment_method", "ip_country_mismatch"}


def event(**changes) -> dict:
    """A typical legitimate payment, with some fields changed."""
    payload = {
        "amount": 52.3, "currency": "usd", "country": "US", "payment_method": "card",
        "features": {"hour_of_day": 14, "is_weekend": 0, "account_age_days": 800,
                     "txn_count_24h": 1, "amount_avg_30d": 60.0, "distinct_cards_7d": 1,
                     "ip_country_mismatch": 0, "failed_logins_24h": 0, "is_new_device": 0},
    }
    for key, value in changes.items():
        if key in payload:
            payload[key] = value
        else:
            payload["features"][key] = value
    return payload


HIGH_RISK = event(amount=2000.0, amount_avg_30d=100.0, account_age_days=2, txn_count_24h=12,
                  hour_of_day=3, payment_method="crypto", ip_country_mismatch=1)
TAKEOVER = event(amount=600.0, amount_avg_30d=50.0, account_age_days=900, is_new_device=1,
                 failed_logins_24h=4, ip_country_mismatch=1)


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return FeatureSpec.from_dict(copy.deepcopy(SPEC_DICT))


@pytest.fixture(scope="module")
def runner(spec) -> ModelRunner:
    return ModelRunner(str(MODEL), spec)


def row_of(spec: FeatureSpec, payload: dict) -> np.ndarray:
    row = np.empty(len(spec), dtype=np.float32)
    spec.build_row(payload, row)
    return row


@pytest.fixture(scope="module")
def sample_rows() -> np.ndarray:
    """Realistic rows (legitimate and fraudulent) from the demo data generator."""
    X, _ = generate_transactions(400, seed=7)
    return X


# --- loading ---------------------------------------------------------------------------------


def test_committed_model_loads_with_committed_spec(runner, spec):
    score = runner.smoke_check()
    assert 0.0 <= score <= 1.0
    assert score < spec.threshold * 0.7  # the baseline is a typical legitimate payment


def test_spec_with_one_feature_fewer_is_a_mismatch():
    d = copy.deepcopy(SPEC_DICT)
    d["features"].pop()
    with pytest.raises(ModelSpecMismatch, match="12 features"):
        ModelRunner(str(MODEL), FeatureSpec.from_dict(d))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("input_name", "input", "expects exactly one named 'input'"),
        ("output_name", "probability", "no output 'probability'"),
        ("output_name", "label", "expected tensor\\(float\\)"),
        ("positive_class_index", 2, "positive_class_index 2"),
    ],
)
def test_spec_that_does_not_match_the_model_is_rejected(key, value, message):
    d = copy.deepcopy(SPEC_DICT)
    d[key] = value
    with pytest.raises(ModelSpecMismatch, match=message):
        ModelRunner(str(MODEL), FeatureSpec.from_dict(d))


def test_mismatch_is_a_value_error():
    assert issubclass(ModelSpecMismatch, ValueError)
    assert issubclass(ModelLoadError, ValueError)


def test_file_that_is_not_onnx_is_a_clear_load_error(tmp_path, spec):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(ModelLoadError, match="cannot load ONNX model .*model.onnx"):
        ModelRunner(str(path), spec)


def test_missing_file_is_a_clear_load_error(tmp_path, spec):
    with pytest.raises(ModelLoadError, match="cannot load ONNX model"):
        ModelRunner(str(tmp_path / "absent.onnx"), spec)


def test_session_options_are_tuned_for_one_row():
    options = make_session_options()
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert options.log_severity_level >= 3


# --- scores ----------------------------------------------------------------------------------


def test_batch_scores_equal_row_by_row_scores(runner, sample_rows):
    batch = runner.score_rows(sample_rows)
    assert batch.shape == (len(sample_rows),)
    singles = [runner.score_row(row) for row in sample_rows]
    assert batch.tolist() == singles
    assert len(set(singles)) > 50  # the rows really differ


def test_score_rows_rejects_the_wrong_width(runner, sample_rows):
    with pytest.raises(ValueError, match="shape"):
        runner.score_rows(sample_rows[:, :-1])


def test_score_row_through_the_input_buffer_matches_a_copy(runner, spec):
    spec.build_row(HIGH_RISK, runner.input_row)
    direct = runner.score_row(runner.input_row)
    assert direct == runner.score_row(row_of(spec, HIGH_RISK))


def test_scores_are_probabilities(runner, sample_rows):
    scores = runner.score_rows(sample_rows)
    assert np.all((scores >= 0.0) & (scores <= 1.0))


def test_high_risk_event_is_blocked(runner, spec):
    score = runner.score_row(row_of(spec, HIGH_RISK))
    assert score >= spec.threshold
    assert decide(score, spec.threshold) == "block"


def test_typical_legitimate_event_is_allowed(runner, spec):
    score = runner.score_row(row_of(spec, event()))
    assert score < 0.7 * spec.threshold
    assert decide(score, spec.threshold) == "allow"


def test_model_separates_fraud_from_legitimate_rows(runner):
    X, y = generate_transactions(4000, seed=11)
    scores = runner.score_rows(X)
    assert scores[y == 1].mean() > 5 * scores[y == 0].mean()


# --- explanations ----------------------------------------------------------------------------


def test_explain_score_equals_plain_score(runner, spec, sample_rows):
    for row in [row_of(spec, HIGH_RISK), row_of(spec, event()), *sample_rows[:50]]:
        score, _ = runner.explain_row(row)
        assert score == runner.score_row(row)


def test_attribution_is_log_odds_minus_log_odds_at_baseline(runner, spec):
    row = row_of(spec, TAKEOVER)
    score, top = runner.explain_row(row, top_k=len(spec))
    baseline = spec.baseline_row()
    expected = {}
    for i, name in enumerate(spec.names):
        occluded = row.copy()
        occluded[i] = baseline[i]
        expected[name] = round(logit(score) - logit(runner.score_row(occluded)), 4)
    assert top, "a takeover event has non-zero attributions"
    for item in top:
        assert item["importance"] == pytest.approx(expected[item["feature"]], abs=1e-4)
    nonzero = {name for name, value in expected.items() if value != 0.0}
    assert {item["feature"] for item in top} >= nonzero


def test_explanation_is_sorted_by_absolute_importance(runner, spec, sample_rows):
    for row in sample_rows[:100]:
        _, top = runner.explain_row(row, top_k=len(spec))
        magnitudes = [abs(item["importance"]) for item in top]
        assert magnitudes == sorted(magnitudes, reverse=True)


def test_high_risk_event_is_explained_by_its_risk_features(runner, spec):
    _, top = runner.explain_row(row_of(spec, HIGH_RISK))
    assert 1 <= len(top) <= 5
    assert all(item["importance"] > 0 for item in top[:3])
    assert len({item["feature"] for item in top[:3]} & RISK_FEATURES) >= 2


def test_explanations_are_per_request(runner, spec):
    _, risky = runner.explain_row(row_of(spec, HIGH_RISK))
    _, takeover = runner.explain_row(row_of(spec, TAKEOVER))
    assert risky != takeover
    assert risky[0]["feature"] != takeover[0]["feature"]
    assert {"failed_logins_24h", "is_new_device"} & {item["feature"] for item in takeover[:3]}


def test_top_k_limits_the_list(runner, spec):
    row = row_of(spec, HIGH_RISK)
    assert len(runner.explain_row(row, top_k=2)[1]) == 2
    assert runner.explain_row(row, top_k=2)[1] == runner.explain_row(row, top_k=5)[1][:2]


def test_baseline_event_still_gets_a_list(runner, spec):
    score, top = runner.explain_row(spec.baseline_row(), top_k=3)
    assert score == runner.smoke_check()
    assert [item["importance"] for item in top] == [0.0, 0.0, 0.0]
    assert [item["feature"] for item in top] == list(spec.names[:3])


def test_features_at_their_baseline_are_not_listed(runner, spec):
    row = spec.baseline_row()
    row[spec.names.index("txn_count_24h")] = 15
    _, top = runner.explain_row(row, top_k=5)
    assert [item["feature"] for item in top] == ["txn_count_24h"]
    assert top[0]["importance"] > 0


def test_zero_attributions_are_not_listed_beside_nonzero_ones(runner, spec):
    row = spec.baseline_row()
    for name, value in [("txn_count_24h", 15), ("is_weekend", 1), ("currency", 1),
                        ("distinct_cards_7d", 2)]:
        row[spec.names.index(name)] = value
    score = runner.score_row(row)
    zero, nonzero = set(), set()
    for i in np.flatnonzero(row != spec.baseline_row()):
        occluded = row.copy()
        occluded[i] = spec.baseline_row()[i]
        (nonzero if runner.score_row(occluded) != score else zero).add(spec.names[i])
    assert zero and nonzero, "the case needs both kinds of changed feature"
    _, top = runner.explain_row(row, top_k=len(spec))
    assert {item["feature"] for item in top} == nonzero


def test_explain_row_leaves_the_callers_row_alone(runner, spec):
    row = row_of(spec, HIGH_RISK)
    before = row.copy()
    runner.explain_row(row)
    assert row.tolist() == before.tolist()


def test_explain_rows_matches_explain_row(runner, spec, sample_rows):
    rows = np.vstack([row_of(spec, HIGH_RISK), row_of(spec, TAKEOVER), spec.baseline_row(),
                      sample_rows[:60]])
    scores, explanations = runner.explain_rows(rows, top_k=4)
    assert len(scores) == len(explanations) == len(rows)
    for row, score, explanation in zip(rows, scores, explanations):
        assert (float(score), explanation) == runner.explain_row(row, top_k=4)


def test_importances_are_plain_rounded_floats(runner, spec):
    _, top = runner.explain_row(row_of(spec, TAKEOVER))
    for item in top:
        assert type(item["importance"]) is float
        assert math.isfinite(item["importance"])
        assert item["importance"] == round(item["importance"], 4)


def test_a_blocked_payment_still_gets_a_telling_explanation(runner, spec):
    """Near a score of 1.0 probability differences vanish; log-odds keep the drivers visible."""
    row = row_of(spec, event(amount=4800.0, amount_avg_30d=60.0, account_age_days=1, txn_count_24h=25,
                             hour_of_day=3, payment_method="crypto", ip_country_mismatch=1,
                             failed_logins_24h=5, is_new_device=1, distinct_cards_7d=6))
    score, top = runner.explain_row(row)
    assert score > 0.999
    assert len(top) >= 3 and all(abs(item["importance"]) >= 0.1 for item in top[:3])
