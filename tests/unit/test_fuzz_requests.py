"""Fuzzing the infer request parser and the feature builder: anything either parses or is the app's own 4xx.

Two levels, each bounded (hypothesis `max_examples`, no deadline) so the module stays well under
30 s on a loaded CI machine:

- functions: `parse_infer_request` and `FeatureSpec.build_row` of the demo model's spec, fed
  JSON-like values (NaN, infinities, 70-bit integers, nesting, wrong types in every field); the
  only exception allowed out is an `ApiError` with a 4xx status;
- in process, through Falcon: arbitrary bytes, JSON with random cuts and random envelopes are
  POSTed with `falcon.testing` to the real `InferResource` and `BatchInferResource` (demo model
  loaded in ONNX Runtime, the app's orjson handlers and error renderer); every answer is 200 or a
  4xx in the one error schema.
"""

from __future__ import annotations

import copy
import json

import falcon.asgi
import falcon.testing
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.errors import ApiError
from app.http.requests import parse_infer_request
from app.scoring.features import FeatureSpec
from tests.fixtures.infer_app import SPEC, demo_models, infer_client

SOURCES = [feature["source"] for feature in SPEC["features"]]
ERROR_FIELDS = {"error_code", "message", "request_id", "timestamp", "details"}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=80))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
typical = {"amount": st.floats(min_value=0, max_value=1e7) | st.integers(min_value=0, max_value=10 ** 7),
           "currency": st.sampled_from(["USD", "eur", "ZZZ", "", "€" * 70]),
           "country": st.sampled_from(["US", "NG", "Ελλάδα", "\x00"]),
           "payment_method": st.sampled_from(["card", "crypto", "🙂"])}


def nest(flat: dict) -> dict:
    """{"features.hour_of_day": 3} -> {"features": {"hour_of_day": 3}}."""
    payload: dict = {}
    for source, value in flat.items():
        *parents, leaf = source.split(".")
        node = payload
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return payload


def feature_value(source: str):
    return typical.get(source, st.integers(min_value=-5, max_value=10 ** 6)) | json_values


payloads = st.one_of(
    st.fixed_dictionaries({}, optional={source: feature_value(source) for source in SOURCES}).map(nest),
    st.fixed_dictionaries({}, optional={source: feature_value(source) for source in SOURCES}).map(nest).map(
        lambda payload: {**payload, "features": "not an object"} if "features" in payload else payload),
    json_values,
)
option_values = st.fixed_dictionaries({}, optional={"include_explanation": st.booleans() | json_values,
                                                   "enable_cache": st.booleans() | json_values,
                                                   "timeout_ms": st.integers(-5, 70_000) | json_values})
options = st.none() | option_values | option_values | option_values.map(lambda o: {**o, "surprise": 1}) | json_values
# Each field is often valid, so that the checks behind the first ones are reached too.
event_ids = st.uuids().map(str) | st.uuids().map(str) | st.text(min_size=1, max_size=130) | json_values
products = st.just("fraud_score") | st.just("fraud_score") | st.sampled_from(["no_such_product", "FRAUD", ""]) \
    | json_values
envelopes = st.fixed_dictionaries({"event_id": event_ids, "product": products, "payload": payloads},
                                  optional={"options": options, "extra": json_values})


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return FeatureSpec.from_dict(copy.deepcopy(SPEC))


def assert_client_error(exc: ApiError) -> None:
    assert 400 <= exc.status < 500, (exc.status, exc.code, exc.message)
    assert exc.code and exc.message


@FUZZ
@given(body=envelopes | json_values)
def test_parser_and_feature_builder_accept_or_raise_only_the_apps_4xx(spec, body):
    row = np.empty(len(spec), dtype=np.float32)
    try:
        if type(body) is not dict:
            return  # read_json_object refuses it before the parser (tested through Falcon below)
        request = parse_infer_request(body)
        spec.build_row(request.payload, row)
    except ApiError as exc:
        assert_client_error(exc)
        return
    assert np.all(np.isfinite(row)), "a built row holds only finite numbers"


@FUZZ
@given(payload=payloads)
def test_feature_builder_alone_fills_finite_rows_or_raises_4xx(spec, payload):
    row = np.full(len(spec), np.nan, dtype=np.float32)
    try:
        spec.build_row(payload, row)
    except ApiError as exc:
        assert_client_error(exc)
        assert exc.details["field"].startswith("payload")
        return
    assert np.all(np.isfinite(row))


# --- through Falcon, in process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> falcon.testing.TestClient:
    """The real infer resources on the demo model, with the app's media handlers and error renderer."""
    return infer_client(demo_models(), batch_max=16)


def assert_answer(result: falcon.testing.Result) -> None:
    assert result.status_code == 200 or 400 <= result.status_code < 500, (result.status_code, result.text)
    if result.status_code != 200:
        body = result.json
        assert set(body) == ERROR_FIELDS and body["error_code"], body


def dumps(value) -> bytes:
    """JSON as a careless client writes it: NaN and Infinity literals included."""
    return json.dumps(value, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


def cut(data: bytes, at: int) -> bytes:
    return data[: at % (len(data) + 1)]


bodies = st.one_of(
    st.binary(max_size=600),
    envelopes.map(dumps),
    st.tuples(envelopes.map(dumps), st.integers(min_value=0)).map(lambda pair: cut(*pair)),
    st.tuples(envelopes.map(dumps), st.binary(min_size=1, max_size=8), st.integers(min_value=0)).map(
        lambda t: t[0][: t[2] % (len(t[0]) + 1)] + t[1] + t[0][t[2] % (len(t[0]) + 1):]),
)


@FUZZ
@given(body=bodies)
def test_any_bytes_posted_to_infer_get_200_or_a_4xx_in_the_error_schema(client, body):
    assert_answer(client.simulate_post("/v1/infer", body=body, headers={"Content-Type": "application/json"}))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(envelopes | json_values, min_size=0, max_size=20) | json_values)
def test_any_batch_gets_200_or_a_4xx_and_one_result_per_event(client, events):
    result = client.simulate_post("/v1/infer/batch", body=dumps({"events": events}),
                                  headers={"Content-Type": "application/json"})
    assert_answer(result)
    if result.status_code == 200:
        results = result.json["results"]
        assert len(results) == len(events)
        for item in results:
            assert "prediction_id" in item or (set(item) == ERROR_FIELDS and item["details"]["index"] >= 0)
