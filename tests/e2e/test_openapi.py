"""The OpenAPI document stays true: it validates, it lists every route, and schemathesis agrees with it.

schemathesis (every check, four phases, a fixed seed by default: SIRA_SCHEMATHESIS_SEED picks
another) runs against a real two-worker `sira serve` and must find no 5xx and no response the
document does not describe. One exception is configured, and only for POST /v1/infer: 504
INFERENCE_TIMEOUT, the documented answer to a request whose own `timeout_ms` ran out.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import pytest
from openapi_spec_validator import validate

from tests.fixtures.postgres import create_database, drop_database, unique_database_name
from tests.fixtures.server import REPO, TEST_INTERNAL_TOKEN, TEST_JWT_SECRET, SiraServer, free_port, sira_env

SCHEMATHESIS = os.path.join(os.path.dirname(sys.executable), "schemathesis")
SCHEMATHESIS_TIMEOUT_S = 300  # a hard bound; a run takes 40-60 s on two busy cores
SCHEMATHESIS_CONFIG = """
# POST /v1/infer answers 504 INFERENCE_TIMEOUT (documented) when the client's own timeout_ms ran out.
[[operations]]
include-path = "/v1/infer"
include-method = "POST"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "504"]

# The canary GET and stop meet the product that `canary` gave a config, so they reach a 200.
[[operations]]
include-path-regex = "^/v1/canary/"
parameters = { product = "fraud_score" }

# Generated model ids are never registered, so POST /v1/canary answers 404 (or 409): no warning for it.
[[operations]]
include-path = "/v1/canary"
include-method = "POST"
warnings = false
"""
MODEL_INFO_OPERATION = """
[[operations]]
include-path = "/v1/models/{{model_id}}"
include-method = "GET"
parameters = {{ model_id = "{model_id}" }}
"""
ROUTES = {  # what app/http/assembly.py serves today; the document must describe each
    "/v1/infer": {"post"}, "/v1/infer/batch": {"post"}, "/v1/infer/{prediction_id}": {"get"},
    "/v1/models": {"get"}, "/v1/models/{model_id}": {"get"}, "/v1/models/{model_id}/promote": {"post"},
    "/v1/canary": {"post"}, "/v1/outcomes": {"post"},
    "/v1/canary/{product}": {"get"}, "/v1/canary/{product}/stop": {"post"}, "/healthz": {"get"},
    "/readyz": {"get"}, "/metrics": {"get"}, "/openapi.json": {"get"}, "/docs": {"get"},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, pg_url):
    """A server of its own: schemathesis may promote or archive models."""
    name = unique_database_name("sira_openapi")
    dsn = create_database(pg_url, name)
    port = free_port()
    data_dir = str(tmp_path_factory.mktemp("openapi"))
    env = sira_env(SIRA_DATA_DIR=data_dir, SIRA_BIND=f"127.0.0.1:{port}", SIRA_WORKERS="2", DATABASE_URL=dsn,
                   JWT_SECRET=TEST_JWT_SECRET, INTERNAL_SERVICE_TOKEN=TEST_INTERNAL_TOKEN)
    sira = SiraServer(data_dir, env, port)
    try:
        sira.start()
        yield sira
    finally:
        sira.stop()
        drop_database(pg_url, name)


@pytest.fixture(scope="module")
def canary(server) -> dict:
    """A canary config for fraud_score (a second model at 10%), for schemathesis to read and stop."""
    from tests.e2e.test_models_api import production_of, publish

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TEST_INTERNAL_TOKEN}"},
                      timeout=10) as http:
        response = http.post("/v1/canary", json={
            "product": "fraud_score", "canary_model_id": publish(server),
            "production_model_id": production_of(http)["model_id"], "canary_percent": 10})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def document(server) -> dict:
    """The document as a client with a token sees it: with the served products' payloads."""
    response = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {TEST_INTERNAL_TOKEN}"},
                         timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def test_document_is_valid_openapi_3_1(document):
    assert document["openapi"] == "3.1.0"
    validate(document)  # openapi-spec-validator: raises on the first violation


def test_document_describes_every_route_and_only_those(server, document):
    assert {path: set(item) for path, item in document["paths"].items()} == ROUTES
    assert "routes missing from the OpenAPI document" not in server.log()


def test_document_shows_the_served_models_payload(document):
    schemas = document["components"]["schemas"]
    payload = schemas["Payload_fraud_score"]
    assert set(payload["required"]) == {"amount", "currency", "country", "payment_method"}
    assert payload["properties"]["features"]["properties"]["hour_of_day"]["maximum"] == 23
    variants = schemas["InferRequest"]["oneOf"]
    assert {"const": "fraud_score"} in [variant["properties"]["product"] for variant in variants]


def test_public_and_protected_operations(document):
    public = {(path, method) for path, item in document["paths"].items() for method, op in item.items()
              if op.get("security") == []}
    assert public == {("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get"), ("/openapi.json", "get"),
                      ("/docs", "get")}
    assert document["security"] == [{"bearerAuth": []}]


def test_docs_page_loads_the_document_without_any_cdn(server):
    response = httpx.get(server.url + "/docs", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert 'fetch("/openapi.json")' in response.text
    assert "http://" not in response.text and "https://" not in response.text


def test_schemathesis_finds_no_server_error_and_no_response_outside_the_document(server, canary, tmp_path):
    config = tmp_path / "schemathesis.toml"
    # GET /v1/models/{model_id} meets the demo model, so it reaches a 200 and its counts are checked.
    demo_id = httpx.get(server.url + "/readyz", timeout=10).json()["models"]["fraud_score"]["model_id"]
    config.write_text(SCHEMATHESIS_CONFIG + MODEL_INFO_OPERATION.format(model_id=demo_id))
    seed = os.environ.get("SIRA_SCHEMATHESIS_SEED", "1")
    env = dict(os.environ, PYTHONPATH=REPO, SCHEMATHESIS_HOOKS="tests.e2e.schemathesis_hooks")
    command = [SCHEMATHESIS, "--no-color", "--config-file", str(config), "run", server.url + "/openapi.json",
               "--header", f"Authorization: Bearer {TEST_INTERNAL_TOKEN}", "--checks", "all",
               "--max-examples", "30", "--seed", seed, "--workers", "1", "--request-timeout", "10",
               "--report", "junit", "--report-dir", str(tmp_path / "report")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=SCHEMATHESIS_TIMEOUT_S, env=env, cwd=REPO,
                            check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-12000:]
    assert "No issues found" in output
    operations = sum(len(methods) for methods in ROUTES.values())
    selected = re.search(r"Selected: (\d+)/(\d+)", output)
    tested = re.search(r"Tested: (\d+)", output)
    assert selected and tested, output[-3000:]
    assert int(selected.group(2)) == operations  # the document's operations, each one a route
    assert int(tested.group(1)) >= operations - 1, output[-3000:]  # at most one left with no case to run
