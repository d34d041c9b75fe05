"""Canaries end to end on real `sira serve` processes: routing, two instances, shadow, automatic rollback.

The canary is set through POST /v1/canary; the supervisor mirrors it into the control block (its
NOTIFY reaches every instance on the database), the workers route each event by its bucket
(app/scoring/routing.py, recomputed here with the canary's routing seed, read from Postgres since
the API never answers it, to check every answer), and the supervisor's watch rolls a misbehaving
canary back (workers/canary_watch.py).
"""

from __future__ import annotations

import os
import time
import uuid

import httpx
import psycopg
import pytest

from app.scoring.features import FeatureSpec
from app.scoring.routing import goes_to_canary
from tests.fixtures.metrics import scrape, total
from tests.fixtures.models import (
    build_dense_model,
    build_faulty_model,
    demo_spec,
    write_spec,
)
from tests.fixtures.server import bearer, run_sira
from tests.fixtures.waiting import wait_for

PRODUCT = "fraud_score"
BATCH = 250
# Routing tests judge the router, not the model: a canary slower than the demo trees stays in.
# Routing tests: their random canary blocks every event, and may be slower; no rule may roll it back.
NO_ROLLBACK = {"SIRA_CANARY_MAX_LATENCY_RATIO": "1000", "SIRA_CANARY_MIN_REQUESTS": "100000000"}


def event(event_id: str | None = None, amount: float | None = None) -> dict:
    """A valid event; amounts vary so that no two events share a cache entry."""
    return {"event_id": event_id or str(uuid.uuid4()), "product": PRODUCT,
            "payload": {"amount": amount if amount is not None else 10.0 + (uuid.uuid4().int % 900_000) / 100,
                        "currency": "USD", "country": "US", "payment_method": "card",
                        "features": {"hour_of_day": 14, "account_age_days": 700}},
            "options": {"include_explanation": False, "enable_cache": False}}



def production_model_id(server) -> str:
    models = httpx.get(f"{server.url}/v1/models?status=production", headers=bearer("ml_ops")).json()["models"]
    return next(model["model_id"] for model in models if model["product"] == PRODUCT)


def publish(server, path: str, version: str) -> str:
    spec = write_spec(os.path.dirname(path), demo_spec(), f"{version}.spec.json")
    done = run_sira("models", "publish", path, "--product", PRODUCT, "--version", version,
                    "--threshold", "0.5", "--spec", spec, env=server.env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def set_canary(server, canary_id: str, percent: float, mode: str = "canary") -> dict:
    response = httpx.post(f"{server.url}/v1/canary", headers=bearer("ml_ops"), json={
        "product": PRODUCT, "canary_model_id": canary_id, "production_model_id": production_model_id(server),
        "canary_percent": percent, "mode": mode})
    assert response.status_code == 200, response.text
    return response.json()


def score_batch(url: str, events: list[dict]) -> list[dict]:
    """One batch over a fresh connection (so that any worker may answer)."""
    response = httpx.post(f"{url}/v1/infer/batch", headers=bearer(), json={"events": events}, timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert all("prediction_id" in result for result in results), results
    return results


def roles_of(url: str, events: list[dict]) -> dict[str, str]:
    roles = {}
    for start in range(0, len(events), BATCH):
        part = events[start:start + BATCH]
        for sent, result in zip(part, score_batch(url, part)):
            roles[sent["event_id"]] = result["model_role"]
    return roles


def routing_seed(dsn: str) -> bytes:
    """The product's canary routing seed, as the supervisors read it (no API answers it)."""
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT routing_seed FROM sira_canary_config WHERE product = %s", (PRODUCT,)).fetchone()[0]


def canary_in_force(url: str, basis_points: int, seed: bytes) -> bool:
    """An event that must meet the canary at this share does, and one that must not does not."""
    probe = [event(f"probe-{i}") for i in range(200)]
    roles = roles_of(url, probe)
    return all((roles[e["event_id"]] == "canary") == goes_to_canary(PRODUCT, e["event_id"], basis_points, seed)
               for e in probe)


@pytest.fixture
def dense_model(tmp_path) -> str:
    path = str(tmp_path / "dense.onnx")
    build_dense_model(path, hidden=64, seed=7)
    return path


def test_a_canary_routes_by_bucket_on_every_worker_and_raising_it_keeps_its_events(server_factory, fresh_db,
                                                                                   dense_model):
    server = server_factory(workers=2, **NO_ROLLBACK)
    canary_id = publish(server, dense_model, "canary-1")
    set_at = time.monotonic()
    set_canary(server, canary_id, 10)
    seed = routing_seed(fresh_db)
    wait_for(lambda: canary_in_force(server.url, 1000, seed), "the 10% canary in force")
    print(f"\n10% canary in force {time.monotonic() - set_at:.2f}s after POST /v1/canary")

    events = [event() for _ in range(20_000)]
    first = roles_of(server.url, events)
    on_canary = {event_id for event_id, role in first.items() if role == "canary"}
    assert 1800 <= len(on_canary) <= 2200, len(on_canary)  # 10% +/- 1%
    assert all((event_id in on_canary) == goes_to_canary(PRODUCT, event_id, 1000, seed) for event_id in first)
    again = roles_of(server.url, events[:4000])  # sent again, over fresh connections
    assert all(again[event_id] == first[event_id] for event_id in again)

    config = set_canary(server, canary_id, 25)
    assert config["canary_percent"] == 25
    assert routing_seed(fresh_db) == seed  # raising the share keeps the seed
    wait_for(lambda: canary_in_force(server.url, 2500, seed), "the 25% canary in force")
    raised = roles_of(server.url, events)
    assert all(raised[event_id] == "canary" for event_id in on_canary)  # nobody moved back
    assert 4800 <= sum(role == "canary" for role in raised.values()) <= 5200  # 25% +/- 1%

    samples = scrape(server.url)
    assert total(samples, "sira_canary_traffic_ratio", product=PRODUCT) == 0.25
    canary_requests = total(samples, "sira_inference_requests_total", model_role="canary", model_id=canary_id)
    assert canary_requests >= len(on_canary) + 4800

    # The runbook's comparison works from the prediction log alone once the writer caught up.
    production_id = production_model_id(server)

    def compared() -> dict:
        with psycopg.connect(fresh_db) as conn:
            rows = conn.execute("SELECT model_role, model_id::text, requests"
                                " FROM compare_canary_performance(%s, %s, %s, 1)",
                                (PRODUCT, canary_id, production_id)).fetchall()
        by_role = {role: (model_id, requests) for role, model_id, requests in rows}
        # every canary answer the metrics counted is in a row (the writer sends at most every 100 ms)
        return by_role if by_role.get("canary", ("", 0))[1] >= canary_requests else {}

    by_role = wait_for(compared, "the prediction log to hold every answer")
    assert by_role["canary"] == (canary_id, canary_requests)
    assert by_role["production"][0] == production_id


def test_a_canary_set_on_one_instance_is_in_force_on_another_sharing_the_database(server_factory, fresh_db,
                                                                                   s3_bucket, dense_model):
    # Two instances share the database and the model store (the bucket), each with its own data dir.
    shared = dict(NO_ROLLBACK, MODEL_POLL_INTERVAL_S="300", **s3_bucket.sira_env())  # NOTIFY, not the poll
    first = server_factory(workers=1, database_url=fresh_db, **shared)
    second = server_factory(workers=1, database_url=fresh_db, **shared)
    canary_id = publish(first, dense_model, "canary-2")
    set_at = time.monotonic()
    set_canary(first, canary_id, 50)
    seed = routing_seed(fresh_db)
    wait_for(lambda: canary_in_force(second.url, 5000, seed), "the canary on the second instance")
    print(f"\ncanary set on one instance in force on the other {time.monotonic() - set_at:.2f}s later")
    stopped = httpx.post(f"{second.url}/v1/canary/{PRODUCT}/stop", headers=bearer("ml_ops", subject="ops-anna"))
    assert stopped.status_code == 200, stopped.text
    wait_for(lambda: canary_in_force(first.url, 0, seed), "the stop on the first instance")


def logged_roles(dsn: str, event_ids: list[str]) -> dict[tuple[str, str], str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT event_id, model_role, model_id::text FROM siramodel_predictions "
                            "WHERE event_id = ANY(%s)", (event_ids,)).fetchall()
    return {(event_id, role): model_id for event_id, role, model_id in rows}


def test_a_shadow_scores_every_event_and_answers_none(server_factory, fresh_db, dense_model):
    server = server_factory(workers=2, **NO_ROLLBACK)
    shadow_id = publish(server, dense_model, "shadow-1")
    set_canary(server, shadow_id, 0, mode="shadow")
    production_id = production_model_id(server)
    events = [event() for _ in range(500)]

    def shadow_logged() -> bool:
        roles = roles_of(server.url, events[:50])
        assert set(roles.values()) == {"production"}
        logged = logged_roles(fresh_db, [e["event_id"] for e in events[:50]])
        return any(role == "shadow" for _, role in logged)

    wait_for(shadow_logged, "the shadow in force")
    roles = roles_of(server.url, events)
    assert set(roles.values()) == {"production"}  # decisions come from production alone
    ids = [e["event_id"] for e in events]
    logged = wait_for(lambda: (found := logged_roles(fresh_db, ids)) and
                      sum(role == "shadow" for _, role in found) >= len(ids) and found, "the shadow rows")
    assert all(logged[(event_id, "shadow")] == shadow_id for event_id in ids)
    assert all(logged[(event_id, "production")] == production_id for event_id in ids)


def rollback_rows(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT product, canary_model_id::text, reason, metrics, triggered_by "
                            "FROM sira_canary_rollback_log ORDER BY id").fetchall()


ROLLBACK_ENV = {"SIRA_CANARY_MIN_REQUESTS": "50", "SIRA_CANARY_WINDOW_S": "30",
                "SIRA_BREAKER_FAILURES": "1000000",  # the breaker stays out of the way of the window rules
                "SIRA_CANARY_BUDGET_MS": "10000"}  # and so does the time budget: slow is judged on p95


def test_a_faulty_canary_fails_no_request_and_is_rolled_back(server_factory, fresh_db, tmp_path):
    server = server_factory(workers=2, **ROLLBACK_ENV)
    canary_id = publish(server, faulty_model(tmp_path), "faulty-1")
    set_canary(server, canary_id, 50)
    answers = []
    with httpx.Client(base_url=server.url, headers=bearer(), timeout=30) as client:
        def send_some() -> bool:
            for _ in range(20):
                response = client.post("/v1/infer", json=event())
                assert response.status_code == 200, response.text  # the canary's failures reach nobody
                answers.append(response.json())
            return bool(rollback_rows(fresh_db))

        wait_for(send_some, "the automatic rollback", timeout=120)
    fallbacks = [a for a in answers if a.get("fallback")]
    assert fallbacks and all(a["model_role"] == "production" for a in fallbacks)
    assert not any(a["model_role"] == "canary" for a in answers)  # it never answered
    (product, rolled_back, reason, figures, triggered_by), = rollback_rows(fresh_db)
    assert (product, rolled_back, reason, triggered_by) == (PRODUCT, canary_id, "error_rate", "auto")
    assert figures["canary"]["errors"] >= 50 and figures["production"]["errors"] == 0
    config = httpx.get(f"{server.url}/v1/canary/{PRODUCT}", headers=bearer("ml_ops")).json()
    assert config["canary_percent"] == 0
    wait_for(lambda: total(scrape(server.url), "sira_canary_rollbacks_total", product=PRODUCT) == 1,
             "the rollback counted")
    assert "rolled back (error_rate)" in server.log()
    samples = scrape(server.url)
    assert total(samples, "sira_inference_fallbacks_total", model_id=canary_id) == len(fallbacks)
    failed = total(samples, "sira_prediction_errors_total", model_id=canary_id, error_type="MODEL_FAILED")
    assert failed == len(fallbacks)


def faulty_model(tmp_path) -> str:
    path = str(tmp_path / "faulty.onnx")
    build_faulty_model(path, FeatureSpec.from_dict(demo_spec()).baseline_row().tolist())
    return path


def test_a_failing_canary_trips_its_breaker_and_failing_again_is_rolled_back(server_factory, fresh_db, tmp_path):
    server = server_factory(workers=2, SIRA_BREAKER_FAILURES="5", SIRA_BREAKER_COOLDOWN_S="3",
                            SIRA_CANARY_MIN_REQUESTS="1000000")  # only the breaker can roll it back here
    canary_id = publish(server, faulty_model(tmp_path), "faulty-2")
    set_canary(server, canary_id, 50)
    answers = []
    with httpx.Client(base_url=server.url, headers=bearer(), timeout=30) as client:
        def send(count: int) -> None:
            for _ in range(count):
                sent = event()
                response = client.post("/v1/infer", json=sent)
                assert response.status_code == 200, response.text  # the canary's failures reach nobody
                answers.append((sent["event_id"], response.json()))

        def tripped() -> bool:  # once the canary is in force, its failures open the breaker
            send(5)
            return total(scrape(server.url), "sira_canary_breaker_state", model_id=canary_id) == 1

        wait_for(tripped, "the breaker open in /metrics", timeout=60)
        send(20)  # while it is open, the canary's events go to production without trying it

        def rolled_back() -> bool:
            send(10)
            return bool(rollback_rows(fresh_db))

        wait_for(rolled_back, "the breaker's rollback", timeout=120)
    (product, rolled_back_id, reason, figures, triggered_by), = rollback_rows(fresh_db)
    assert (product, rolled_back_id, reason, triggered_by) == (PRODUCT, canary_id, "circuit_breaker", "auto")
    assert figures["breaker"]["failures_after_cooldown"] >= 1
    seed = routing_seed(fresh_db)
    canary_events = [a for event_id, a in answers if goes_to_canary(PRODUCT, event_id, 5000, seed)]
    assert all(a["model_role"] == "production" for a in canary_events)  # the canary never answered
    in_force = canary_events[next(i for i, a in enumerate(canary_events) if a.get("fallback")):]
    answered_before_rollback = [a for a in in_force if a.get("fallback")]
    # From the canary's first failure to its rollback, every one of its events was production's, said so:
    # only the last round, sent after the rollback, may be plain production answers.
    assert len(answered_before_rollback) >= len(in_force) - 10
    samples = wait_for(lambda: (found := scrape(server.url)) and  # closed again once the canary is stopped
                       total(found, "sira_canary_breaker_state", model_id=canary_id) == 0 and found,
                       "the breaker closed")
    assert total(samples, "sira_canary_breaker_opened_total", model_id=canary_id) >= 2  # opened, then again
    assert total(samples, "sira_inference_fallbacks_total", model_id=canary_id) == len(answered_before_rollback)
    log = server.log()
    assert "circuit breaker of canary" in log and "is open" in log and "is half_open" in log
    assert "supervisor task" not in log and "Traceback" not in log  # the watch never crashed


def test_a_slow_canary_is_rolled_back_on_its_latency(server_factory, fresh_db, tmp_path):
    server = server_factory(workers=2, **ROLLBACK_ENV)
    path = str(tmp_path / "slow.onnx")
    build_dense_model(path, hidden=1024, layers=6, seed=3)
    canary_id = publish(server, path, "slow-1")
    set_canary(server, canary_id, 50)
    with httpx.Client(base_url=server.url, headers=bearer(), timeout=30) as client:
        def send_some() -> bool:
            for _ in range(20):
                assert client.post("/v1/infer", json=event()).status_code == 200
            return bool(rollback_rows(fresh_db))

        wait_for(send_some, "the automatic rollback", timeout=120)
    (product, rolled_back, reason, figures, _), = rollback_rows(fresh_db)
    assert (product, rolled_back, reason) == (PRODUCT, canary_id, "latency_p95")
    assert figures["canary"]["p95_ms"] > 1.3 * figures["production"]["p95_ms"]
    assert figures["canary"]["errors"] == 0


def test_a_canary_over_its_time_budget_is_answered_by_production(server_factory, fresh_db, tmp_path):
    server = server_factory(workers=2, SIRA_CANARY_BUDGET_MS="0.001", SIRA_BREAKER_FAILURES="1000000",
                            SIRA_CANARY_MIN_REQUESTS="1000000")  # no breaker, no rollback: only the budget
    path = str(tmp_path / "slow.onnx")
    build_dense_model(path, hidden=256, seed=4)
    canary_id = publish(server, path, "over-budget-1")
    set_canary(server, canary_id, 50)
    answers = []

    def over_budget_seen() -> bool:
        events = [event() for _ in range(20)]
        answers.extend(zip(events, score_batch(server.url, events)))  # the batch path
        for sent in events:  # and the single one
            response = httpx.post(server.url + "/v1/infer", json=sent, headers=bearer())
            assert response.status_code == 200, response.text
            answers.append((sent, response.json()))
        return any(a.get("fallback") for _, a in answers)

    wait_for(over_budget_seen, "the canary in force")
    over_budget_seen()
    seed = routing_seed(fresh_db)
    canary_events = [a for sent, a in answers if goes_to_canary(PRODUCT, sent["event_id"], 5000, seed)]
    assert all(a["model_role"] == "production" for a in canary_events)  # never the canary's answer
    in_force = canary_events[next(i for i, a in enumerate(canary_events) if a.get("fallback")):]
    assert len(in_force) >= 10 and all(a.get("fallback") for a in in_force)
    assert total(scrape(server.url), "sira_inference_fallbacks_total", model_id=canary_id) == len(in_force)
    assert "over the canary budget" in server.log()
    assert rollback_rows(fresh_db) == []
