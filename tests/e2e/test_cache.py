"""The shared prediction cache on a real two-worker `sira serve`: one segment, hits across workers."""

from __future__ import annotations

import copy
import os
import random
import time
import uuid

import httpx
import pytest

from tests.fixtures.server import SiraServer, bearer, module_server

ENOUGH_FOR_BOTH_WORKERS = 200


def event(**payload_overrides) -> dict:
    """A payment never sent before (a random amount), with a fresh event id."""
    payload = {
        "amount": round(random.uniform(10.0, 9000.0), 2), "currency": "USD", "country": "US",
        "payment_method": "card",
        "features": {"hour_of_day": 14, "account_age_days": 700, "txn_count_24h": 2, "amount_avg_30d": 120.0},
    }
    payload.update(payload_overrides)
    return {"event_id": str(uuid.uuid4()), "product": "fraud_score", "payload": payload}


def with_options(request: dict, **options) -> dict:
    return {**request, "event_id": str(uuid.uuid4()), "options": options}


def cache_segments(server: SiraServer) -> list[str]:
    """The cache segments of this server's master (sira-<data dir key>_<pid>_<random>-cache)."""
    return sorted(f"/dev/shm/{name}" for name in server.segments(server.master_pid) if name.endswith("-cache"))


def post_fresh(server: SiraServer, request: dict) -> tuple[dict, int]:
    """POST over a new connection, then ask the same connection which worker answered."""
    with httpx.Client(base_url=server.url, headers=bearer("sira_service"), timeout=10) as fresh:
        response = fresh.post("/v1/infer", json=request)
        assert response.status_code == 200, response.text
        return response.json(), fresh.get("/readyz").json()["worker_pid"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, pg_url):
    """One two-worker server with the default cache for the module."""
    with module_server(tmp_path_factory, pg_url, "cache") as sira:
        yield sira


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=bearer("sira_service"), timeout=10) as http:
        yield http


def infer(client: httpx.Client, request: dict) -> dict:
    response = client.post("/v1/infer", json=request)
    assert response.status_code == 200, response.text
    return response.json()


def test_same_event_over_fresh_connections_misses_once_and_hits_on_every_worker(server):
    request = event()
    answers = []  # (body, worker pid) in order
    while len(answers) < 20 or (len({pid for _, pid in answers}) < 2 and len(answers) < ENOUGH_FOR_BOTH_WORKERS):
        answers.append(post_fresh(server, {**request, "event_id": str(uuid.uuid4())}))
    cached = [body["cached"] for body, _ in answers]
    assert cached == [False] + [True] * (len(answers) - 1)
    workers = {pid for _, pid in answers}
    assert len(workers) == 2, "fresh connections should have reached both workers"
    computed_by = answers[0][1]
    assert any(pid != computed_by for _, pid in answers[1:]), "the other worker hit the first one's entry"
    first = answers[0][0]
    for body, _ in answers[1:]:
        assert (body["score"], body["decision"], body["explain_summary"], body["model_id"], body["model_role"]) \
            == (first["score"], first["decision"], first["explain_summary"], first["model_id"], first["model_role"])
        assert body["latency_ms"] >= 0
    assert len({body["prediction_id"] for body, _ in answers}) == len(answers), "every answer has its own id"


def lower_currency(payload: dict) -> None:
    payload["currency"] = payload["currency"].lower()


def upper_payment_method(payload: dict) -> None:
    payload["payment_method"] = payload["payment_method"].upper()


def spell_out_a_default(payload: dict) -> None:
    payload["features"]["is_weekend"] = 0  # the spec's default for an omitted is_weekend


@pytest.mark.parametrize("rewrite", [lower_currency, upper_payment_method, spell_out_a_default])
def test_payloads_with_the_same_features_share_an_entry(client, rewrite):
    first = event()
    second = copy.deepcopy(first)
    second["event_id"] = str(uuid.uuid4())
    rewrite(second["payload"])
    assert second["payload"] != first["payload"]
    miss, hit = infer(client, first), infer(client, second)
    assert (miss["cached"], hit["cached"]) == (False, True)
    assert hit["score"] == miss["score"] and hit["explain_summary"] == miss["explain_summary"]


def test_a_different_feature_is_a_different_entry(client):
    request = event()
    assert infer(client, request)["cached"] is False
    changed = event(**{**request["payload"], "amount": request["payload"]["amount"] + 1.0})
    assert infer(client, changed)["cached"] is False


def test_enable_cache_false_neither_reads_nor_stores(client):
    request = event()
    bypass = [infer(client, with_options(request, enable_cache=False)) for _ in range(3)]
    assert [body["cached"] for body in bypass] == [False] * 3
    assert infer(client, request)["cached"] is False, "a bypassed request stored nothing"
    assert infer(client, with_options(request, enable_cache=False))["cached"] is False, "nor reads a stored one"
    assert infer(client, request)["cached"] is True


def test_an_entry_without_explanation_never_answers_a_request_for_one(client):
    request = event(amount=4800.0, payment_method="crypto", country="NG")
    short = infer(client, with_options(request, include_explanation=False))
    assert short["cached"] is False and short["explain_summary"] == []
    assert infer(client, with_options(request, include_explanation=False))["cached"] is True
    full = infer(client, with_options(request, include_explanation=True))
    assert full["cached"] is False and full["explain_summary"]
    again = infer(client, with_options(request, include_explanation=True))
    assert again["cached"] is True and again["explain_summary"] == full["explain_summary"]
    short_again = infer(client, with_options(request, include_explanation=False))
    assert short_again["cached"] is True and short_again["explain_summary"] == []
    assert short_again["score"] == full["score"]


def test_batch_items_use_the_cache_one_by_one(client):
    known, fresh, bypass = event(), event(), event()
    single = infer(client, known)
    events = [with_options(known), fresh, with_options(bypass, enable_cache=False), known]
    response = client.post("/v1/infer/batch", json={"events": events})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["cached"] for r in results] == [True, False, False, True]
    assert results[0]["score"] == single["score"] and results[0]["explain_summary"] == single["explain_summary"]
    assert len({r["prediction_id"] for r in results}) == 4
    assert infer(client, fresh)["cached"] is True, "a batch miss was stored"
    assert infer(client, bypass)["cached"] is False, "a bypassed batch item was not"


def test_the_master_creates_one_cache_segment_and_removes_it_at_exit(server_factory):
    server = server_factory(workers=2, CACHE_MAX_ITEMS="1000")
    segments = cache_segments(server)
    assert len(segments) == 1
    assert server.stop() == 0
    assert not any(os.path.exists(path) for path in segments)


def test_cache_max_items_zero_turns_the_cache_off(server_factory):
    server = server_factory(workers=2, CACHE_MAX_ITEMS="0")
    assert cache_segments(server) == []
    request = event()
    with httpx.Client(base_url=server.url, headers=bearer("sira_service"), timeout=10) as client:
        assert [infer(client, request)["cached"] for _ in range(5)] == [False] * 5
    assert [post_fresh(server, request)[0]["cached"] for _ in range(5)] == [False] * 5


def test_an_entry_expires_after_its_ttl(server_factory):
    server = server_factory(workers=2, CACHE_TTL_MS="1000")
    request = event()
    with httpx.Client(base_url=server.url, headers=bearer("sira_service"), timeout=10) as client:
        assert infer(client, request)["cached"] is False
        assert infer(client, request)["cached"] is True
        time.sleep(1.5)
        assert infer(client, request)["cached"] is False, "the expired entry was a miss"
        assert infer(client, request)["cached"] is True, "and the fresh answer was stored again"
