"""A batch whose prediction log gives out half-way, on a real `sira serve` and Postgres.

One worker with a 64 KiB ring, the writer frozen (SIGSTOP) so the ring fills, and the overflow
folder replaced by a regular file so the spill fails too (tests run as root: a chmod would not
stop the worker's writes). The batch is still 200: the events the ring kept have their scores,
each one after it a 503 entry of its own, and Postgres ends up holding exactly the scored ids.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import httpx
import psycopg

from tests.e2e.test_prediction_log import event, frozen, logged_ids, writer_pid
from tests.fixtures.server import bearer
from tests.fixtures.waiting import wait_for

ERROR_FIELDS = {"error_code", "message", "request_id", "timestamp", "details"}
BATCH = 250  # far more records than a 64 KiB ring holds


def distinct_events(count: int) -> list[dict]:
    """Small events (no explanation) whose amounts differ, so that each has its own cache entry."""
    return [event(amount=10.0 + index, explain=False) for index in range(count)]


@contextlib.contextmanager
def overflow_folder_blocked(data_dir: str):
    """For the block, ``<data_dir>/spool/overflow`` is a regular file: opening a file in it raises OSError.

    The folder comes back empty afterwards, before the writer runs again or the server stops.
    """
    overflow = os.path.join(data_dir, "spool", "overflow")
    if os.path.isdir(overflow):
        shutil.rmtree(overflow)
    os.makedirs(os.path.dirname(overflow), exist_ok=True)
    with open(overflow, "wb"):
        pass
    try:
        yield
    finally:
        os.remove(overflow)
        os.makedirs(overflow)


def split_results(results: list[dict]) -> tuple[dict[int, str], list[int]]:
    """(index -> prediction_id of the scored entries, indexes of the 503 entries); any other entry fails."""
    scored, refused = {}, []
    for index, entry in enumerate(results):
        if "prediction_id" in entry:
            assert "error_code" not in entry and 0.0 <= entry["score"] <= 1.0, entry
            scored[index] = entry["prediction_id"]
        else:
            assert set(entry) == ERROR_FIELDS, entry
            assert entry["error_code"] == "SERVICE_UNAVAILABLE", entry
            assert entry["details"]["index"] == index and "score" not in entry, entry
            refused.append(index)
    return scored, refused


def test_a_batch_the_log_cannot_keep_whole_answers_503_per_event_and_logs_every_score(server_factory, fresh_db):
    server = server_factory(workers=1, SIRA_QUEUE_RING_BYTES="65536")
    writer = wait_for(lambda: writer_pid(server), "the writer")
    events = distinct_events(BATCH)
    with httpx.Client(base_url=server.url, headers=bearer(), timeout=30) as client:
        with frozen(writer):
            with overflow_folder_blocked(server.data_dir):
                response = client.post("/v1/infer/batch", json={"events": events})
                single = client.post("/v1/infer", json=event(amount=9999.0, explain=False))
            assert logged_ids(fresh_db) == []  # nothing reached Postgres while the writer was frozen
        assert response.status_code == 200, response.text
        scored, refused = split_results(response.json()["results"])
        assert scored and refused, (len(scored), len(refused))
        assert single.status_code == 503, single.text
        assert set(single.json()) == ERROR_FIELDS and single.json()["error_code"] == "SERVICE_UNAVAILABLE"
        assert single.headers["Retry-After"] == "1"

        wait_for(lambda: len(logged_ids(fresh_db)) >= len(scored), "the writer to take the ring")
        assert set(logged_ids(fresh_db)) == set(scored.values())

        again = client.post("/v1/infer/batch", json={"events": events})
        assert again.status_code == 200, again.text
        repeated, none_refused = split_results(again.json()["results"])
        assert not none_refused and len(repeated) == BATCH
        cached = [index for index, entry in enumerate(again.json()["results"]) if entry["cached"]]
        assert cached == sorted(scored)  # a refused event's score was never kept for later requests
    expected = set(scored.values()) | set(repeated.values())
    wait_for(lambda: len(logged_ids(fresh_db)) >= len(expected), "the writer to take the second batch")
    assert set(logged_ids(fresh_db)) == expected
    assert "the overflow file failed" in server.log()


def test_the_events_of_a_batch_keep_their_event_ids_in_the_log(server_factory, fresh_db):
    """A refused event may be sent again: its retry is logged under its own event id, once."""
    server = server_factory(workers=1, SIRA_QUEUE_RING_BYTES="65536")
    writer = wait_for(lambda: writer_pid(server), "the writer")
    events = distinct_events(BATCH)
    with httpx.Client(base_url=server.url, headers=bearer(), timeout=30) as client:
        with frozen(writer), overflow_folder_blocked(server.data_dir):
            first = client.post("/v1/infer/batch", json={"events": events})
        assert first.status_code == 200, first.text
        scored, refused = split_results(first.json()["results"])
        assert scored and refused, (len(scored), len(refused))
        retry = client.post("/v1/infer/batch", json={"events": [events[index] for index in refused]})
        retried, none_refused = split_results(retry.json()["results"])
        assert not none_refused
    rows = wait_for(lambda: event_ids_by_prediction(fresh_db, len(scored) + len(retried)), "both batches in Postgres")
    assert sorted(rows.values()) == sorted(entry["event_id"] for entry in events)
    assert set(rows) == set(scored.values()) | set(retried.values())


def event_ids_by_prediction(dsn: str, expected: int) -> dict[str, str] | None:
    """prediction_id -> event_id of every logged row, once there are ``expected`` of them."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT prediction_id::text, event_id FROM siramodel_predictions").fetchall()
    return dict(rows) if len(rows) >= expected else None

