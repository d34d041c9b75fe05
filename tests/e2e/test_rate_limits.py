"""Rate limits on a real two-worker `sira serve`: one shared count, the same 429 from every worker.

The limits are per hour (fraud_analyst=5/hour, anonymous=3/hour) so that no token comes back while
a test runs, however slow the machine: the tests count requests, they never time them. Each request
goes over a fresh connection, followed on that same connection by GET /readyz, which names the
worker that answered; the tests go on until both workers have refused some.
"""

from __future__ import annotations

import os
import random
import uuid

import httpx
import pytest

from tests.fixtures.metrics import scrape, total
from tests.fixtures.server import TEST_INTERNAL_TOKEN, bearer, module_server

LIMITS = "fraud_analyst=5/hour,anonymous=3/hour"
MAX_ROUNDS = 400  # fresh connections tried before giving up on reaching both workers
ERROR_FIELDS = {"error_code", "message", "request_id", "timestamp", "details"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, pg_url):
    with module_server(tmp_path_factory, pg_url, "ratelimit", workers=2, SIRA_RATE_LIMITS=LIMITS) as sira:
        sira.wait_until_workers_are_ready()
        yield sira



def event() -> dict:
    payload = {"amount": round(random.uniform(10.0, 9000.0), 2), "currency": "USD", "country": "US",
               "payment_method": "card", "features": {"hour_of_day": 14}}
    return {"event_id": str(uuid.uuid4()), "product": "fraud_score", "payload": payload}


def infer_over_a_fresh_connection(server, headers: dict[str, str]) -> tuple[httpx.Response, int]:
    """One POST /v1/infer on a new connection, and the pid of the worker that holds that connection."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        response = client.post("/v1/infer", json=event(), headers=headers)
        worker = client.get("/readyz").json()["worker_pid"]
    return response, worker


def refusals_until_both_workers_refused(server, headers: dict[str, str]) -> tuple[list[httpx.Response], set[int]]:
    """Refused requests over fresh connections until both workers have refused at least once."""
    refused, workers = [], set()
    for _ in range(MAX_ROUNDS):
        response, worker = infer_over_a_fresh_connection(server, headers)
        assert response.status_code == 429, (response.status_code, response.text)
        refused.append(response)
        workers.add(worker)
        if len(workers) == 2:
            return refused, workers
    pytest.fail(f"{MAX_ROUNDS} fresh connections all reached the same worker {workers}")


def assert_rate_limit_error(response: httpx.Response, role: str, limit: str) -> None:
    assert response.status_code == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 3600
    body = response.json()
    assert set(body) == ERROR_FIELDS
    assert body["error_code"] == "RATE_LIMIT_EXCEEDED"
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert body["details"]["role"] == role and body["details"]["limit"] == limit


def test_over_the_limit_every_worker_answers_429_and_the_count_is_shared(server):
    before = total(scrape(server.url), "sira_rate_limited_total", role="fraud_analyst")
    alice = bearer("fraud_analyst", subject="alice")
    admitted = [infer_over_a_fresh_connection(server, alice) for _ in range(5)]
    assert [response.status_code for response, _ in admitted] == [200] * 5
    refused, workers = refusals_until_both_workers_refused(server, alice)
    # Each worker refused alice: with a count of its own, each would first have admitted 5 (10 in all).
    assert len(workers) == 2
    for response in refused:
        assert_rate_limit_error(response, "fraud_analyst", "5/hour")
    after = total(scrape(server.url), "sira_rate_limited_total", role="fraud_analyst")
    assert after - before == len(refused)


def test_another_subject_of_the_same_role_has_its_own_bucket(server):
    bob = bearer("fraud_analyst", subject="bob")
    responses = [infer_over_a_fresh_connection(server, bob)[0] for _ in range(6)]
    assert [response.status_code for response in responses] == [200] * 5 + [429]


def test_internal_callers_are_unlimited(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for headers in (bearer("sira_service", subject="alice"), {"Authorization": f"Bearer {TEST_INTERNAL_TOKEN}"}):
            codes = {client.post("/v1/infer", json=event(), headers=headers).status_code for _ in range(120)}
            assert codes == {200}


def test_failed_authentication_is_limited_per_client_address_but_valid_tokens_are_not(server):
    bad = {"Authorization": "Bearer not-a-token"}
    codes = [infer_over_a_fresh_connection(server, bad)[0].status_code for _ in range(3)]
    assert codes == [401, 401, 401]
    refused, workers = refusals_until_both_workers_refused(server, bad)
    assert len(workers) == 2
    for response in refused:
        assert_rate_limit_error(response, "anonymous", "3/hour")
    response, _ = infer_over_a_fresh_connection(server, bearer("fraud_analyst", subject="carol"))
    assert response.status_code == 200  # the same address, authenticated: only failures were charged


def test_public_endpoints_are_not_limited(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert {client.get("/healthz").status_code for _ in range(50)} == {200}


def test_every_limited_role_has_its_counter_from_the_start(server):
    samples = scrape(server.url)
    roles = {dict(labels)["role"] for name, labels in samples if name == "sira_rate_limited_total"}
    assert roles == {"anonymous", "fraud_analyst", "ml_ops", "pay_admin"}


def test_stopping_removes_the_rate_limit_segment(server):
    own = server.segments(server.master_pid)
    assert [name for name in own if name.endswith("-ratelimit")], own
    assert server.stop() == 0
    assert not [name for name in os.listdir("/dev/shm") if name in own]
