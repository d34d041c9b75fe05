"""RateLimiter and AuthMiddleware in one process: which bucket a request spends, and the 429 it gets."""

from __future__ import annotations

import errno

import falcon
import falcon.asgi
import falcon.testing
import pytest

from app.auth.keys import KeyRing, mint_token
from app.auth.ratelimit import RateLimiter, most_generous, retry_after_s
from app.auth.tokens import INTERNAL_PRINCIPAL, Authenticator, AuthMiddleware, Principal
from app.errors import ApiError, RateLimitExceeded
from app.http.assembly import render_error
from conf.ratelimit import RateLimit, parse_rate_limits
from shm.ratelimit import RateLimitTable

S = 1_000_000_000
SECRET = "unit-secret-0123456789abcdef-0123456789"
INTERNAL = "internal-token-for-unit-tests"


class Clock:
    """A frozen monotonic clock that tests move by hand."""

    def __init__(self):
        self.now = 1_000 * S

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def table(tmp_path):
    with RateLimitTable.create("sira-test-rl", capacity=1024, directory=str(tmp_path)) as rate_table:
        yield rate_table


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def refusals():
    return []


@pytest.fixture
def limiter(table, clock, refusals):
    limits = parse_rate_limits("fraud_analyst=5/minute,ml_ops=2/second,anonymous=3/minute")
    return RateLimiter(table, limits, on_refusal=refusals.append, clock=clock)


def analyst(subject: str = "alice") -> Principal:
    return Principal(subject, frozenset({"fraud_analyst"}))


def admitted(limiter: RateLimiter, principal: Principal, attempts: int) -> int:
    count = 0
    for _ in range(attempts):
        try:
            limiter.admit(principal)
            count += 1
        except RateLimitExceeded:
            pass
    return count


@pytest.mark.parametrize("wait_ns, seconds", [(1, 1), (S, 1), (S + 1, 2), (12 * S, 12), (59 * S + 7, 60)])
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(wait_ns, seconds):
    assert retry_after_s(wait_ns) == seconds


def test_the_most_generous_known_role_governs():
    limits = parse_rate_limits("fraud_analyst=5/minute,ml_ops=2/second,pay_admin=200/minute")
    assert most_generous(frozenset({"fraud_analyst", "ml_ops"}), limits) == ("ml_ops", RateLimit(2, 1))
    assert most_generous(frozenset({"fraud_analyst", "pay_admin"}), limits) == ("pay_admin", RateLimit(200, 60))
    assert most_generous(frozenset({"fraud_analyst", "sira_service"}), limits) == ("sira_service", None)
    assert most_generous(frozenset({"fraud_analyst", "root"}), limits) == ("fraud_analyst", RateLimit(5, 60))
    assert most_generous(frozenset({"root"}), limits) == ("anonymous", RateLimit(100, 60))
    assert most_generous(frozenset(), limits) == ("anonymous", RateLimit(100, 60))


def test_over_the_limit_is_429_with_retry_after_and_the_role(limiter, clock, refusals):
    assert admitted(limiter, analyst(), 5) == 5
    with pytest.raises(RateLimitExceeded) as caught:
        limiter.admit(analyst())
    error = caught.value
    assert (error.status, error.code) == (429, "RATE_LIMIT_EXCEEDED")
    assert error.headers == {"Retry-After": "12"}
    assert error.details == {"role": "fraud_analyst", "limit": "5/minute", "retry_after_s": 12}
    assert refusals == ["fraud_analyst"] and limiter.refusals == 1
    clock.now += 12 * S
    assert admitted(limiter, analyst(), 3) == 1


def test_subjects_and_roles_have_buckets_of_their_own(limiter):
    assert admitted(limiter, analyst("alice"), 9) == 5
    assert admitted(limiter, analyst("bob"), 9) == 5
    assert admitted(limiter, Principal("alice", frozenset({"ml_ops"})), 9) == 2


def test_unlimited_roles_never_touch_the_table(limiter, table):
    for _ in range(1000):
        limiter.admit(Principal("svc", frozenset({"sira_service"})))
        limiter.admit(INTERNAL_PRINCIPAL)
    assert table.live_keys() == 0


def test_failed_authentication_spends_the_client_address_bucket(limiter, refusals):
    for _ in range(3):
        limiter.admit_failed_authentication("10.0.0.1")
    with pytest.raises(RateLimitExceeded):
        limiter.admit_failed_authentication("10.0.0.1")
    limiter.admit_failed_authentication("10.0.0.2")
    limiter.admit_failed_authentication(None)
    assert refusals == ["anonymous"]


def test_failed_authentication_is_free_when_anonymous_is_unlimited(table, clock):
    limiter = RateLimiter(table, parse_rate_limits("anonymous=unlimited"), clock=clock)
    for _ in range(500):
        limiter.admit_failed_authentication("10.0.0.1")
    assert table.live_keys(clock.now) == 0


class LockFailingTable:
    """A table whose lock the kernel refuses (ENOLCK): the request must be admitted anyway."""

    class segment:
        name = "sira-test-broken"

    def acquire(self, *args):
        raise OSError(errno.ENOLCK, "No locks available")


def test_a_table_that_cannot_be_locked_admits_and_counts(clock, caplog):
    limiter = RateLimiter(LockFailingTable(), parse_rate_limits("fraud_analyst=1/hour"), clock=clock)
    assert admitted(limiter, analyst(), 10) == 10
    assert limiter.lock_failures == 10
    assert sum("could not be locked" in record.message for record in caplog.records) == 1


# -- through the middleware, as a worker answers --------------------------------------------------

class Protected:
    auth_actions = {"POST": "infer"}

    async def on_post(self, req, resp):
        resp.media = {"subject": req.context.principal.subject}


class Public:
    async def on_get(self, req, resp):
        resp.media = {"status": "ok"}


@pytest.fixture
def client(limiter):
    authenticator = Authenticator(KeyRing.from_config(SECRET, "default", {}), INTERNAL)
    app = falcon.asgi.App(middleware=[AuthMiddleware(authenticator, limiter)])
    for exc_type in (Exception, falcon.HTTPError, ApiError):
        app.add_error_handler(exc_type, render_error)
    app.add_route("/v1/infer", Protected())
    app.add_route("/healthz", Public())
    return falcon.testing.TestClient(app)


def bearer(role: str, subject: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + mint_token(role=role, subject=subject, ttl_s=600, secret=SECRET)}


def test_the_sixth_request_gets_429_in_the_error_schema(client):
    headers = bearer("fraud_analyst", "alice")
    assert [client.simulate_post("/v1/infer", headers=headers).status_code for _ in range(5)] == [200] * 5
    result = client.simulate_post("/v1/infer", headers=headers)
    assert result.status_code == 429
    assert result.headers["Retry-After"] == "12"
    body = result.json
    assert set(body) == {"error_code", "message", "request_id", "timestamp", "details"}
    assert body["error_code"] == "RATE_LIMIT_EXCEEDED"
    assert client.simulate_post("/v1/infer", headers=bearer("fraud_analyst", "bob")).status_code == 200


def test_internal_callers_are_not_limited_by_default(client):
    internal = {"Authorization": f"Bearer {INTERNAL}"}
    service = bearer("sira_service", "svc")
    for _ in range(50):
        assert client.simulate_post("/v1/infer", headers=internal).status_code == 200
        assert client.simulate_post("/v1/infer", headers=service).status_code == 200


def test_failed_authentication_turns_from_401_to_429_per_address(client):
    codes = [client.simulate_post("/v1/infer", headers={"Authorization": "Bearer nonsense"}).status_code
             for _ in range(5)]
    assert codes == [401, 401, 401, 429, 429]
    assert client.simulate_post("/v1/infer", headers=bearer("fraud_analyst", "carol")).status_code == 200


def test_a_forbidden_request_is_spent_too(client):
    headers = bearer("pay_admin", "dana")  # pay_admin may not infer: 403, after spending
    codes = [client.simulate_post("/v1/infer", headers=headers).status_code for _ in range(101)]
    assert codes == [403] * 100 + [429]


def test_public_endpoints_are_never_limited(client):
    assert all(client.simulate_get("/healthz").status_code == 200 for _ in range(300))
