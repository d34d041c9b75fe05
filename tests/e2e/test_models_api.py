"""GET /v1/models and POST /v1/models/{model_id}/promote on a real `sira serve`, for ml_ops only."""

from __future__ import annotations

import json
import os
import uuid

import httpx
import psycopg
import pytest

from tests.fixtures.server import REPO, TEST_INTERNAL_TOKEN, SiraServer, bearer, module_server, run_sira

DEMO_MODEL = os.path.join(REPO, "workers", "demo", "fraud_score.onnx")
DEMO_SPEC = os.path.join(REPO, "workers", "demo", "fraud_score.spec.json")
ERROR_FIELDS = {"error_code", "message", "request_id", "timestamp", "details"}
SEED_FIELDS = {"model_id", "name", "version", "product", "status", "loaded_at"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, pg_url):
    """One two-worker server on its own database for the module; each test publishes its own versions."""
    with module_server(tmp_path_factory, pg_url, "models_api") as sira:
        yield sira


@pytest.fixture(scope="module")
def ml_ops(server):
    with httpx.Client(base_url=server.url, headers=bearer("ml_ops"), timeout=10) as http:
        yield http


def publish(server: SiraServer, *extra: str) -> str:
    """A new version of fraud_score through the CLI, on the server's database and model store."""
    version = f"v-{uuid.uuid4().hex[:8]}"
    result = run_sira("models", "publish", DEMO_MODEL, "--product", "fraud_score", "--version", version,
                      "--threshold", "0.4", "--spec", DEMO_SPEC, *extra, env=server.env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == ERROR_FIELDS and body["error_code"] == code, body
    return body


def models_by_id(ml_ops, **params) -> dict[str, dict]:
    response = ml_ops.get("/v1/models", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["total"] == len(body["models"])
    return {model["model_id"]: model for model in body["models"]}


def production_of(ml_ops, product: str = "fraud_score") -> dict:
    (model,) = models_by_id(ml_ops, product=product, status="production").values()
    return model


def test_list_has_the_seed_shape_and_the_demo_model(ml_ops, server):
    response = ml_ops.get("/v1/models")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"models", "total", "generation"}
    assert body["total"] == len(body["models"]) >= 1
    demo = [m for m in body["models"] if m["version"] == "demo-1"]
    assert len(demo) == 1
    assert SEED_FIELDS <= set(demo[0])
    assert demo[0]["product"] == "fraud_score" and demo[0]["name"] == "sira-fraud-demo"
    assert {"threshold", "sha256", "size_bytes", "created_at", "updated_at"} <= set(demo[0])


def test_list_filters_by_product_and_status(ml_ops, server):
    candidate = publish(server)
    assert candidate in models_by_id(ml_ops, status="candidate")
    assert candidate not in models_by_id(ml_ops, status="validated")
    assert models_by_id(ml_ops, product="no_such_product") == {}
    assert_error(ml_ops.get("/v1/models", params={"status": "live"}), 400, "INVALID_REQUEST")
    assert_error(ml_ops.get("/v1/models", params={"product": "Fraud Score"}), 400, "INVALID_REQUEST")


def test_promote_through_validated_to_production_archives_the_old_one(ml_ops, server):
    old = production_of(ml_ops)
    new = publish(server)

    validated = ml_ops.post(f"/v1/models/{new}/promote", json={"target": "validated"})
    assert validated.status_code == 200, validated.text
    body = validated.json()
    assert (body["model_id"], body["status"], body["previous_status"]) == (new, "validated", "candidate")
    assert body["archived_model_ids"] == []

    with psycopg.connect(server.env["DATABASE_URL"], autocommit=True) as listener:
        listener.execute("LISTEN sira_config_changed")
        promoted = ml_ops.post(f"/v1/models/{new}/promote", json={"target": "production"})
        notes = [json.loads(note.payload) for note in listener.notifies(timeout=10, stop_after=1)]
    assert promoted.status_code == 200, promoted.text
    body = promoted.json()
    assert SEED_FIELDS <= set(body)
    assert (body["status"], body["previous_status"], body["archived_model_ids"]) == ("production", "validated",
                                                                                    [old["model_id"]])
    assert notes == [{"table": "siramodel_registry", "op": "UPDATE", "product": "fraud_score"}]
    models = models_by_id(ml_ops, product="fraud_score")
    assert models[old["model_id"]]["status"] == "archived"
    assert production_of(ml_ops)["model_id"] == new


def test_promote_to_the_current_status_is_a_no_op(ml_ops, server):
    model_id = publish(server, "--status", "validated")
    response = ml_ops.post(f"/v1/models/{model_id}/promote", json={"target": "validated"})
    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["previous_status"]) == ("validated", "validated")


def test_demoting_the_production_model_is_a_conflict(ml_ops):
    production = production_of(ml_ops)
    body = assert_error(ml_ops.post(f"/v1/models/{production['model_id']}/promote", json={"target": "archived"}),
                        409, "CONFLICT")
    assert "promote another model" in body["message"]
    assert production_of(ml_ops)["model_id"] == production["model_id"]


def test_unknown_model_is_404_model_not_found(ml_ops):
    body = assert_error(ml_ops.post(f"/v1/models/{uuid.uuid4()}/promote", json={"target": "production"}),
                        404, "MODEL_NOT_FOUND")
    assert body["details"]["model_id"]


@pytest.mark.parametrize("model_id", ["not-a-uuid", "123", "00000000-0000-0000-0000-00000000000g"])
def test_malformed_model_id_is_400(ml_ops, model_id):
    body = assert_error(ml_ops.post(f"/v1/models/{model_id}/promote", json={"target": "production"}),
                        400, "INVALID_REQUEST")
    assert body["details"] == {"field": "model_id"}


@pytest.mark.parametrize("payload", [{"target": "candidate"}, {"target": "live"}, {"target": None}, {},
                                     {"target": ["production"]}])
def test_bad_target_is_400_naming_the_allowed_ones(ml_ops, server, payload):
    model_id = publish(server)
    body = assert_error(ml_ops.post(f"/v1/models/{model_id}/promote", json=payload), 400, "INVALID_REQUEST")
    assert body["details"] == {"field": "target", "allowed": ["validated", "canary", "production", "archived"]}
    assert models_by_id(ml_ops)[model_id]["status"] == "candidate"


def test_bodies_that_are_not_a_json_object_are_refused(ml_ops):
    url = f"/v1/models/{uuid.uuid4()}/promote"
    assert_error(ml_ops.post(url, content=b"{not json", headers={"Content-Type": "application/json"}),
                 400, "INVALID_REQUEST")
    assert_error(ml_ops.post(url, json=["production"]), 400, "INVALID_REQUEST")
    assert_error(ml_ops.post(url, content=b'{"target": "production"}', headers={"Content-Type": "text/plain"}),
                 415, "UNSUPPORTED_MEDIA_TYPE")
    assert_error(ml_ops.post(url, json={"target": "production", "pad": "x" * 5000}), 413, "PAYLOAD_TOO_LARGE")


@pytest.mark.parametrize("role", ["sira_service", "fraud_analyst", "pay_admin"])
def test_other_roles_are_forbidden(server, role):
    with httpx.Client(base_url=server.url, headers=bearer(role), timeout=10) as other:
        assert_error(other.get("/v1/models"), 403, "FORBIDDEN")
        assert_error(other.post(f"/v1/models/{uuid.uuid4()}/promote", json={"target": "production"}),
                     403, "FORBIDDEN")


def test_no_token_is_401_and_the_internal_token_may_list(server):
    assert_error(httpx.get(server.url + "/v1/models"), 401, "UNAUTHORIZED")
    internal = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {TEST_INTERNAL_TOKEN}"})
    assert internal.status_code == 200, internal.text


def test_get_on_promote_is_405(ml_ops):
    assert_error(ml_ops.get(f"/v1/models/{uuid.uuid4()}/promote"), 405, "METHOD_NOT_ALLOWED")


def test_both_workers_answer_from_their_own_pool(server):
    """Fresh connections land on both workers; each opens its pool lazily and answers the same list."""
    seen, totals = set(), set()
    for _ in range(30):
        with httpx.Client(base_url=server.url, headers=bearer("ml_ops"), timeout=10) as fresh:
            totals.add(fresh.get("/v1/models").json()["total"])
            seen.add(fresh.get("/readyz").json()["worker_pid"])
    assert len(seen) == 2, "fresh connections should have reached both workers"
    assert len(totals) == 1


def test_serve_with_an_s3_store_uploads_the_demo_model_and_serves_it(server_factory, s3_bucket):
    """MODEL_BUCKET makes `sira serve` use the bucket: the demo model is put there on the first start."""
    sira = server_factory(workers=1, **s3_bucket.sira_env())
    ready = httpx.get(sira.url + "/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    with httpx.Client(base_url=sira.url, headers=bearer("ml_ops"), timeout=10) as http:
        (demo,) = models_by_id(http).values()
    assert s3_bucket.keys() == [demo["storage_key"]]
    assert not os.path.exists(os.path.join(sira.data_dir, "store")), "the local store is not used"
