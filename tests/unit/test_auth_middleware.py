"""AuthMiddleware in a falcon app: public routes and methods, 401 without a token, 403 for the wrong role."""

from __future__ import annotations

import falcon
import falcon.asgi
import falcon.testing
import pytest

from app.auth.keys import mint_token
from app.auth.tokens import AuthMiddleware
from app.errors import ApiError
from tests.fixtures.jwt_keys import (  # noqa: F401 (fixtures)
    INTERNAL,
    SECRET,
    auth_fixture,
    bearer,
    ec_key_fixture,
    key_files_fixture,
    keyring_fixture,
    rsa_new_fixture,
    rsa_old_fixture,
)

# --- middleware ---------------------------------------------------------------------------------


class HealthResource:
    async def on_get(self, req, resp):
        resp.media = {"status": "ok"}


class InferResource:
    auth_actions = {"POST": "infer", "GET": "predictions:read"}

    async def on_post(self, req, resp):
        resp.media = {"subject": req.context.principal.subject}

    async def on_get(self, req, resp):
        resp.media = {"subject": req.context.principal.subject}

    async def on_put(self, req, resp):
        resp.media = {"public": True}


async def render_api_error(req, resp, ex, params):
    resp.status = ex.status
    resp.media = {"error_code": ex.code, "message": ex.message, "details": ex.details}
    for name, value in ex.headers.items():
        resp.set_header(name, value)


@pytest.fixture()
def client(auth) -> falcon.testing.TestClient:
    app = falcon.asgi.App(middleware=[AuthMiddleware(auth)])
    app.add_error_handler(ApiError, render_api_error)
    app.add_route("/healthz", HealthResource())
    app.add_route("/v1/infer", InferResource())
    return falcon.testing.TestClient(app)


def test_middleware_public_route_needs_no_token(client):
    assert client.simulate_get("/healthz").status_code == 200


def test_middleware_method_not_in_auth_actions_is_public(client):
    assert client.simulate_put("/v1/infer").json == {"public": True}


def test_middleware_protected_route_without_token_is_401(client):
    result = client.simulate_post("/v1/infer")
    assert result.status_code == 401
    assert result.json["error_code"] == "UNAUTHORIZED"
    assert result.headers["WWW-Authenticate"] == "Bearer"


def test_middleware_wrong_role_is_403(client):
    token = mint_token(role="pay_admin", subject="admin", ttl_s=60, secret=SECRET)
    result = client.simulate_post("/v1/infer", headers={"Authorization": bearer(token)})
    assert result.status_code == 403
    assert sorted(result.json["details"]["required"]) == ["fraud_analyst", "sira_service"]


def test_middleware_right_role_is_200_and_sets_principal(client):
    token = mint_token(role="sira_service", subject="svc-9", ttl_s=60, secret=SECRET)
    result = client.simulate_post("/v1/infer", headers={"Authorization": bearer(token)})
    assert result.status_code == 200
    assert result.json == {"subject": "svc-9"}


def test_middleware_action_depends_on_method(client):
    token = mint_token(role="ml_ops", subject="ops", ttl_s=60, secret=SECRET)
    headers = {"Authorization": bearer(token)}
    assert client.simulate_get("/v1/infer", headers=headers).status_code == 200
    assert client.simulate_post("/v1/infer", headers=headers).status_code == 403


def test_middleware_internal_token_passes(client):
    result = client.simulate_post("/v1/infer", headers={"Authorization": bearer(INTERNAL)})
    assert result.json == {"subject": "internal_service"}


def test_unknown_route_is_not_an_auth_error(client):
    assert client.simulate_get("/nowhere").status_code == 404
