"""Deadlines on a real `sira serve` with one worker and a model that never finishes by itself.

The model (tests/fixtures/models.build_hanging_model) runs for hours on any row but its baseline,
so with one worker every answer after the first proves that the run before it was stopped
(app/scoring/deadlines.py) and the worker was free again: a client's `options.timeout_ms` gives 504
INFERENCE_TIMEOUT; a canary's or shadow's budget gives production's answer.
"""

from __future__ import annotations

import httpx

from app.scoring.features import FeatureSpec
from tests.e2e.test_canary_routing import event, publish, rollback_rows, set_canary
from tests.fixtures.metrics import scrape, total
from tests.fixtures.models import build_hanging_model, demo_spec
from tests.fixtures.server import bearer
from tests.fixtures.waiting import wait_for

QUIET_WATCH = {"SIRA_BREAKER_FAILURES": "1000000", "SIRA_CANARY_MIN_REQUESTS": "1000000"}  # no breaker, no rollback


def hanging_model(tmp_path) -> str:
    path = str(tmp_path / "hanging.onnx")
    build_hanging_model(path, FeatureSpec.from_dict(demo_spec()).baseline_row().tolist())
    return path


def timed(event_id: str | None = None, timeout_ms: int = 200) -> dict:
    sent = event(event_id)
    sent["options"]["timeout_ms"] = timeout_ms
    return sent


def test_timeout_ms_stops_a_run_that_would_not_end_and_frees_the_worker(server_factory, fresh_db, tmp_path):
    server = server_factory(workers=1)
    model_id = publish(server, hanging_model(tmp_path), "hanging-1")
    promoted = httpx.post(f"{server.url}/v1/models/{model_id}/promote", json={"target": "production"},
                          headers=bearer("ml_ops"), timeout=10)
    assert promoted.status_code == 200, promoted.text

    def serving_the_hanging_model() -> bool:  # every probe carries a timeout: a bare one would hang
        return httpx.post(server.url + "/v1/infer", json=timed(), headers=bearer(), timeout=30).status_code == 504

    wait_for(serving_the_hanging_model, "the hanging model in production")
    before = total(scrape(server.url), "sira_prediction_errors_total", error_type="INFERENCE_TIMEOUT")
    for index in range(3):
        response = httpx.post(server.url + "/v1/infer", json=timed(f"evt-deadline-{index}"), headers=bearer(),
                              timeout=30)
        assert response.status_code == 504, response.text
        body = response.json()
        assert body["error_code"] == "INFERENCE_TIMEOUT" and body["details"] == {"timeout_ms": 200}
        assert body["request_id"] == response.headers["X-Request-ID"]

    batch = [timed(f"evt-deadline-batch-{index}", 100 + 50 * index) for index in range(3)]
    response = httpx.post(server.url + "/v1/infer/batch", json={"events": batch}, headers=bearer(), timeout=30)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [result["error_code"] for result in results] == ["INFERENCE_TIMEOUT"] * 3
    assert [result["details"]["index"] for result in results] == [0, 1, 2]

    after = total(scrape(server.url), "sira_prediction_errors_total", error_type="INFERENCE_TIMEOUT")
    assert after - before == 6
    assert "Traceback" not in server.log()


def test_a_canary_that_would_not_end_is_stopped_at_its_budget_and_production_answers(server_factory, fresh_db,
                                                                                  tmp_path):
    server = server_factory(workers=1, **QUIET_WATCH)  # default budget: 50 ms per event
    canary_id = publish(server, hanging_model(tmp_path), "hanging-canary-1")
    set_canary(server, canary_id, 100)

    def fell_back() -> bool:
        response = httpx.post(server.url + "/v1/infer", json=event(), headers=bearer(), timeout=30)
        assert response.status_code == 200, response.text
        return response.json().get("fallback") is True

    wait_for(fell_back, "the hanging canary in force")
    answers = [httpx.post(server.url + "/v1/infer", json=event(), headers=bearer(), timeout=30) for _ in range(5)]
    assert all(a.status_code == 200 and a.json()["model_role"] == "production" and a.json()["fallback"]
               for a in answers), [a.text for a in answers]
    response = httpx.post(server.url + "/v1/infer/batch", json={"events": [event() for _ in range(4)]},
                          headers=bearer(), timeout=30)
    assert response.status_code == 200, response.text
    assert all(r["model_role"] == "production" and r["fallback"] for r in response.json()["results"])
    assert "over the canary budget" in server.log()
    assert total(scrape(server.url), "sira_inference_fallbacks_total", model_id=canary_id) >= 10
    assert rollback_rows(fresh_db) == []


def test_a_shadow_that_would_not_end_is_stopped_after_the_answer(server_factory, fresh_db, tmp_path):
    server = server_factory(workers=1, **QUIET_WATCH)
    shadow_id = publish(server, hanging_model(tmp_path), "hanging-shadow-1")
    set_canary(server, shadow_id, 100, mode="shadow")

    def shadow_stopped() -> bool:
        response = httpx.post(server.url + "/v1/infer", json=event(), headers=bearer(), timeout=30)
        assert response.status_code == 200, response.text
        return "over the canary budget" in server.log()

    wait_for(shadow_stopped, "the hanging shadow in force and stopped")
    answers = [httpx.post(server.url + "/v1/infer", json=event(), headers=bearer(), timeout=30) for _ in range(5)]
    assert all(a.status_code == 200 and a.json()["model_role"] == "production" for a in answers)
    response = httpx.post(server.url + "/v1/infer/batch", json={"events": [event() for _ in range(3)]},
                          headers=bearer(), timeout=30)
    assert response.status_code == 200, response.text
    assert httpx.post(server.url + "/v1/infer", json=event(), headers=bearer(), timeout=30).status_code == 200
