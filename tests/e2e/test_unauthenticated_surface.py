"""What a caller without a token learns from a real `sira serve`, on SIRA_BIND and on METRICS_BIND's port.

- /healthz and /readyz answer everyone, with the status codes the Kubernetes probes rely on, but
  /readyz keeps `dependencies` and `load_errors` (error texts naming hosts, users, paths) for an
  ml_ops token or for METRICS_BIND's port; another role or a bad token gets the public answer;
- /openapi.json names no feature of the served model (workers/demo/fraud_score.spec.json) unless
  the request has a valid token, or SIRA_OPENAPI_FEATURE_SPECS=on;
- SIRA_METRICS_ON_MAIN_PORT=off takes /metrics off SIRA_BIND (404 in the error schema), and
  METRICS_BIND's port keeps it;
- a bad value of either setting stops `sira serve` with one line, exit 2.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
from openapi_spec_validator import validate

from tests.fixtures.server import REPO, TEST_INTERNAL_TOKEN, bearer, free_port, module_server, run_sira, sira_env

DEMO_SPEC = os.path.join(REPO, "workers", "demo", "fraud_score.spec.json")
PUBLIC_READY_KEYS = {"ready", "worker_pid", "generation", "models", "timestamp"}
DETAIL_KEYS = {"load_errors", "dependencies"}
ERROR_KEYS = {"error_code", "message", "request_id", "timestamp", "details"}


def demo_features() -> tuple[set[str], set[str]]:
    """(feature names, category values) of the demo model: none may reach a caller without a token."""
    with open(DEMO_SPEC, encoding="utf-8") as handle:
        features = json.load(handle)["features"]
    names = {feature["name"] for feature in features}
    categories = {value for feature in features for value in feature.get("vocabulary", []) if value != "__other__"}
    return names, categories


def with_ops_port(**env: str) -> dict[str, str]:
    port = free_port()
    return {"METRICS_BIND": f"127.0.0.1:{port}", **env}


@pytest.fixture(scope="module")
def server(tmp_path_factory, pg_url):
    """The defaults (feature specs hidden, /metrics on both ports), with the ops port open."""
    env = with_ops_port()
    with module_server(tmp_path_factory, pg_url, "surface", workers=1, **env) as sira:
        sira.metrics_url = "http://" + env["METRICS_BIND"]
        yield sira


@pytest.fixture(scope="module")
def opened_server(tmp_path_factory, pg_url):
    """Feature specs public, /metrics off SIRA_BIND: the two settings the other way round."""
    env = with_ops_port(SIRA_OPENAPI_FEATURE_SPECS="on", SIRA_METRICS_ON_MAIN_PORT="off")
    with module_server(tmp_path_factory, pg_url, "surface_open", workers=1, **env) as sira:
        sira.metrics_url = "http://" + env["METRICS_BIND"]
        yield sira


def get(url: str, token: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(url, headers=token or {}, timeout=10)


# -- /healthz and /readyz ----------------------------------------------------------------------------

def test_healthz_says_ok_and_nothing_else(server):
    response = get(server.url + "/healthz")
    assert response.status_code == 200
    assert set(response.json()) == {"ok", "service", "timestamp"} and response.json()["ok"] is True


def test_readyz_without_a_token_is_status_only(server):
    response = get(server.url + "/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == PUBLIC_READY_KEYS, body
    assert body["ready"] is True and set(body["models"]) == {"fraud_score"}


def test_readyz_details_need_an_ml_ops_token(server):
    for token in (bearer("ml_ops"), {"Authorization": f"Bearer {TEST_INTERNAL_TOKEN}"}):
        response = get(server.url + "/readyz", token)
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == PUBLIC_READY_KEYS | DETAIL_KEYS
        assert body["dependencies"]["postgres"]["up"] is True


@pytest.mark.parametrize("credentials", ["fraud_analyst", "sira_service", "pay_admin", "Bearer not-a-token",
                                         "Basic eDp5"])
def test_readyz_with_another_role_or_a_bad_token_is_the_public_answer(server, credentials):
    """A token never takes away: a client that sends its token on every request still reads readiness."""
    token = {"Authorization": credentials} if " " in credentials else bearer(credentials)
    response = get(server.url + "/readyz", token)
    assert response.status_code == 200, response.text
    assert set(response.json()) == PUBLIC_READY_KEYS


def test_readyz_on_the_ops_port_has_the_details_without_a_token(server):
    response = get(server.metrics_url + "/readyz")
    assert response.status_code == 200, response.text
    assert set(response.json()) == PUBLIC_READY_KEYS | DETAIL_KEYS


# -- /openapi.json ----------------------------------------------------------------------------------

def assert_no_feature_spec(document: dict) -> None:
    text = json.dumps(document)
    names, categories = demo_features()
    assert not [name for name in names if name in text], "feature names in the public document"
    assert not [value for value in categories if json.dumps(value) in text], "categories in the public document"
    assert not [name for name in document["components"]["schemas"] if name.startswith("Payload_")]


def assert_feature_spec(document: dict) -> None:
    text = json.dumps(document)
    names, _ = demo_features()
    assert [name for name in sorted(names) if name not in text] == []
    assert "Payload_fraud_score" in document["components"]["schemas"]


def test_openapi_without_a_token_names_no_feature(server):
    response = get(server.url + "/openapi.json")
    assert response.status_code == 200
    document = response.json()
    validate(document)
    assert_no_feature_spec(document)
    assert "/v1/infer" in document["paths"] and "InferRequest" in document["components"]["schemas"]
    assert get(server.url + "/docs").status_code == 200  # the page fetches this public document


def test_openapi_with_a_token_of_any_role_shows_the_feature_specs(server):
    for role in ("sira_service", "fraud_analyst", "ml_ops", "pay_admin"):
        response = get(server.url + "/openapi.json", bearer(role))
        assert response.status_code == 200, (role, response.text)
        assert_feature_spec(response.json())
    bad = get(server.url + "/openapi.json", {"Authorization": "Bearer not-a-token"})
    assert bad.status_code == 200
    assert_no_feature_spec(bad.json())


def test_openapi_feature_specs_setting_shows_them_to_everyone(opened_server):
    response = get(opened_server.url + "/openapi.json")
    assert response.status_code == 200
    assert_feature_spec(response.json())


# -- /metrics -------------------------------------------------------------------------------------------

def test_metrics_on_the_main_port_by_default(server):
    assert "sira_inference_requests_total" in get(server.url + "/metrics").text


def test_metrics_off_the_main_port_is_a_404_there_and_served_on_the_ops_port(opened_server):
    refused = get(opened_server.url + "/metrics")
    assert refused.status_code == 404
    body = refused.json()
    assert set(body) == ERROR_KEYS and body["error_code"] == "NOT_FOUND", body
    assert "sira_" not in refused.text
    scraped = get(opened_server.metrics_url + "/metrics")
    assert scraped.status_code == 200 and "sira_inference_requests_total" in scraped.text
    assert get(opened_server.url + "/readyz").status_code == 200  # probes unchanged


# -- settings ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("variable", ["SIRA_METRICS_ON_MAIN_PORT", "SIRA_OPENAPI_FEATURE_SPECS"])
def test_bad_value_stops_sira_serve_with_one_line(tmp_path, variable):
    result = run_sira("serve", env=sira_env(SIRA_DATA_DIR=str(tmp_path / "data"), **{variable: "maybe"}))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"sira: configuration error: {variable}: expected on or off, got 'maybe'"], result.stderr
    assert not (tmp_path / "data").exists()
