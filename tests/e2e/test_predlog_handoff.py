"""A pod goes away while Postgres is away: its spool outlives it in the bucket.

The pod's data dir is deleted with it (an emptyDir). The writer's stop hands the spool and the
overflow files to MODEL_BUCKET; another instance, on a fresh data dir and the same bucket, replays
them once Postgres answers: every answered prediction in Postgres exactly once, the prefix empty.
"""

from __future__ import annotations

import shutil

import pytest

from tests.e2e.test_predlog_recovery import logged, new_server, score
from tests.fixtures.metrics import scrape, total
from tests.fixtures.waiting import wait_for

pytestmark = pytest.mark.timeout(600)

PREFIX = "prediction-spool/"


def handed_off(bucket) -> list[str]:
    return [key for key in bucket.keys() if key.startswith(PREFIX)]


def test_a_pod_stopped_with_postgres_away_hands_its_spool_to_the_bucket(tmp_path, own_postgres, s3_bucket):
    first_dir = str(tmp_path / "pod-1")
    first = new_server(first_dir, own_postgres.url, SIRA_QUEUE_RING_BYTES="65536", **s3_bucket.sira_env())
    first.start(timeout=90)
    own_postgres.close()
    answered = score(first, 1500)
    wait_for(lambda: total(scrape(first.url), "sira_prediction_rows_spooled_total") > 0, "spooling")
    assert first.stop() == 0
    keys = handed_off(s3_bucket)
    assert keys and all(key.split("/")[2] in ("batches", "overflow") for key in keys), keys
    assert "handed to" in first.log()
    print(f"pod stop: {len(answered)} answered, {len(keys)} objects handed to the bucket")
    shutil.rmtree(first_dir)  # the pod and its emptyDir are gone

    own_postgres.open()
    second = new_server(str(tmp_path / "pod-2"), own_postgres.url, **s3_bucket.sira_env()).start(timeout=90)
    try:
        wait_for(lambda: logged(own_postgres.url)[1] == set(answered), "the handed-off spool replayed", 120)
        assert logged(own_postgres.url)[0] == len(answered)
        wait_for(lambda: not handed_off(s3_bucket), "the replayed objects deleted")
        assert total(scrape(second.url), "sira_prediction_rows_replayed_total") >= len(answered)
    finally:
        assert second.stop() == 0


def test_a_stop_with_postgres_up_hands_nothing_off(tmp_path, own_postgres, s3_bucket):
    server = new_server(str(tmp_path / "pod"), own_postgres.url, **s3_bucket.sira_env()).start(timeout=90)
    answered = score(server, 200)
    assert server.stop() == 0
    assert handed_off(s3_bucket) == []
    assert logged(own_postgres.url)[1] == set(answered)
