"""The fp_rate_threshold rollback on a real `sira serve`: a canary judged by the outcomes posted for it.

The canary is the demo model with a block threshold of 0.1 (production's is 0.332): ordinary card
payments, scored 0.178 to 0.294, are blocked by the canary and allowed or reviewed by production.
The window rules are kept out (their minimum of requests is out of reach), so only the outcomes
can condemn it: every event turns out legit, every canary block is a false positive. Until each
side has SIRA_CANARY_MIN_LABELLED labelled predictions nothing happens; then the supervisor rolls
the canary back with reason fp_rate_threshold and the rates one computes by hand from the rows.
"""

from __future__ import annotations

import time

import httpx
import psycopg

from tests.e2e.test_canary_decision_shift import CANARY_THRESHOLD, ordinary
from tests.e2e.test_canary_routing import PRODUCT, ROLLBACK_ENV, rollback_rows, set_canary
from tests.e2e.test_models_api import publish
from tests.fixtures.server import bearer
from tests.fixtures.waiting import wait_for

MIN_LABELLED = 10
FP_ENV = {**ROLLBACK_ENV, "SIRA_CANARY_MIN_REQUESTS": "100000000",  # no window rule: only the outcomes judge
          "SIRA_METRICS_WINDOW_S": "1", "SIRA_CANARY_MIN_LABELLED": str(MIN_LABELLED)}


def label_legit(server, answers: list[dict]) -> dict:
    items = [{"prediction_id": answer["prediction_id"], "label": "legit", "source": "analyst"} for answer in answers]
    response = httpx.post(f"{server.url}/v1/outcomes", json={"outcomes": items}, headers=bearer("fraud_analyst"),
                          timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def logged(dsn: str, answers: list[dict]) -> bool:
    with psycopg.connect(dsn) as conn:
        ids = [answer["prediction_id"] for answer in answers]
        return conn.execute("SELECT count(*) FROM siramodel_predictions WHERE prediction_id = ANY(%s::uuid[])",
                            (ids,)).fetchone()[0] == len(ids)


def test_a_canary_whose_blocks_turn_out_legit_is_rolled_back_for_fp_rate(server_factory, fresh_db):
    server = server_factory(workers=2, **FP_ENV)
    canary_id = publish(server, "--threshold", str(CANARY_THRESHOLD))
    set_canary(server, canary_id, 50)
    answers: list[dict] = []
    by_role: dict[str, list[dict]] = {}
    with httpx.Client(base_url=server.url, headers=bearer(), timeout=30) as client:
        def enough_of_both() -> bool:  # the canary serves once every worker has synced it
            answers.extend(client.post("/v1/infer", json=ordinary()).json() for _ in range(20))
            by_role.update({role: [answer for answer in answers if answer["model_role"] == role]
                            for role in ("canary", "production")})
            return min(len(by_role["canary"]), len(by_role["production"])) >= 2 * MIN_LABELLED

        wait_for(enough_of_both, "events on both sides", timeout=60)
    assert all(answer["decision"] == "block" for answer in by_role["canary"])
    assert all(answer["decision"] in ("allow", "review") for answer in by_role["production"])
    wait_for(lambda: logged(server.env["DATABASE_URL"], answers), "the predictions in Postgres")

    # Too few labels on production's side: not judged yet, however bad the canary's look.
    assert label_legit(server, by_role["canary"] + by_role["production"][:MIN_LABELLED - 1])["kept"] > 0
    time.sleep(3)  # three metrics windows
    assert rollback_rows(fresh_db) == []

    assert label_legit(server, by_role["production"][MIN_LABELLED - 1:])["errors"] == 0
    wait_for(lambda: rollback_rows(fresh_db), "the fp_rate_threshold rollback", timeout=30)
    (product, rolled_back, reason, figures, triggered_by), = rollback_rows(fresh_db)
    assert (product, rolled_back, reason, triggered_by) == (PRODUCT, canary_id, "fp_rate_threshold", "auto")
    canary, production = figures["canary"], figures["production"]
    # by hand: every canary prediction was a block of a legit event, no production one was
    assert (canary["labelled"], canary["legit"], canary["block_fp_rate"]) == (len(by_role["canary"]),) * 2 + (1.0,)
    assert (production["labelled"], production["block_fp_rate"]) == (len(by_role["production"]), 0.0)
    assert figures["thresholds"]["min_labelled"] == MIN_LABELLED
    config = httpx.get(f"{server.url}/v1/canary/{PRODUCT}", headers=bearer("ml_ops")).json()
    assert config["canary_percent"] == 0 and config["recent_rollbacks"][0]["reason"] == "fp_rate_threshold"
    assert "rolled back (fp_rate_threshold)" in server.log()
