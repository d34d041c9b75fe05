"""app/http/openapi.py and app/http/openapi_schemas.py: the document validates, lists only real routes,
and its payload schema is the server's rule.

The payload schema is generated from a model's feature spec; hypothesis builds payloads around the
demo model's (valid values, bounds, wrong types, nulls, missing fields, extra fields) and each must
be valid for the JSON Schema exactly when FeatureSpec.build_row accepts it.
"""

from __future__ import annotations

import os

import falcon.asgi
import jsonschema
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate

from app.errors import FeatureValidationFailed
from app.http.openapi import OPERATIONS, app_routes, build_document
from app.http.openapi_schemas import error_codes, payload_schema
from app.scoring.features import load_spec
from tests.fixtures.server import REPO

SPEC = load_spec(os.path.join(REPO, "workers", "demo", "fraud_score.spec.json"))
VALIDATOR = jsonschema.Draft202012Validator(payload_schema(SPEC))


def accepted_by_server(payload) -> bool:
    try:
        SPEC.build_row(payload, np.empty(len(SPEC), dtype=np.float32))
    except FeatureValidationFailed:
        return False
    return True


def value_for(feature):
    """Values around what a feature accepts: inside, on and beyond its bounds, other types, null."""
    others = st.sampled_from([None, True, "12", [], {}, "x" * 65])
    if feature.vocabulary:
        return st.one_of(st.sampled_from(feature.vocabulary), st.text(max_size=70), others)
    edges = [feature.lo, feature.hi, feature.lo - 1, feature.hi + 1, (feature.lo + feature.hi) / 2 + 0.5]
    return st.one_of(st.sampled_from(edges), st.integers(int(feature.lo) - 2, int(feature.hi) + 2),
                     st.floats(feature.lo - 10, feature.hi + 10, allow_nan=False), others)


@st.composite
def payloads(draw):
    payload: dict = {}
    for feature in SPEC.features:
        if draw(st.integers(0, 5)) == 0:
            continue  # absent
        *containers, key = feature.source.split(".")
        node = payload
        for name in containers:
            node = node.setdefault(name, {}) if isinstance(node.get(name, {}), dict) else {}
        node[key] = draw(value_for(feature))
    if draw(st.booleans()):
        payload["unknown_field"] = draw(st.sampled_from([1, "x", None]))
    if draw(st.integers(0, 6)) == 0:
        payload["features"] = draw(st.sampled_from([None, "not an object", 3, []]))
    return payload


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads())
def test_payload_schema_accepts_exactly_what_the_feature_spec_accepts(payload):
    assert VALIDATOR.is_valid(payload) == accepted_by_server(payload), payload


def test_payload_schema_requires_the_required_features():
    schema = payload_schema(SPEC)
    assert set(schema["required"]) == {f.source for f in SPEC.features if f.required}
    assert "required" not in schema["properties"]["features"]  # every nested feature is optional


def test_document_validates_with_and_without_served_models():
    validate(build_document(set(OPERATIONS)))
    document = build_document(set(OPERATIONS), 100, {"fraud_score": SPEC})
    validate(document)
    assert document["components"]["schemas"]["BatchRequest"]["properties"]["events"]["maxItems"] == 100


def test_document_lists_only_the_routes_it_is_given():
    document = build_document({("/healthz", "GET"), ("/v1/infer", "POST"), ("/not/described", "GET")})
    assert document["paths"].keys() == {"/healthz", "/v1/infer"}


def test_app_routes_are_the_responders_without_falcons_own():
    class Resource:
        async def on_get(self, req, resp, model_id):
            pass

        async def on_post(self, req, resp, model_id):
            pass

    app = falcon.asgi.App()
    app.add_route("/v1/models/{model_id}/promote", Resource())
    assert app_routes(app) == {("/v1/models/{model_id}/promote", "GET"), ("/v1/models/{model_id}/promote", "POST")}


def test_error_schema_knows_every_error_code():
    codes = build_document(set(OPERATIONS))["components"]["schemas"]["Error"]["properties"]["error_code"]["enum"]
    assert codes == error_codes()
    assert {"INVALID_REQUEST", "FEATURE_VALIDATION_FAILED", "UNAUTHORIZED", "MODEL_NOT_FOUND",
            "INFERENCE_TIMEOUT"} <= set(codes)
