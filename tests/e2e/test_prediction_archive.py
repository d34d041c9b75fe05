"""Whole days of the prediction log to the bucket and back, against a real server, Postgres and S3 API.

Rows of a day 40 days back go in as the writer inserts them; `sira predictions archive --before`
moves that day to the bucket as Parquet and drops its partition; today's rows stay; a lookup of an
archived id answers 410 PREDICTION_ARCHIVED; `sira predictions restore` brings the day back.
"""

from __future__ import annotations

import datetime as dt
import io
import json

import httpx
import psycopg
import pyarrow.parquet as pq
import pytest
from uuid_utils import uuid7

from app.predlog.log import encode_record
from tests.e2e.test_infer import event
from tests.fixtures.server import bearer, run_sira, sira_env
from tests.fixtures.waiting import wait_for
from tests.integration.test_partitions import write

pytestmark = pytest.mark.timeout(600)

PREFIX = "prediction-archive/"
UTC = dt.UTC


def old_records(day: dt.date, count: int) -> tuple[list[bytes], list[str]]:
    """Records of ``day`` with UUIDv7 ids of their own time, as the workers make them."""
    records, ids = [], []
    for index in range(count):
        at = dt.datetime(day.year, day.month, day.day, 12, tzinfo=UTC) + dt.timedelta(seconds=index)
        prediction_id = str(uuid7(nanoseconds=int(at.timestamp() * 1e9)))
        body = {"prediction_id": prediction_id, "model_id": "6f1c3f7e-2d1b-4c55-9a47-7d2f0c1e9b10",
                "model_role": "production", "score": 0.25, "decision": "allow",
                "explain_summary": [{"feature": "amount", "importance": 0.4}], "latency_ms": 0.8, "cached": False}
        records.append(encode_record(body, f"evt-{index}", "fraud_score", None, at.timestamp()))
        ids.append(prediction_id)
    return records, ids


def score(server, count: int) -> list[str]:
    ids = []
    for index in range(count):
        answer = httpx.post(f"{server.url}/v1/infer", headers=bearer(), timeout=10,
                            json=event(f"today-{index}", amount=10.0 + index))
        assert answer.status_code == 200, answer.text
        ids.append(answer.json()["prediction_id"])
    return ids


def count_of(dsn: str, ids: list[str]) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM siramodel_predictions WHERE prediction_id = ANY(%s::uuid[])",
                            (ids,)).fetchone()[0]


def lookup(server, prediction_id: str) -> httpx.Response:
    return httpx.get(f"{server.url}/v1/infer/{prediction_id}", headers=bearer("fraud_analyst"), timeout=10)


def test_a_day_is_archived_to_the_bucket_looked_up_as_archived_and_restored(server_factory, s3_bucket, tmp_path):
    server = server_factory(**s3_bucket.sira_env())
    dsn = server.env["DATABASE_URL"]
    today_ids = score(server, 20)
    wait_for(lambda: count_of(dsn, today_ids) == 20, "today's predictions in Postgres")
    day = dt.datetime.now(UTC).date() - dt.timedelta(days=40)
    records, old_ids = old_records(day, 300)
    write(dsn, tmp_path, records)  # as the writer inserts them

    done = run_sira("predictions", "archive", "--before", str(day + dt.timedelta(days=10)), env=server.env)
    assert done.returncode == 0, done.stderr
    assert f"{day}: 300 rows" in done.stdout

    data_key, manifest_key = f"{PREFIX}{day}/part-0000.parquet", f"{PREFIX}{day}/part-0000.manifest.json"
    assert {data_key, manifest_key} <= set(s3_bucket.keys())
    client = s3_bucket.client()
    manifest = json.loads(client.get_object(Bucket=s3_bucket.name, Key=manifest_key)["Body"].read())
    assert (manifest["day"], manifest["rows"], manifest["schema_version"]) == (str(day), 300, 1)
    table = pq.read_table(io.BytesIO(client.get_object(Bucket=s3_bucket.name, Key=data_key)["Body"].read()))
    assert sorted(table.column("prediction_id").to_pylist()) == sorted(old_ids)

    assert count_of(dsn, old_ids) == 0       # the day left Postgres
    assert count_of(dsn, today_ids) == 20    # today stayed
    answer = lookup(server, old_ids[0])
    assert answer.status_code == 410, answer.text
    error = answer.json()
    assert error["error_code"] == "PREDICTION_ARCHIVED"
    assert error["details"]["day"] == str(day) and error["details"]["object"].endswith(data_key)
    assert lookup(server, today_ids[0]).status_code == 200
    with psycopg.connect(dsn) as conn, pytest.raises(psycopg.errors.RaiseException, match="append-only"):
        conn.execute("UPDATE siramodel_predictions SET score = 0.9")

    again = run_sira("predictions", "archive", "--before", str(day + dt.timedelta(days=10)), env=server.env)
    assert again.returncode == 0 and "0 day(s)" in again.stdout  # nothing twice

    restored = run_sira("predictions", "restore", str(day), env=server.env)
    assert restored.returncode == 0, restored.stderr
    assert count_of(dsn, old_ids) == 300
    assert lookup(server, old_ids[0]).status_code == 200
    listing = run_sira("predictions", "archives", env=server.env)
    assert listing.returncode == 0 and str(day) in listing.stdout


@pytest.mark.parametrize("args, code, fragment", [
    (["archive", "--before", "yesterday"], 2, "expected a day as YYYY-MM-DD"),
    (["archive", "--before", "2026-02-30"], 2, "expected a day as YYYY-MM-DD"),
    (["archive", "--older-than", "ninety"], 2, "expected a number of days such as 90d"),
    (["archive", "--older-than", "0d"], 2, "expected a number of days such as 90d"),
    (["archive"], 2, "one of the arguments --before --older-than is required"),
    (["archive", "--before", "2999-01-01"], 2, "may still receive rows"),
    (["restore", "1999-01-01"], 1, "1999-01-01 was never archived"),
    (["restore", "01/02/2020"], 2, "expected a day as YYYY-MM-DD"),
])
def test_bad_archive_commands_say_why_in_one_line(tmp_path, fresh_db, args, code, fragment):
    env = sira_env(SIRA_DATA_DIR=str(tmp_path / "data"), DATABASE_URL=fresh_db)
    done = run_sira("predictions", *args, env=env)
    assert done.returncode == code, (done.stdout, done.stderr)
    said = [line for line in done.stderr.splitlines() if not line.startswith("{")]  # not the JSON log lines
    assert fragment in said[-1]
    assert len(said) <= 3  # argparse's usage and its one-line error at most
