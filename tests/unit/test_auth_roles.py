"""Roles a JWT cannot hold, roles SIRA does not know, and which role's rate limit a request spends.

The role table (app/auth/roles.py) matters here: `fraud_analyst` and `sira_service` grant the same two
actions (infer, predictions:read), so mixing them changes nothing; `fraud_analyst` and `ml_ops`
share only predictions:read, which is what makes "the roles that grant the action" observable.
"""

from __future__ import annotations

import time

import falcon
import falcon.asgi
import falcon.testing
import jwt
import pytest

from app.auth.keys import KeyRing
from app.auth.ratelimit import RateLimiter, governing_limit, least_generous
from app.auth.roles import KNOWN_ROLES, PERMISSIONS, granting_roles
from app.auth.tokens import INTERNAL_PRINCIPAL, Authenticator, AuthMiddleware, Principal
from app.errors import ApiError, Forbidden, RateLimitExceeded, Unauthorized
from app.http.assembly import render_error
from conf.ratelimit import RateLimit, parse_rate_limits
from shm.ratelimit import RateLimitTable

SECRET = "unit-secret-0123456789abcdef-0123456789"
INTERNAL = "internal-token-for-unit-tests"
ERROR_FIELDS = {"error_code", "message", "request_id", "timestamp", "details"}
LIMITS = parse_rate_limits("fraud_analyst=5/minute,ml_ops=unlimited,pay_admin=7/minute,anonymous=3/minute")


def token(subject: str = "alice", **role_claims) -> str:
    """An HS256 token with whatever `role` / `roles` claims the test gives (mint_token takes one known role)."""
    now = int(time.time())
    return jwt.encode({"sub": subject, "iat": now, "exp": now + 600, **role_claims}, SECRET, algorithm="HS256")


def header(value: str) -> str:
    return f"Bearer {value}"


@pytest.fixture
def auth() -> Authenticator:
    return Authenticator(KeyRing.from_config(SECRET, "default", {}), INTERNAL)


# -- internal_service belongs to the internal token --------------------------------------------

@pytest.mark.parametrize("role_claims", [
    {"role": "internal_service"},
    {"roles": ["internal_service"]},
    {"roles": ["fraud_analyst", "internal_service"]},
    {"role": "fraud_analyst", "roles": ["internal_service"]},
    {"role": "internal_service", "roles": ["sira_service"]},
    {"roles": ["fraud_analyst", "sira_service", "internal_service"]},
])
def test_a_jwt_claiming_internal_service_is_refused_401(auth, role_claims):
    with pytest.raises(Unauthorized) as caught:
        auth.authenticate(header(token(**role_claims)))
    assert caught.value.status == 401
    assert "internal_service" in caught.value.message
    assert "only the internal service token" in caught.value.message


def test_the_internal_token_still_is_internal_service(auth):
    principal = auth.authenticate(header(INTERNAL))
    assert principal is INTERNAL_PRINCIPAL and principal.internal


def test_a_refused_claim_is_never_cached(auth):
    forged = header(token(roles=["fraud_analyst", "internal_service"]))
    for _ in range(3):
        with pytest.raises(Unauthorized):
            auth.authenticate(forged)
    assert auth.cached_tokens == 0


# -- unknown roles grant nothing -----------------------------------------------------------------

def test_unknown_roles_are_dropped_at_authentication(auth):
    principal = auth.authenticate(header(token(role="root", roles=["fraud_analyst", "anonymous", "INTERNAL_SERVICE"])))
    assert principal.roles == {"fraud_analyst"}


@pytest.mark.parametrize("roles", [["root"], ["anonymous"], ["Fraud_Analyst", "admin"]])
def test_a_token_with_only_unknown_roles_is_forbidden_everywhere(auth, roles):
    principal = auth.authenticate(header(token(roles=roles)))
    assert principal.roles == frozenset()
    for action in PERMISSIONS:
        with pytest.raises(Forbidden):
            auth.authorize(principal, action)


def test_granting_roles_is_the_table_intersected():
    assert granting_roles({"fraud_analyst", "ml_ops"}, "infer") == {"fraud_analyst"}
    assert granting_roles({"fraud_analyst", "ml_ops"}, "predictions:read") == {"fraud_analyst", "ml_ops"}
    assert granting_roles({"fraud_analyst", "root"}, "models:read") == frozenset()
    with pytest.raises(ValueError, match="unknown action"):
        granting_roles({"ml_ops"}, "models:delete")


# -- the limit of the roles that grant the action ------------------------------------------------

def jwt_principal(*roles: str) -> Principal:
    return Principal("alice", frozenset(roles))


@pytest.mark.parametrize(("roles", "action", "expected"), [
    # infer is fraud_analyst's, not ml_ops': ml_ops' unlimited never applies to it
    (("fraud_analyst", "ml_ops"), "infer", ("fraud_analyst", RateLimit(5, 60))),
    (("fraud_analyst", "ml_ops"), "models:read", ("ml_ops", None)),
    (("fraud_analyst", "ml_ops"), "predictions:read", ("ml_ops", None)),  # both grant: most generous
    (("fraud_analyst", "sira_service"), "infer", ("sira_service", None)),  # both grant infer
    (("fraud_analyst", "pay_admin"), "infer", ("fraud_analyst", RateLimit(5, 60))),
    (("fraud_analyst", "pay_admin"), "canary:read", ("pay_admin", RateLimit(7, 60))),
    # nobody grants it (403 follows): the strictest role pays
    (("fraud_analyst", "pay_admin"), "canary:write", ("fraud_analyst", RateLimit(5, 60))),
    (("sira_service", "pay_admin"), "models:write", ("pay_admin", RateLimit(7, 60))),
    # roles SIRA does not know set nothing, even those named like a limit of SIRA_RATE_LIMITS
    (("fraud_analyst", "anonymous"), "infer", ("fraud_analyst", RateLimit(5, 60))),
    (("fraud_analyst", "internal_service"), "infer", ("fraud_analyst", RateLimit(5, 60))),
    (("fraud_analyst", "root"), "infer", ("fraud_analyst", RateLimit(5, 60))),
    (("root",), "infer", ("anonymous", RateLimit(3, 60))),
    ((), "infer", ("anonymous", RateLimit(3, 60))),
])
def test_the_roles_that_grant_the_action_set_its_limit(roles, action, expected):
    assert governing_limit(jwt_principal(*roles), action, LIMITS) == expected


def test_the_internal_principal_keeps_its_own_limit():
    limits = parse_rate_limits("internal_service=9/second")
    assert governing_limit(INTERNAL_PRINCIPAL, "infer", limits) == ("internal_service", RateLimit(9, 1))
    assert governing_limit(INTERNAL_PRINCIPAL, "infer", LIMITS) == ("internal_service", None)


def test_without_an_action_every_known_role_counts():
    assert governing_limit(jwt_principal("fraud_analyst", "ml_ops"), None, LIMITS) == ("ml_ops", None)
    assert governing_limit(jwt_principal("fraud_analyst", "anonymous"), None, LIMITS) == (
        "fraud_analyst", RateLimit(5, 60))


def test_least_generous_is_unlimited_only_when_every_role_is():
    assert least_generous(frozenset({"ml_ops", "sira_service"}), LIMITS) == ("ml_ops", None)
    assert least_generous(frozenset({"ml_ops", "pay_admin"}), LIMITS) == ("pay_admin", RateLimit(7, 60))
    assert least_generous(frozenset(), LIMITS) == ("anonymous", RateLimit(3, 60))


def test_every_known_role_and_action_has_a_limit_picked_from_a_granting_role():
    for role in sorted(KNOWN_ROLES):
        for other in sorted(KNOWN_ROLES):
            for action, allowed in PERMISSIONS.items():
                picked, _ = governing_limit(jwt_principal(role, other), action, LIMITS)
                if allowed & {role, other}:
                    assert picked in allowed, (role, other, action, picked)


# -- through the middleware and the shared table -------------------------------------------------

class Resource:
    def __init__(self, actions: dict[str, str]):
        self.auth_actions = actions

    async def on_get(self, req, resp, **params):
        resp.media = {"subject": req.context.principal.subject}

    on_post = on_get


@pytest.fixture
def client(auth, tmp_path):
    with RateLimitTable.create("sira-test-roles", capacity=1024, directory=str(tmp_path)) as table:
        limiter = RateLimiter(table, LIMITS, clock=lambda: 1_000_000_000_000)
        app = falcon.asgi.App(middleware=[AuthMiddleware(auth, limiter)])
        for exc_type in (Exception, falcon.HTTPError, ApiError):
            app.add_error_handler(exc_type, render_error)
        app.add_route("/v1/infer", Resource({"POST": "infer"}))
        app.add_route("/v1/infer/{prediction_id}", Resource({"GET": "predictions:read"}))
        app.add_route("/v1/models", Resource({"GET": "models:read"}))
        yield falcon.testing.TestClient(app)


def codes(client, method: str, path: str, value: str, count: int) -> list[int]:
    headers = {"Authorization": header(value)}
    return [client.simulate_request(method, path, headers=headers).status_code for _ in range(count)]


def test_a_forged_internal_service_claim_is_401_in_the_error_schema(client):
    result = client.simulate_post("/v1/infer", headers={
        "Authorization": header(token(roles=["fraud_analyst", "internal_service"]))})
    assert result.status_code == 401
    assert set(result.json) == ERROR_FIELDS
    assert result.json["error_code"] == "UNAUTHORIZED"
    assert "internal_service" in result.json["message"]


def test_an_unlimited_extra_role_lends_nothing_to_an_action_it_cannot_do(client):
    both = token("bea", roles=["fraud_analyst", "ml_ops"])
    assert codes(client, "POST", "/v1/infer", both, 6) == [200] * 5 + [429]
    assert codes(client, "GET", "/v1/models", both, 30) == [200] * 30  # ml_ops' action: unlimited
    assert codes(client, "GET", "/v1/infer/p-1", both, 30) == [200] * 30  # both grant it: the most generous


def test_an_unknown_role_changes_nothing(client):
    assert codes(client, "POST", "/v1/infer", token("cy", roles=["fraud_analyst", "anonymous", "root"]), 6) == (
        [200] * 5 + [429])
    result = client.simulate_post("/v1/infer", headers={"Authorization": header(token("cy", roles=["root"]))})
    assert result.status_code == 403 and result.json["error_code"] == "FORBIDDEN"


def test_a_429_names_the_role_that_grants_the_action(client):
    value = token("dee", roles=["fraud_analyst", "ml_ops"])
    assert codes(client, "POST", "/v1/infer", value, 5) == [200] * 5
    result = client.simulate_post("/v1/infer", headers={"Authorization": header(value)})
    assert result.status_code == 429
    assert result.json["details"]["role"] == "fraud_analyst" and result.json["details"]["limit"] == "5/minute"


def test_rate_limit_exceeded_is_raised_for_the_granting_role_only(tmp_path):
    with RateLimitTable.create("sira-test-roles-2", capacity=64, directory=str(tmp_path)) as table:
        limiter = RateLimiter(table, LIMITS, clock=lambda: 1_000_000_000_000)
        principal = jwt_principal("fraud_analyst", "ml_ops")
        for _ in range(5):
            limiter.admit(principal, "infer")
        with pytest.raises(RateLimitExceeded):
            limiter.admit(principal, "infer")
        for _ in range(50):
            limiter.admit(principal, "models:read")
