"""POST /v1/infer and /v1/infer/batch on a real two-worker `sira serve`: the contract and bad input."""

from __future__ import annotations

import base64
import json
import time
import uuid

import httpx
import jwt
import pytest

from tests.fixtures.server import TEST_INTERNAL_TOKEN, TEST_JWT_SECRET, bearer, make_token, module_server

ERROR_FIELDS = {"error_code", "message", "request_id", "timestamp", "details"}


def event(event_id: str | None = None, **payload_overrides) -> dict:
    payload = {
        "amount": 150.50, "currency": "USD", "country": "US", "payment_method": "card",
        "features": {"hour_of_day": 14, "is_weekend": 0, "account_age_days": 700, "txn_count_24h": 2,
                     "amount_avg_30d": 120.0},
    }
    payload.update(payload_overrides)
    return {"event_id": event_id or str(uuid.uuid4()), "product": "fraud_score", "payload": payload}


def risky_event() -> dict:
    return event(amount=4800.0, currency="USD", country="NG", payment_method="crypto",
                 features={"hour_of_day": 3, "is_weekend": 1, "account_age_days": 1, "txn_count_24h": 25,
                           "amount_avg_30d": 60.0, "distinct_cards_7d": 6, "ip_country_mismatch": 1,
                           "failed_logins_24h": 5, "is_new_device": 1})


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == ERROR_FIELDS, body
    assert body["error_code"] == code, body
    assert body["request_id"] == response.headers["x-request-id"]
    return body


@pytest.fixture(scope="module")
def server(tmp_path_factory, pg_url):
    """One two-worker server for the whole module (the tests only read)."""
    with module_server(tmp_path_factory, pg_url, "infer") as sira:
        yield sira


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=bearer("sira_service"), timeout=10) as http:
        yield http


def test_valid_request_gets_every_field_of_the_contract(client, server):
    ready = httpx.get(server.url + "/readyz").json()
    response = client.post("/v1/infer", json=event(), headers={"X-Request-ID": "client-req-1"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"prediction_id", "model_id", "model_role", "score", "decision",
                         "explain_summary", "latency_ms", "cached"}
    assert str(uuid.UUID(body["prediction_id"])) == body["prediction_id"]
    assert uuid.UUID(body["prediction_id"]).version == 7  # time-ordered (app/ids.py)
    assert body["model_id"] == ready["models"]["fraud_score"]["model_id"]
    assert body["model_role"] == "production" and body["cached"] is False
    assert 0.0 <= body["score"] <= 1.0
    assert body["decision"] in {"allow", "review", "block"}
    assert body["latency_ms"] >= 0
    assert body["explain_summary"] and all(set(item) == {"feature", "importance"} for item in body["explain_summary"])
    assert response.headers["x-request-id"] == "client-req-1"


def test_decision_follows_the_model_threshold(client):
    risky = client.post("/v1/infer", json=risky_event()).json()
    normal = client.post("/v1/infer", json=event()).json()
    assert risky["score"] > normal["score"]
    assert risky["decision"] == "block" and normal["decision"] == "allow"
    assert risky["explain_summary"] != normal["explain_summary"], "the explanation is per request"


def test_explanation_can_be_skipped(client):
    body = client.post("/v1/infer", json={**event(), "options": {"include_explanation": False}}).json()
    assert body["explain_summary"] == []


def test_same_event_gets_the_same_score_from_every_worker(server):
    request = risky_event()
    scores, workers = set(), set()
    for _ in range(40):
        with httpx.Client(base_url=server.url, headers=bearer("fraud_analyst")) as fresh:
            scores.add(fresh.post("/v1/infer", json=request).json()["score"])
            workers.add(fresh.get("/readyz").json()["worker_pid"])
    assert len(scores) == 1
    assert len(workers) == 2, "fresh connections should have reached both workers"


def test_batch_of_256_is_scored_in_one_call_in_order(client):
    events = [event(f"batch-{i}", amount=10.0 + i) for i in range(256)]
    events[7] = {"event_id": "bad", "product": "fraud_score", "payload": {"amount": "ten"}}
    events[9] = {**event("unknown-product"), "product": "no_such_product"}
    response = client.post("/v1/infer/batch", json={"events": events})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 256
    assert results[7]["error_code"] == "FEATURE_VALIDATION_FAILED"
    assert results[7]["details"]["index"] == 7
    assert results[9]["error_code"] == "MODEL_NOT_FOUND"
    good = [r for i, r in enumerate(results) if i not in (7, 9)]
    assert all(r["decision"] in {"allow", "review", "block"} for r in good)
    assert len({r["prediction_id"] for r in good}) == 254
    single = client.post("/v1/infer", json=events[100]).json()
    assert results[100]["score"] == pytest.approx(single["score"], abs=1e-6)


def test_batch_over_the_limit_is_refused(client):
    response = client.post("/v1/infer/batch", json={"events": [event() for _ in range(257)]})
    assert_error(response, 400, "INVALID_REQUEST")


def none_alg_token() -> str:
    def b64(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    claims = {"sub": "x", "role": "sira_service", "exp": int(time.time()) + 600}
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


def raw_post(client, body: bytes, content_type: str = "application/json", **headers):
    return client.post("/v1/infer", content=body, headers={"Content-Type": content_type, **headers})


BAD_BODIES = [
    (b"{not json", 400, "INVALID_REQUEST"),
    (b"", 400, "INVALID_REQUEST"),
    (b"[1, 2, 3]", 400, "INVALID_REQUEST"),
    (b'"a string"', 400, "INVALID_REQUEST"),
    (b"null", 400, "INVALID_REQUEST"),
    (b'{"event_id": 5, "product": "fraud_score", "payload": {}}', 400, "INVALID_REQUEST"),
    (b'{"product": "fraud_score", "payload": {}}', 400, "INVALID_REQUEST"),
    (b'{"event_id": "e", "product": "fraud_score"}', 400, "INVALID_REQUEST"),
    (b'{"event_id": "e", "product": "fraud_score", "payload": []}', 400, "INVALID_REQUEST"),
    (b'{"event_id": "e", "product": "no_such", "payload": {"amount": 1}}', 404, "MODEL_NOT_FOUND"),
    (b'{"event_id": "e", "product": "FRAUD score", "payload": {}}', 400, "INVALID_REQUEST"),
    (b'{"event_id": "e", "product": "fraud_score", "payload": {"amount": NaN}}', 400, "INVALID_REQUEST"),
    (b'{"event_id": "e", "product": "fraud_score", "payload": {"amount": 1e999}}', 400, "INVALID_REQUEST"),
    (b'\xff\xfe{"bad utf8": 1}', 400, "INVALID_REQUEST"),
]


@pytest.mark.parametrize("body, status, code", BAD_BODIES)
def test_malformed_bodies_get_their_4xx(client, body, status, code):
    assert_error(raw_post(client, body), status, code)


@pytest.mark.parametrize("payload_change, field", [
    ({"amount": "150"}, "payload.amount"),
    ({"amount": True}, "payload.amount"),
    ({"amount": -5}, "payload.amount"),
    ({"amount": 1e300}, "payload.amount"),
    ({"currency": 840}, "payload.currency"),
    ({"currency": "€" * 100}, "payload.currency"),
    ({"features": "many"}, "payload.features"),
    ({"features": {"hour_of_day": 25}}, "payload.features.hour_of_day"),
    ({"features": {"hour_of_day": 2.5}}, "payload.features.hour_of_day"),
])
def test_feature_errors_name_the_field(client, payload_change, field):
    response = client.post("/v1/infer", json=event(**payload_change))
    body = assert_error(response, 400, "FEATURE_VALIDATION_FAILED")
    assert body["details"]["field"] == field


def test_missing_required_field_is_named(client):
    request = event()
    del request["payload"]["amount"]
    body = assert_error(client.post("/v1/infer", json=request), 400, "FEATURE_VALIDATION_FAILED")
    assert body["details"]["field"] == "payload.amount"


def test_unknown_category_and_unicode_are_scored(client):
    response = client.post("/v1/infer", json=event(currency="ZZZ", country="Ελλάδα", payment_method="🙂"))
    assert response.status_code == 200, response.text


def test_options_are_checked(client):
    for options in ({"include_explanation": "yes"}, {"timeout_ms": -1}, {"timeout_ms": "5"}, {"cache": True}, []):
        assert_error(client.post("/v1/infer", json={**event(), "options": options}), 400, "INVALID_REQUEST")


def test_two_megabyte_body_is_413(client):
    body = json.dumps({**event(), "padding": "x" * 2_000_000}).encode()
    assert_error(raw_post(client, body), 413, "PAYLOAD_TOO_LARGE")


def test_wrong_content_type_is_415(client):
    assert_error(raw_post(client, json.dumps(event()).encode(), "text/plain"), 415, "UNSUPPORTED_MEDIA_TYPE")


def test_wrong_method_is_405_and_unknown_path_404(client):
    assert_error(client.get("/v1/infer"), 405, "METHOD_NOT_ALLOWED")
    assert_error(client.delete("/healthz"), 405, "METHOD_NOT_ALLOWED")
    assert_error(client.get("/v1/nothing-here"), 404, "NOT_FOUND")


@pytest.mark.parametrize("authorization", [
    None,
    "Basic dXNlcjpwYXNz",
    "Bearer",
    "Bearer garbage",
    "Bearer " + none_alg_token(),
    "Bearer " + jwt.encode({"sub": "x", "role": "sira_service", "exp": int(time.time()) + 600},
                          "another-secret-0123456789abcdef-0123456789", algorithm="HS256", headers={"kid": "default"}),
    "Bearer " + jwt.encode({"sub": "x", "role": "sira_service", "exp": int(time.time()) - 60},
                          TEST_JWT_SECRET, algorithm="HS256", headers={"kid": "default"}),
    "Bearer " + TEST_INTERNAL_TOKEN + "x",
    "Bearer " + "a" * 10_000,
])
def test_bad_credentials_are_401(server, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    response = httpx.post(server.url + "/v1/infer", json=event(), headers=headers)
    assert_error(response, 401, "UNAUTHORIZED")


@pytest.mark.parametrize("role", ["ml_ops", "pay_admin"])
def test_wrong_role_is_403(server, role):
    response = httpx.post(server.url + "/v1/infer", json=event(), headers=bearer(role))
    assert_error(response, 403, "FORBIDDEN")


@pytest.mark.parametrize("headers", [
    lambda: {"Authorization": f"Bearer {TEST_INTERNAL_TOKEN}"},
    lambda: bearer("fraud_analyst"),
    lambda: {"Authorization": f"Bearer {make_token('sira_service', ttl_s=5)}"},
])
def test_scoring_roles_and_internal_token_may_score(server, headers):
    response = httpx.post(server.url + "/v1/infer", json=event(), headers=headers())
    assert response.status_code == 200, response.text


def test_no_request_id_given_gets_a_generated_one(client):
    response = client.post("/v1/infer", json=event(), headers={"X-Request-ID": "bad id with spaces"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] != "bad id with spaces"


def test_a_refused_body_closes_the_connection_and_says_so(client):
    """An answer sent before the body was read ends the connection: the client must be told."""
    too_large = raw_post(client, json.dumps({**event(), "padding": "x" * 2_000_000}).encode())
    assert too_large.status_code == 413 and too_large.headers["connection"] == "close"
    refused = client.post("/v1/infer", content=json.dumps(event()).encode(),
                          headers={"Content-Type": "application/json", "Authorization": "Bearer nope"})
    assert refused.status_code == 401 and refused.headers["connection"] == "close"
    assert client.post("/v1/infer", json=event()).status_code == 200  # a new connection, no error
