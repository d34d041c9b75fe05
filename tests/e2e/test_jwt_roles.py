"""JWT roles on a real `sira serve`: a role no JWT may hold, roles SIRA does not know, and the rate
limit a token with several roles meets on each action.

Which actions make this observable depends on the role table (app/auth/roles.py):

- `fraud_analyst` and `sira_service` grant the same actions (infer, predictions:read), so a token
  holding both may rightly use sira_service's unlimited rate everywhere it can act;
- `fraud_analyst` and `ml_ops` share only predictions:read: POST /v1/infer is fraud_analyst's
  alone, GET /v1/models is ml_ops' alone. With ml_ops unlimited, a token holding both must still
  meet fraud_analyst's limit on /v1/infer.

The limits are per hour, so that no token comes back while a test runs; each test uses subjects of
its own, since a bucket is (role, subject).
"""

from __future__ import annotations

import random
import time
import uuid

import httpx
import jwt
import pytest

from tests.fixtures.server import TEST_INTERNAL_TOKEN, TEST_JWT_SECRET, module_server

LIMIT = 20
LIMITS = f"fraud_analyst={LIMIT}/hour,ml_ops=unlimited"  # anonymous and sira_service keep their defaults
ERROR_FIELDS = {"error_code", "message", "request_id", "timestamp", "details"}
INTERNAL = {"Authorization": f"Bearer {TEST_INTERNAL_TOKEN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, pg_url):
    with module_server(tmp_path_factory, pg_url, "jwtroles", workers=1, SIRA_RATE_LIMITS=LIMITS) as sira:
        yield sira


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=10) as http:
        yield http


@pytest.fixture(scope="module")
def prediction_id(client) -> str:
    """A logged prediction to read back (made with the internal token, which no limit touches)."""
    response = client.post("/v1/infer", json=event(), headers=INTERNAL)
    assert response.status_code == 200, response.text
    return response.json()["prediction_id"]


def bearer(subject: str, **role_claims) -> dict[str, str]:
    """A token signed like the server's own, with any `role` / `roles` claims (mint_token allows one known role)."""
    now = int(time.time())
    claims = {"sub": subject, "iat": now, "exp": now + 600, **role_claims}
    return {"Authorization": "Bearer " + jwt.encode(claims, TEST_JWT_SECRET, algorithm="HS256",
                                                     headers={"kid": "default"})}


def event() -> dict:
    payload = {"amount": round(random.uniform(10.0, 9000.0), 2), "currency": "USD", "country": "US",
               "payment_method": "card", "features": {"hour_of_day": 14}}
    return {"event_id": str(uuid.uuid4()), "product": "fraud_score", "payload": payload}


def infer_codes(client, headers: dict[str, str], count: int) -> list[int]:
    return [client.post("/v1/infer", json=event(), headers=headers).status_code for _ in range(count)]


def get_codes(client, path: str, headers: dict[str, str], count: int) -> list[int]:
    return [client.get(path, headers=headers).status_code for _ in range(count)]


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == ERROR_FIELDS
    assert body["error_code"] == code
    assert body["request_id"] == response.headers["X-Request-ID"]
    return body


def assert_limited_as_fraud_analyst(client, headers: dict[str, str]) -> None:
    """Exactly LIMIT inferences, then a 429 that names fraud_analyst's limit."""
    assert infer_codes(client, headers, LIMIT) == [200] * LIMIT
    body = assert_error(client.post("/v1/infer", json=event(), headers=headers), 429, "RATE_LIMIT_EXCEEDED")
    assert body["details"]["role"] == "fraud_analyst"
    assert body["details"]["limit"] == f"{LIMIT}/hour"


# -- (a) internal_service belongs to the internal token alone ------------------------------------

@pytest.mark.parametrize("role_claims", [
    {"roles": ["fraud_analyst", "internal_service"]},
    {"role": "fraud_analyst", "roles": ["internal_service"]},
    {"role": "internal_service"},
])
def test_a_jwt_claiming_internal_service_is_refused_401(client, prediction_id, role_claims):
    forged = bearer("mallory", **role_claims)
    for response in (client.get(f"/v1/infer/{prediction_id}", headers=forged),
                     client.post("/v1/infer", json=event(), headers=forged)):
        body = assert_error(response, 401, "UNAUTHORIZED")
        assert "internal_service" in body["message"] and "internal service token" in body["message"]
        assert response.headers["WWW-Authenticate"] == "Bearer"
    # The internal token itself keeps the role, and its unlimited rate.
    assert client.get(f"/v1/infer/{prediction_id}", headers=INTERNAL).status_code == 200
    assert set(infer_codes(client, INTERNAL, LIMIT + 5)) == {200}


# -- (b) several roles: the limit of the roles that grant the action ------------------------------

def test_a_role_lends_its_limit_only_to_the_actions_it_grants(client, prediction_id):
    # ml_ops (unlimited here) may not infer: POST /v1/infer is granted by fraud_analyst alone.
    both = bearer("bea", roles=["fraud_analyst", "ml_ops"])
    assert_limited_as_fraud_analyst(client, both)
    # GET /v1/models is ml_ops' alone and GET /v1/infer/{id} is granted by both: unlimited, although
    # fraud_analyst's bucket of this subject is empty now.
    assert set(get_codes(client, "/v1/models", both, LIMIT + 5)) == {200}
    assert set(get_codes(client, f"/v1/infer/{prediction_id}", both, LIMIT + 5)) == {200}
    # sira_service grants every action fraud_analyst does (infer, predictions:read), so no action is
    # fraud_analyst's alone against it: the token follows sira_service's unlimited rate on both.
    analyst_and_service = bearer("cal", roles=["fraud_analyst", "sira_service"])
    assert set(infer_codes(client, analyst_and_service, LIMIT + 5)) == {200}
    assert set(get_codes(client, f"/v1/infer/{prediction_id}", analyst_and_service, LIMIT + 5)) == {200}
    assert_error(client.get("/v1/models", headers=analyst_and_service), 403, "FORBIDDEN")


# -- (c) roles SIRA does not know ------------------------------------------------------------------

def test_unknown_roles_grant_nothing_and_set_no_limit(client, prediction_id):
    # "anonymous" is a name SIRA_RATE_LIMITS knows (100/minute by default, for failed authentication),
    # but no JWT role: it must not lend its limit to a token that lists it. "root" SIRA knows nowhere.
    assert_limited_as_fraud_analyst(client, bearer("dee", roles=["fraud_analyst", "anonymous"]))
    assert_limited_as_fraud_analyst(client, bearer("eve", roles=["fraud_analyst", "root"]))
    # Only unknown roles: authenticated, with no role, so 403 on every protected action (as a token
    # without any role claim).
    for nobody in (bearer("fay", role="root"), bearer("gus", roles=["anonymous", "admin"]), bearer("hal")):
        for response in (client.get(f"/v1/infer/{prediction_id}", headers=nobody),
                         client.post("/v1/infer", json=event(), headers=nobody),
                         client.get("/v1/models", headers=nobody)):
            body = assert_error(response, 403, "FORBIDDEN")
            assert body["details"]["required"]
