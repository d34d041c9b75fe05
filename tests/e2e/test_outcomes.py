"""Outcomes in, against a real server and Postgres: POST /v1/outcomes, `sira outcomes load`, and
compare_canary_quality computing what one computes by hand from the same rows."""

from __future__ import annotations

import datetime as dt
import uuid

import httpx
import psycopg
import pytest

from tests.e2e.test_infer import event, risky_event
from tests.fixtures.server import TEST_INTERNAL_TOKEN, bearer, run_sira
from tests.fixtures.waiting import wait_for

pytestmark = pytest.mark.timeout(300)


def post(server, body, headers=None, **kwargs) -> httpx.Response:
    headers = bearer("fraud_analyst") if headers is None else headers
    return httpx.post(f"{server.url}/v1/outcomes", json=body, headers=headers,
                      timeout=10, **kwargs)


def score(server, events: list[dict]) -> list[dict]:
    answers = []
    for item in events:
        answer = httpx.post(f"{server.url}/v1/infer", json=item, headers=bearer(), timeout=10)
        assert answer.status_code == 200, answer.text
        answers.append(answer.json())
    dsn = server.env["DATABASE_URL"]
    ids = [answer["prediction_id"] for answer in answers]
    wait_for(lambda: logged(dsn, ids) == len(ids), "the predictions in Postgres")
    return answers


def logged(dsn: str, ids: list[str]) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM siramodel_predictions WHERE prediction_id = ANY(%s::uuid[])",
                            (ids,)).fetchone()[0]


@pytest.fixture
def scored(server_factory):
    server = server_factory()
    events = [event(f"evt-{index}") for index in range(6)] + [risky_event() for _ in range(4)]
    return server, events, score(server, events)


def test_each_item_is_answered_on_its_own_and_the_good_ones_kept(scored):
    server, events, answers = scored
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()
    items = [
        {"prediction_id": answers[0]["prediction_id"], "label": "legit", "source": "analyst"},
        {"product": "fraud_score", "event_id": events[1]["event_id"], "label": "fraud", "source": "chargeback",
         "observed_at": "2026-11-30T09:00:00Z"},
        {"product": "fraud_score", "event_id": events[1]["event_id"], "label": "fraud", "source": "chargeback",
         "observed_at": "2026-11-30T09:00:00Z"},                                      # the same twice
        {"prediction_id": str(uuid.uuid4()), "label": "fraud", "source": "chargeback"},  # never scored
        {"prediction_id": answers[2]["prediction_id"], "label": "maybe", "source": "analyst"},
        {"prediction_id": answers[3]["prediction_id"], "product": "chargeback_risk", "label": "fraud",
         "source": "analyst"},                                                          # another product
        {"prediction_id": answers[4]["prediction_id"], "label": "fraud", "source": "analyst",
         "observed_at": future},
        {"prediction_id": answers[5]["prediction_id"], "label": "fraud", "source": "analyst", "score": 1},
        "not an object",
    ]
    answer = post(server, {"outcomes": items})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    statuses = [result["status"] for result in body["results"]]
    assert statuses == ["kept", "kept", "duplicate", 404, 400, 400, 400, 400, 400]
    assert (body["kept"], body["duplicate"], body["errors"]) == (2, 1, 6)
    refused = body["results"][3:]
    assert all({"error_code", "message", "request_id", "details"} <= set(item) for item in refused)
    assert refused[1]["details"]["field"] == "label" and refused[2]["details"]["field"] == "product"
    with psycopg.connect(server.env["DATABASE_URL"]) as conn:
        rows = conn.execute("SELECT event_id, label, source FROM sira_prediction_outcomes ORDER BY event_id").fetchall()
        assert rows == [(events[0]["event_id"], "legit", "analyst"), (events[1]["event_id"], "fraud", "chargeback")]
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute("UPDATE sira_prediction_outcomes SET label = 'legit'")


@pytest.mark.parametrize("body, status", [
    ({"outcomes": []}, 400),
    ({"outcomes": "fraud"}, 400),
    ({"labels": [{"prediction_id": "x"}]}, 400),
    ({"outcomes": [{"product": "fraud_score", "event_id": "e", "label": "fraud", "source": "a"}] * 1001}, 400),
])
def test_a_wrong_body_is_refused_whole(sira_server, body, status):
    answer = post(sira_server, body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error_code"] == "INVALID_REQUEST"


def test_who_may_post_outcomes(sira_server):
    body = {"outcomes": [{"product": "fraud_score", "event_id": "never", "label": "fraud", "source": "analyst"}]}
    assert post(sira_server, body, bearer("sira_service")).status_code == 200
    assert post(sira_server, body, {"Authorization": f"Bearer {TEST_INTERNAL_TOKEN}"}).status_code == 200
    assert post(sira_server, body, bearer("ml_ops")).status_code == 403
    assert post(sira_server, body, {}).status_code == 401


def test_a_csv_of_outcomes_loads_its_good_rows_and_names_the_bad(scored, tmp_path):
    server, events, answers = scored
    csv_file = tmp_path / "chargebacks.csv"
    csv_file.write_text("product,event_id,label,observed_at\n"
                        f"fraud_score,{events[6]['event_id']},fraud,2026-11-29T00:00:00Z\n"
                        "fraud_score,nobody-scored-this,fraud,\n"
                        f"fraud_score,{events[7]['event_id']},stolen,\n")
    done = run_sira("outcomes", "load", str(csv_file), "--source", "chargeback", env=server.env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 kept, 0 duplicates, 2 refused" in done.stdout
    assert "line 3: 404 NOT_FOUND" in done.stderr and "line 4: 400 INVALID_REQUEST" in done.stderr
    again = run_sira("outcomes", "load", str(csv_file), "--source", "chargeback", env=server.env)
    assert "0 kept, 1 duplicates, 2 refused" in again.stdout
    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("txn,verdict\n1,fraud\n")
    refused = run_sira("outcomes", "load", str(bad_header), env=server.env)
    assert refused.returncode == 2 and "unknown: txn, verdict" in refused.stderr


def test_compare_canary_quality_is_what_the_rows_say(scored):
    server, events, answers = scored
    labels = {0: "legit", 1: "legit", 2: "fraud", 6: "fraud", 7: "legit", 8: "fraud"}
    items = [{"prediction_id": answers[index]["prediction_id"], "label": label, "source": "analyst",
              "observed_at": "2026-12-01T00:00:00Z"} for index, label in labels.items()]
    items.append({"prediction_id": answers[7]["prediction_id"], "label": "fraud", "source": "analyst",
                  "observed_at": dt.datetime.now(dt.UTC).isoformat()})  # a later correction wins
    labels[7] = "fraud"
    assert post(server, {"outcomes": items}).json()["errors"] == 0
    model_id = answers[0]["model_id"]
    decisions = [answer["decision"] for answer in answers]
    judged = [(decisions[index], label) for index, label in labels.items()]
    blocked = [label for decision, label in judged if decision == "block"]
    frauds = sum(1 for _, label in judged if label == "fraud")
    legits = len(judged) - frauds
    with psycopg.connect(server.env["DATABASE_URL"]) as conn:
        (row,) = conn.execute("SELECT model_role, predictions, labelled, fraud, legit, block_precision, block_recall, "
                              "block_fp_rate FROM compare_canary_quality('fraud_score', %s, %s, 1)",
                              (str(uuid.uuid4()), model_id)).fetchall()
    assert row[:5] == ("production", len(answers), len(judged), frauds, legits)
    assert row[5] == (blocked.count("fraud") / len(blocked) if blocked else None)
    assert row[6] == pytest.approx(blocked.count("fraud") / frauds)
    assert row[7] == pytest.approx(blocked.count("legit") / legits)
