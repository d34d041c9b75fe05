"""POST /v1/canary, GET /v1/canary/{product}, POST /v1/canary/{product}/stop on a real `sira serve`.

Only the config and its refusals; which model answers a request is the routing's business.
"""

from __future__ import annotations

import json
import uuid

import httpx
import jsonschema
import psycopg
import pytest

from tests.e2e.test_models_api import DEMO_MODEL, assert_error, production_of, publish
from tests.fixtures.models import demo_spec, write_spec
from tests.fixtures.server import TEST_INTERNAL_TOKEN, bearer, make_token, module_server, run_sira

SUBJECT = "ops_ana"
CONFIG_FIELDS = {"product", "canary_model_id", "production_model_id", "canary_percent", "started_at", "updated_at",
                 "mode", "updated_by", "recent_rollbacks"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, pg_url):
    with module_server(tmp_path_factory, pg_url, "canary_api") as sira:
        yield sira


@pytest.fixture(scope="module")
def ml_ops(server):
    with httpx.Client(base_url=server.url, headers=bearer("ml_ops", subject=SUBJECT), timeout=10) as http:
        yield http


@pytest.fixture(scope="module")
def candidate(server) -> str:
    """A second fraud_score model, published through the CLI."""
    return publish(server)


@pytest.fixture(scope="module")
def other_product_model(server, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("risk_score")
    spec = write_spec(str(folder), demo_spec("risk_score"))
    result = run_sira("models", "publish", DEMO_MODEL, "--product", "risk_score", "--version", "v1",
                      "--threshold", "0.4", "--spec", spec, env=server.env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def assert_documented(server, body: dict) -> None:
    """The answer is what /openapi.json says a CanaryConfig is."""
    document = httpx.get(server.url + "/openapi.json", timeout=10).json()
    schema = {"$ref": "#/components/schemas/CanaryConfig", "components": document["components"]}
    jsonschema.validate(body, schema, cls=jsonschema.Draft202012Validator)


def canary_body(ml_ops, canary: str, percent=10, **extra) -> dict:
    return {"product": "fraud_score", "canary_model_id": canary,
            "production_model_id": production_of(ml_ops)["model_id"], "canary_percent": percent, **extra}


def test_set_then_get_answers_the_config(ml_ops, server, candidate):
    production = production_of(ml_ops)["model_id"]
    with psycopg.connect(server.env["DATABASE_URL"], autocommit=True) as listener:
        listener.execute("LISTEN sira_config_changed")
        response = ml_ops.post("/v1/canary", json=canary_body(ml_ops, candidate, 10))
        notes = [json.loads(note.payload) for note in listener.notifies(timeout=10, stop_after=1)]
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == CONFIG_FIELDS
    assert (body["product"], body["canary_model_id"], body["production_model_id"], body["canary_percent"],
            body["mode"], body["updated_by"]) == ("fraud_score", candidate, production, 10, "canary", SUBJECT)
    assert body["started_at"].endswith("Z") and body["updated_at"].endswith("Z")
    assert notes == [{"table": "sira_canary_config", "op": "INSERT", "product": "fraud_score"}]
    assert_documented(server, body)

    got = ml_ops.get("/v1/canary/fraud_score")
    assert got.status_code == 200, got.text
    assert got.json() == body
    log = server.log()
    assert f"{SUBJECT} set the canary of fraud_score: model {candidate}" in log
    assert_seed_kept_private(server, [response.text, got.text], log)


def assert_seed_kept_private(server, answers: list[str], log: str) -> None:
    """The routing seed is in Postgres, and in no answer and no log line (clients must not compute buckets)."""
    with psycopg.connect(server.env["DATABASE_URL"]) as conn:
        (seed,), = conn.execute("SELECT routing_seed FROM sira_canary_config WHERE product = 'fraud_score'").fetchall()
    assert len(seed) == 16
    for answer in answers:
        assert "seed" not in answer.lower() and seed.hex() not in answer.lower()
    assert seed.hex() not in log.lower()


def test_shadow_mode_and_two_decimals_are_kept(ml_ops, candidate):
    response = ml_ops.post("/v1/canary", json=canary_body(ml_ops, candidate, 12.25, mode="shadow"))
    assert response.status_code == 200, response.text
    assert (response.json()["canary_percent"], response.json()["mode"]) == (12.25, "shadow")
    response = ml_ops.post("/v1/canary", json=canary_body(ml_ops, candidate, 10))
    assert (response.json()["canary_percent"], response.json()["mode"]) == (10, "canary")


def test_unknown_models_are_404_model_not_found(ml_ops, candidate):
    body = assert_error(ml_ops.post("/v1/canary", json=canary_body(ml_ops, str(uuid.uuid4()))), 404,
                        "MODEL_NOT_FOUND")
    assert body["details"] == {"field": "canary_model_id"}
    stale = dict(canary_body(ml_ops, candidate), production_model_id=str(uuid.uuid4()))
    body = assert_error(ml_ops.post("/v1/canary", json=stale), 404, "MODEL_NOT_FOUND")
    assert body["details"] == {"field": "production_model_id"}


def test_model_pairs_the_registry_refuses_are_409(ml_ops, server, other_product_model):
    archived = publish(server)
    assert ml_ops.post(f"/v1/models/{archived}/promote", json={"target": "archived"}).status_code == 200
    production = production_of(ml_ops)["model_id"]
    for canary, field in ((other_product_model, "canary_model_id"), (archived, "canary_model_id"),
                          (production, "canary_model_id")):
        body = assert_error(ml_ops.post("/v1/canary", json=canary_body(ml_ops, canary)), 409, "CONFLICT")
        assert body["details"] == {"field": field}, body
    before = ml_ops.get("/v1/canary/fraud_score").json()
    assert before["canary_model_id"] not in (other_product_model, archived, production)


def test_a_production_id_that_is_no_longer_current_is_409(ml_ops, server, candidate):
    old = production_of(ml_ops)["model_id"]
    successor = publish(server)
    assert ml_ops.post(f"/v1/models/{successor}/promote", json={"target": "production"}).status_code == 200
    stale = dict(canary_body(ml_ops, candidate), production_model_id=old)
    body = assert_error(ml_ops.post("/v1/canary", json=stale), 409, "CONFLICT")
    assert body["details"] == {"field": "production_model_id"}
    assert "not the current production model" in body["message"]
    response = ml_ops.post("/v1/canary", json=canary_body(ml_ops, candidate))
    assert response.status_code == 200 and response.json()["production_model_id"] == successor


@pytest.mark.parametrize("change, field", [
    ({"canary_percent": 101}, "canary_percent"),
    ({"canary_percent": -1}, "canary_percent"),
    ({"canary_percent": 10.123}, "canary_percent"),
    ({"canary_percent": "ten"}, "canary_percent"),
    ({"canary_percent": True}, "canary_percent"),
    ({"canary_percent": None}, "canary_percent"),
    ({"mode": "blue"}, "mode"),
    ({"mode": None}, "mode"),
    ({"product": "Fraud Score"}, "product"),
    ({"product": 7}, "product"),
    ({"canary_model_id": "not-a-uuid"}, "canary_model_id"),
    ({"production_model_id": 12}, "production_model_id"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_fields_are_400_naming_the_field(ml_ops, candidate, change, field):
    body = assert_error(ml_ops.post("/v1/canary", json={**canary_body(ml_ops, candidate), **change}), 400,
                        "INVALID_REQUEST")
    assert body["details"]["field"] == field, body


@pytest.mark.parametrize("missing", ["product", "canary_model_id", "production_model_id", "canary_percent"])
def test_missing_fields_are_400_naming_the_field(ml_ops, candidate, missing):
    payload = canary_body(ml_ops, candidate)
    del payload[missing]
    body = assert_error(ml_ops.post("/v1/canary", json=payload), 400, "INVALID_REQUEST")
    assert body["details"] == {"field": missing}


def test_bodies_that_are_not_a_json_object_are_refused(ml_ops):
    assert_error(ml_ops.post("/v1/canary", content=b"{oops", headers={"Content-Type": "application/json"}), 400,
                 "INVALID_REQUEST")
    assert_error(ml_ops.post("/v1/canary", json=[1]), 400, "INVALID_REQUEST")
    assert_error(ml_ops.post("/v1/canary", content=b"{}", headers={"Content-Type": "text/plain"}), 415,
                 "UNSUPPORTED_MEDIA_TYPE")


def test_unknown_or_malformed_products_on_get_and_stop(ml_ops):
    assert_error(ml_ops.get("/v1/canary/no_canary_here"), 404, "NOT_FOUND")
    assert_error(ml_ops.post("/v1/canary/no_canary_here/stop"), 404, "NOT_FOUND")
    assert ml_ops.get("/v1/canary/Fraud-Score").json()["details"] == {"field": "product"}
    assert_error(ml_ops.post("/v1/canary/Fraud-Score/stop"), 400, "INVALID_REQUEST")


def test_fraud_analyst_is_forbidden_everywhere(server, candidate):
    with httpx.Client(base_url=server.url, headers=bearer("fraud_analyst"), timeout=10) as analyst:
        assert_error(analyst.post("/v1/canary", json={"product": "fraud_score"}), 403, "FORBIDDEN")
        assert_error(analyst.get("/v1/canary/fraud_score"), 403, "FORBIDDEN")
        assert_error(analyst.post("/v1/canary/fraud_score/stop"), 403, "FORBIDDEN")


def test_pay_admin_may_read_but_not_change(server, ml_ops, candidate):
    assert ml_ops.post("/v1/canary", json=canary_body(ml_ops, candidate, 5)).status_code == 200
    with httpx.Client(base_url=server.url, headers=bearer("pay_admin"), timeout=10) as admin:
        got = admin.get("/v1/canary/fraud_score")
        assert got.status_code == 200, got.text
        assert got.json()["canary_percent"] == 5
        assert_error(admin.post("/v1/canary", json=canary_body(ml_ops, candidate, 50)), 403, "FORBIDDEN")
        assert_error(admin.post("/v1/canary/fraud_score/stop"), 403, "FORBIDDEN")
    assert ml_ops.get("/v1/canary/fraud_score").json()["canary_percent"] == 5


def test_no_token_is_401_and_the_internal_token_may_read(server):
    assert_error(httpx.post(server.url + "/v1/canary", json={}), 401, "UNAUTHORIZED")
    assert_error(httpx.get(server.url + "/v1/canary/fraud_score"), 401, "UNAUTHORIZED")
    assert_error(httpx.post(server.url + "/v1/canary/fraud_score/stop"), 401, "UNAUTHORIZED")
    internal = httpx.get(server.url + "/v1/canary/fraud_score",
                         headers={"Authorization": f"Bearer {TEST_INTERNAL_TOKEN}"})
    assert internal.status_code == 200, internal.text


def test_stop_sets_percent_zero_and_logs_a_manual_rollback(ml_ops, server, candidate):
    started = ml_ops.post("/v1/canary", json=canary_body(ml_ops, candidate, 20)).json()
    token = make_token("ml_ops", subject="ops_bo")
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=10) as bo:
        stopped = bo.post("/v1/canary/fraud_score/stop")
        assert stopped.status_code == 200, stopped.text
        again = bo.post("/v1/canary/fraud_score/stop")
    body = stopped.json()
    assert (body["canary_percent"], body["mode"], body["updated_by"]) == (0, "canary", "ops_bo")
    assert body["canary_model_id"] == candidate and body["started_at"] == started["started_at"]
    latest = body["recent_rollbacks"][0]
    assert (latest["reason"], latest["triggered_by"], latest["canary_model_id"]) == ("manual stop", "manual:ops_bo",
                                                                                    candidate)
    assert latest["metrics"] == {"canary_percent": 20, "mode": "canary"}
    assert_documented(server, body)
    assert again.json()["recent_rollbacks"] == body["recent_rollbacks"], "a second stop logs nothing"
    assert ml_ops.get("/v1/canary/fraud_score").json()["canary_percent"] == 0
    log = server.log()
    assert "ops_bo stopped the canary of fraud_score" in log
    assert token not in log


def test_get_on_set_and_stop_is_405(ml_ops):
    assert_error(ml_ops.get("/v1/canary"), 405, "METHOD_NOT_ALLOWED")
    assert_error(ml_ops.get("/v1/canary/fraud_score/stop"), 405, "METHOD_NOT_ALLOWED")
