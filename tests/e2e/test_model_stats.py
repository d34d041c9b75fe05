"""What the model stats segment feeds, on real servers: GET /v1/models/{model_id} and sira_inference_metrics."""

from __future__ import annotations

import time
import uuid

import httpx
import psycopg

from tests.fixtures.server import bearer


def event(amount: float) -> dict:
    return {"event_id": str(uuid.uuid4()), "product": "fraud_score",
            "payload": {"amount": amount, "currency": "USD", "country": "US", "payment_method": "card"},
            "options": {"include_explanation": False}}


def test_model_info_adds_up_what_every_worker_served(server_factory):
    server = server_factory(workers=2)
    model_id = httpx.get(server.url + "/readyz").json()["models"]["fraud_score"]["model_id"]
    for index in range(30):  # fresh connections: both workers answer some
        assert httpx.post(server.url + "/v1/infer", json=event(100.0 + index), headers=bearer()).status_code == 200
    for _ in range(10):  # one feature vector ten times: one model run, nine cache hits
        answer = httpx.post(server.url + "/v1/infer", json=event(5.5), headers=bearer())
        assert answer.status_code == 200
    response = httpx.get(f"{server.url}/v1/models/{model_id}", headers=bearer("ml_ops"))
    assert response.status_code == 200, response.text
    info = response.json()
    assert info["model_id"] == model_id and info["status"] == "production" and info["loaded_at"]
    assert info["generation"] >= 1
    stats = info["stats"]
    assert (stats["requests"], stats["errors"], stats["model_runs"], stats["cache_hits"]) == (40, 0, 31, 9)
    assert stats["cache_hit_rate"] == round(9 / 40, 6)
    assert 0 < stats["p50_ms"] <= stats["p95_ms"]
    assert stats["by_role"]["production"]["requests"] == 40 and set(stats["by_role"]) == {"production"}


def test_model_info_refuses_what_it_should(server_factory):
    server = server_factory(workers=1)
    unknown = httpx.get(f"{server.url}/v1/models/{uuid.uuid4()}", headers=bearer("ml_ops"))
    assert unknown.status_code == 404 and unknown.json()["error_code"] == "MODEL_NOT_FOUND"
    malformed = httpx.get(f"{server.url}/v1/models/not-a-uuid", headers=bearer("ml_ops"))
    assert malformed.status_code == 400 and malformed.json()["error_code"] == "INVALID_REQUEST"
    assert httpx.get(f"{server.url}/v1/models/{uuid.uuid4()}", headers=bearer("sira_service")).status_code == 403
    assert httpx.get(f"{server.url}/v1/models/{uuid.uuid4()}").status_code == 401


def test_the_supervisor_writes_a_metrics_row_per_window(server_factory, fresh_db):
    server = server_factory(workers=2, SIRA_METRICS_WINDOW_S="1")
    model_id = httpx.get(server.url + "/readyz").json()["models"]["fraud_score"]["model_id"]
    decisions = {"allow": 0, "review": 0, "block": 0}
    for index in range(40):
        answer = httpx.post(server.url + "/v1/infer", json=event(50.0 + index * 250), headers=bearer())
        assert answer.status_code == 200
        decisions[answer.json()["decision"]] += 1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with psycopg.connect(fresh_db) as conn:
            rows = conn.execute(
                "SELECT product, model_id::text, model_role, window_seconds, requests, errors, p50_ms, p95_ms, "
                "p99_ms, allow_count, review_count, block_count FROM sira_inference_metrics").fetchall()
        if sum(row[4] for row in rows) >= 40:
            break
        time.sleep(0.2)
    assert {row[:4] for row in rows} == {("fraud_score", model_id, "production", 1)}
    assert sum(row[4] for row in rows) == 40 and sum(row[5] for row in rows) == 0
    assert [sum(row[i] for row in rows) for i in (9, 10, 11)] == [decisions["allow"], decisions["review"],
                                                                   decisions["block"]]
    assert all(row[6] <= row[7] <= row[8] for row in rows)
