"""The decision_shift rollback on a real `sira serve`: a canary that blocks far more than production.

The canary is the demo model itself, published again with a much lower block threshold (0.1
against the demo's 0.332, review from 0.7 times it), so the two sides run the same trees and
differ only in their decisions. Most events sent are ordinary card payments of 1,000 to 9,000 USD,
which the demo model scores between 0.178 and 0.294: production allows or reviews them, the
canary blocks them. One in five is a risky one (new device, foreign IP, failed logins: about
0.9999) that both block, so production's block rate is about 20% rather than none, the canary's
100%. The supervisor's watch (workers/canary_watch.py) must roll the canary back with reason
``decision_shift`` and log both block rates.
"""

from __future__ import annotations

import json
import uuid

import httpx

from tests.e2e.test_canary_routing import PRODUCT, ROLLBACK_ENV, event, rollback_rows, set_canary
from tests.e2e.test_models_api import DEMO_SPEC, publish
from tests.fixtures.metrics import scrape, total
from tests.fixtures.server import bearer
from tests.fixtures.waiting import wait_for

CANARY_THRESHOLD = 0.1
with open(DEMO_SPEC, encoding="utf-8") as spec:
    PRODUCTION_THRESHOLD = json.load(spec)["threshold"]  # the demo model, production after bootstrap: 0.332
DECISION_ENV = {**ROLLBACK_ENV,  # 50 requests a side in a 30 s window; no breaker, no time budget
                # The same trees on both sides: two copies of a 50 us model must not be told apart by
                # timing noise, and latency is judged before decisions.
                "SIRA_CANARY_MAX_LATENCY_RATIO": "1000"}
RISKY_FEATURES = {"hour_of_day": 3, "account_age_days": 1, "is_new_device": 1, "ip_country_mismatch": 1,
                  "failed_logins_24h": 5, "txn_count_24h": 20, "distinct_cards_7d": 5}


def ordinary() -> dict:
    """Scored 0.178 to 0.294 by the demo model: under production's threshold, over the canary's."""
    return event(amount=1000.0 + (uuid.uuid4().int % 800_000) / 100)


def risky() -> dict:
    """Scored about 0.9999: both block it."""
    sent = event()
    sent["payload"]["features"] = dict(RISKY_FEATURES)
    return sent


def test_a_canary_blocking_far_more_than_production_is_rolled_back_for_decision_shift(server_factory, fresh_db):
    assert CANARY_THRESHOLD < 0.178 and 0.294 < PRODUCTION_THRESHOLD
    server = server_factory(workers=2, **DECISION_ENV)
    # the demo model again, but blocking from 0.1 (the last --threshold given is the one taken)
    canary_id = publish(server, "--threshold", str(CANARY_THRESHOLD))
    set_canary(server, canary_id, 50)
    answers: list[tuple[bool, dict]] = []
    with httpx.Client(base_url=server.url, headers=bearer(), timeout=30) as client:
        def send_some() -> bool:
            for index in range(20):
                sent = risky() if index % 5 == 0 else ordinary()
                response = client.post("/v1/infer", json=sent)
                assert response.status_code == 200, response.text
                answers.append((index % 5 == 0, response.json()))
            return bool(rollback_rows(fresh_db))

        wait_for(send_some, "the decision_shift rollback", timeout=120)

    # The payloads do what they were picked for: the canary blocks all, production only the risky ones.
    by_canary = [answer for _, answer in answers if answer["model_role"] == "canary"]
    by_production = [(is_risky, answer) for is_risky, answer in answers if answer["model_role"] == "production"]
    assert len(by_canary) >= 50 and all(answer["decision"] == "block" for answer in by_canary)
    assert all(answer["decision"] == "block" for is_risky, answer in by_production if is_risky)
    assert all(answer["decision"] in ("allow", "review") for is_risky, answer in by_production if not is_risky)
    assert not any(answer.get("fallback") for _, answer in answers)

    (product, rolled_back, reason, figures, triggered_by), = rollback_rows(fresh_db)
    assert (product, rolled_back, reason, triggered_by) == (PRODUCT, canary_id, "decision_shift", "auto")
    canary, production = figures["canary"], figures["production"]
    print(f"\nblock rates at the rollback: canary {canary['block_rate']} of {canary['answered']}, "
          f"production {production['block_rate']} of {production['answered']}")
    assert canary["block_rate"] == 1.0 and canary["decisions"]["block"] == canary["answered"] >= 50
    assert 0 < production["block_rate"] < 0.5 and production["answered"] >= 50
    assert production["block_rate"] == round(production["decisions"]["block"] / production["answered"], 6)
    assert canary["block_rate"] > figures["thresholds"]["max_block_ratio"] * production["block_rate"]
    assert figures["thresholds"]["max_block_ratio"] == 2.0 and figures["thresholds"]["min_block_rate_shift"] == 0.01
    assert canary["errors"] == production["errors"] == 0

    config = httpx.get(f"{server.url}/v1/canary/{PRODUCT}", headers=bearer("ml_ops")).json()
    assert config["canary_percent"] == 0
    latest = config["recent_rollbacks"][0]
    assert (latest["reason"], latest["triggered_by"], latest["canary_model_id"]) == ("decision_shift", "auto",
                                                                                    canary_id)
    assert latest["metrics"]["canary"]["block_rate"] == 1.0
    assert latest["metrics"]["production"]["block_rate"] == production["block_rate"]
    wait_for(lambda: total(scrape(server.url), "sira_canary_rollbacks_total", product=PRODUCT) == 1,
             "the rollback counted")
    assert "rolled back (decision_shift)" in server.log()
