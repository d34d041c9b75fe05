"""Feature spec validation and the request -> feature-vector rules of app/scoring/features.py."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

from app.errors import FeatureValidationFailed
from app.scoring.features import FeatureSpec, decide, load_spec

DEMO_SPEC = Path(__file__).resolve().parents[2] / "workers" / "demo" / "fraud_score.spec.json"

SPEC = {
    "spec_version": 1,
    "name": "test-model",
    "product": "fraud_score",
    "input_name": "features",
    "output_name": "probabilities",
    "positive_class_index": 1,
    "threshold": 0.4,
    "features": [
        {"name": "amount", "source": "amount", "type": "numeric", "required": True,
         "min": 0, "max": 10_000_000, "baseline": 45.0},
        {"name": "currency", "source": "currency", "type": "categorical", "required": True,
         "normalize": "upper", "vocabulary": ["USD", "EUR", "XOF", "__other__"],
         "default_bucket": "__other__", "baseline": "USD"},
        {"name": "payment_method", "source": "payment_method", "type": "categorical",
         "required": False, "normalize": "lower", "vocabulary": ["card", "crypto", "__other__"],
         "default_bucket": "__other__", "default": "card", "baseline": "card"},
        {"name": "hour_of_day", "source": "features.hour_of_day", "type": "numeric",
         "required": False, "integer": True, "min": 0, "max": 23, "default": 12, "baseline": 12},
        {"name": "ratio", "source": "features.ratio", "type": "numeric", "required": False,
         "default": 1.5, "baseline": 1.0},
    ],
}


def valid_payload() -> dict:
    return {"amount": 150.5, "currency": "EUR", "payment_method": "crypto",
            "features": {"hour_of_day": 3, "ratio": 2.25}}


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return FeatureSpec.from_dict(copy.deepcopy(SPEC))


def build(spec: FeatureSpec, payload) -> list[float]:
    out = np.full(len(spec), -99.0, dtype=np.float32)
    spec.build_row(payload, out)
    return out.tolist()


def failure(spec: FeatureSpec, payload) -> FeatureValidationFailed:
    with pytest.raises(FeatureValidationFailed) as info:
        build(spec, payload)
    return info.value


def with_value(path: str, value) -> dict:
    """The valid payload with one dotted path set to value."""
    payload = valid_payload()
    *parents, key = path.split(".")
    holder = payload
    for part in parents:
        holder = holder[part]
    holder[key] = value
    return payload


def without(path: str) -> dict:
    payload = valid_payload()
    *parents, key = path.split(".")
    holder = payload
    for part in parents:
        holder = holder[part]
    del holder[key]
    return payload


# --- building rows --------------------------------------------------------------------------


def test_valid_payload_is_encoded_in_spec_order(spec):
    assert build(spec, valid_payload()) == [150.5, 1.0, 1.0, 3.0, 2.25]


def test_build_row_fills_only_the_given_row_of_a_batch(spec):
    rows = np.zeros((3, len(spec)), dtype=np.float32)
    spec.build_row(valid_payload(), rows[1])
    assert rows[0].tolist() == [0.0] * len(spec)
    assert rows[2].tolist() == [0.0] * len(spec)
    assert rows[1].tolist() == [150.5, 1.0, 1.0, 3.0, 2.25]


def test_integral_float_is_accepted_for_integer_feature(spec):
    assert build(spec, with_value("features.hour_of_day", 3.0))[3] == 3.0


def test_missing_optional_takes_its_default(spec):
    assert build(spec, without("features.hour_of_day"))[3] == 12.0
    assert build(spec, without("payment_method"))[2] == 0.0  # default "card"


def test_null_optional_takes_its_default(spec):
    assert build(spec, with_value("features.ratio", None))[4] == 1.5


def test_missing_features_object_gives_all_defaults(spec):
    assert build(spec, without("features"))[3:] == [12.0, 1.5]


def test_unknown_extra_keys_are_ignored(spec):
    payload = valid_payload()
    payload["features"]["something_new"] = "x"
    payload["merchant"] = {"id": 7}
    assert build(spec, payload) == [150.5, 1.0, 1.0, 3.0, 2.25]


def test_unknown_category_maps_to_default_bucket(spec):
    assert build(spec, with_value("currency", "JPY"))[1] == 3.0


def test_categorical_is_normalized(spec):
    assert build(spec, with_value("currency", "usd"))[1] == 0.0
    assert build(spec, with_value("payment_method", "CRYPTO"))[2] == 1.0


def test_category_of_64_characters_is_accepted(spec):
    assert build(spec, with_value("currency", "X" * 64))[1] == 3.0


def test_zero_and_max_are_inside_the_range(spec):
    assert build(spec, with_value("amount", 0))[0] == 0.0
    assert build(spec, with_value("amount", 10_000_000))[0] == 10_000_000.0


# --- rejected requests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        ("amount", "12.5", "not_a_number"),
        ("amount", True, "not_a_number"),
        ("amount", False, "not_a_number"),
        ("amount", [1], "not_a_number"),
        ("amount", float("nan"), "not_finite"),
        ("amount", float("inf"), "not_finite"),
        ("amount", float("-inf"), "not_finite"),
        ("amount", 1e308, "out_of_range"),
        ("amount", 10**400, "out_of_range"),
        ("amount", -1, "out_of_range"),
        ("amount", -0.01, "out_of_range"),
        ("features.hour_of_day", 24, "out_of_range"),
        ("features.hour_of_day", -1, "out_of_range"),
        ("features.hour_of_day", 3.5, "not_an_integer"),
        ("features.hour_of_day", "3", "not_a_number"),
        ("features.ratio", float("nan"), "not_finite"),
        ("currency", 123, "not_a_string"),
        ("currency", True, "not_a_string"),
        ("currency", {"code": "USD"}, "not_a_string"),
        ("currency", "X" * 65, "too_long"),
        ("payment_method", 1.0, "not_a_string"),
    ],
)
def test_bad_value_is_rejected_with_its_field_path(spec, path, value, reason):
    error = failure(spec, with_value(path, value))
    assert error.details["field"] == "payload." + path
    assert error.details["reason"] == reason
    assert ("payload." + path) in error.message
    assert error.status == 400 and error.code == "FEATURE_VALIDATION_FAILED"


def test_out_of_range_names_the_bounds(spec):
    error = failure(spec, with_value("features.hour_of_day", 24))
    assert error.details["min"] == 0 and error.details["max"] == 23
    assert "between 0 and 23" in error.message


@pytest.mark.parametrize("path", ["amount", "currency"])
def test_missing_required_field_is_rejected(spec, path):
    error = failure(spec, without(path))
    assert error.details == {"field": "payload." + path, "reason": "missing"}


def test_null_required_field_is_missing(spec):
    assert failure(spec, with_value("amount", None)).details["reason"] == "missing"


@pytest.mark.parametrize("payload", [[valid_payload()], "payload", None, 42])
def test_payload_that_is_not_an_object_is_rejected(spec, payload):
    error = failure(spec, payload)
    assert error.details == {"field": "payload", "reason": "not_an_object"}


@pytest.mark.parametrize("features", ["many", [1, 2], 3])
def test_features_that_is_not_an_object_is_rejected(spec, features):
    error = failure(spec, with_value("features", features))
    assert error.details == {"field": "payload.features", "reason": "not_an_object"}


def test_first_error_is_reported(spec):
    payload = with_value("amount", "x")
    payload["currency"] = 5
    assert failure(spec, payload).details["field"] == "payload.amount"


def test_deeper_source_paths_are_resolved():
    d = copy.deepcopy(SPEC)
    d["features"].append({"name": "device_score", "source": "device.risk.score",
                          "type": "numeric", "required": False, "default": 0, "baseline": 0,
                          "min": 0, "max": 1})
    spec = FeatureSpec.from_dict(d)
    payload = valid_payload()
    payload["device"] = {"risk": {"score": 0.75}}
    assert build(spec, payload)[-1] == 0.75
    payload["device"] = {"risk": "high"}
    assert failure(spec, payload).details["field"] == "payload.device.risk"
    del payload["device"]
    assert build(spec, payload)[-1] == 0.0


# --- the spec itself ----------------------------------------------------------------------------


def test_spec_exposes_names_threshold_length_and_baseline(spec):
    assert spec.names == ("amount", "currency", "payment_method", "hour_of_day", "ratio")
    assert spec.threshold == 0.4
    assert len(spec) == 5
    baseline = spec.baseline_row()
    assert baseline.dtype == np.float32
    assert baseline.tolist() == [45.0, 0.0, 0.0, 12.0, 1.0]


def test_baseline_row_is_a_copy(spec):
    spec.baseline_row()[0] = 999.0
    assert spec.baseline_row()[0] == 45.0


def test_demo_spec_loads_from_file():
    spec = load_spec(DEMO_SPEC)
    assert spec.input_name == "features"
    assert 0 < spec.threshold < 1
    assert spec.names[0] == "amount"


def test_spec_file_that_is_not_json_is_rejected(tmp_path):
    path = tmp_path / "bad.spec.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_spec(path)


def mutated(change) -> dict:
    d = copy.deepcopy(SPEC)
    change(d)
    return d


def feature(d: dict, name: str) -> dict:
    return next(f for f in d["features"] if f["name"] == name)


BAD_SPECS = {
    "not an object": ([], "must be a JSON object"),
    "spec version": (mutated(lambda d: d.update(spec_version=2)), "spec_version"),
    "no name": (mutated(lambda d: d.pop("name")), "name"),
    "empty input name": (mutated(lambda d: d.update(input_name="")), "input_name"),
    "negative class": (mutated(lambda d: d.update(positive_class_index=-1)),
                       "positive_class_index"),
    "threshold zero": (mutated(lambda d: d.update(threshold=0)), "threshold"),
    "threshold above one": (mutated(lambda d: d.update(threshold=1.5)), "threshold"),
    "threshold bool": (mutated(lambda d: d.update(threshold=True)), "threshold"),
    "threshold nan": (mutated(lambda d: d.update(threshold=math.nan)), "threshold"),
    "no features": (mutated(lambda d: d.update(features=[])), "non-empty list"),
    "unknown type": (mutated(lambda d: feature(d, "amount").update(type="text")),
                     "unknown type 'text'"),
    "unknown key": (mutated(lambda d: feature(d, "amount").update(maximum=5)),
                    "unknown keys \\['maximum'\\]"),
    "min above max": (mutated(lambda d: feature(d, "amount").update(min=10, max=5)),
                      "min 10 > max 5"),
    "min not a number": (mutated(lambda d: feature(d, "amount").update(min="0")), "min"),
    "bounds beyond float32": (mutated(lambda d: feature(d, "amount").update(max=1e300)),
                              "float32"),
    "missing vocabulary": (mutated(lambda d: feature(d, "currency").pop("vocabulary")),
                           "missing or empty vocabulary"),
    "empty vocabulary": (mutated(lambda d: feature(d, "currency").update(vocabulary=[])),
                         "missing or empty vocabulary"),
    "default bucket not last": (
        mutated(lambda d: feature(d, "currency").update(
            vocabulary=["USD", "__other__", "EUR"])), "must be the last"),
    "missing default bucket": (mutated(lambda d: feature(d, "currency").pop("default_bucket")),
                               "default_bucket"),
    "duplicate vocabulary": (
        mutated(lambda d: feature(d, "currency").update(
            vocabulary=["USD", "USD", "__other__"])), "duplicate vocabulary"),
    "vocabulary not normalized": (
        mutated(lambda d: feature(d, "currency").update(
            vocabulary=["USD", "eur", "__other__"])), "not upper-case"),
    "bad normalize": (mutated(lambda d: feature(d, "currency").update(normalize="title")),
                      "normalize"),
    "duplicate name": (mutated(lambda d: feature(d, "ratio").update(name="amount")),
                       "duplicate feature name 'amount'"),
    "duplicate source": (mutated(lambda d: feature(d, "ratio").update(source="amount")),
                         "duplicate source 'amount'"),
    "source inside another source": (
        mutated(lambda d: feature(d, "ratio").update(source="amount.cents")), "nested inside"),
    "empty source part": (mutated(lambda d: feature(d, "ratio").update(source="features..x")),
                          "bad source path"),
    "required not bool": (mutated(lambda d: feature(d, "amount").update(required="yes")),
                          "required"),
    "optional without default": (mutated(lambda d: feature(d, "ratio").pop("default")),
                                 "needs a default"),
    "required with default": (mutated(lambda d: feature(d, "amount").update(default=1)),
                              "has no default"),
    "default out of range": (mutated(lambda d: feature(d, "hour_of_day").update(default=30)),
                             "outside"),
    "default not integral": (mutated(lambda d: feature(d, "hour_of_day").update(default=2.5)),
                             "not an integer"),
    "missing baseline": (mutated(lambda d: feature(d, "amount").pop("baseline")),
                         "missing baseline"),
    "baseline not in vocabulary": (
        mutated(lambda d: feature(d, "currency").update(baseline="JPY")), "not in the vocabulary"),
    "categorical default not in vocabulary": (
        mutated(lambda d: feature(d, "payment_method").update(default="cash")),
        "not in the vocabulary"),
    "integer not bool": (mutated(lambda d: feature(d, "hour_of_day").update(integer=1)),
                         "integer"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_is_rejected(case):
    bad, message = BAD_SPECS[case]
    with pytest.raises(ValueError, match=message):
        FeatureSpec.from_dict(bad)


def test_valid_spec_round_trips_through_json():
    assert FeatureSpec.from_dict(json.loads(json.dumps(SPEC))).names == tuple(
        f["name"] for f in SPEC["features"])


# --- decisions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("score", "decision"),
    [
        (1.0, "block"),
        (0.4, "block"),
        (0.4000001, "block"),
        (0.3999999, "review"),
        (0.4 * 0.7, "review"),
        (0.4 * 0.7 - 1e-9, "allow"),
        (0.0, "allow"),
    ],
)
def test_decide_at_the_boundaries(score, decision):
    assert decide(score, 0.4) == decision
