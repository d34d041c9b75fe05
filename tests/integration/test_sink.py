"""PostgresSink against a real Postgres: typed rows COPYed, bad records set aside, the rest written."""

from __future__ import annotations

import datetime as dt
import os

import orjson
import psycopg
import pytest

from app.predlog.sink import MalformedRecord, copy_row
from tests.integration.test_partitions import record, write


def rejected(folder) -> list[dict]:
    return [orjson.loads(line) for name in sorted(os.listdir(folder))
            for line in open(os.path.join(folder, name), "rb")]


@pytest.mark.parametrize("bad, error", [
    (b"not json at all", "not JSON"),
    (b"[1, 2, 3]", "a JSON list, not an object"),
    (None, "invalid input syntax for type double precision"),  # score "high"
    (None, "violates not-null constraint"),                     # no event_id
])
def test_a_bad_record_is_kept_aside_and_the_batch_written(migrated_db, tmp_path, bad, error):
    now = dt.datetime.now(dt.UTC)
    good = [record(now) for _ in range(20)]
    if bad is None:
        fields = orjson.loads(record(now))
        if "double" in error:
            fields["score"] = "high"
        else:
            del fields["event_id"]
        bad = orjson.dumps(fields)
    write(migrated_db, tmp_path, good[:10] + [bad] + good[10:])
    with psycopg.connect(migrated_db) as conn:
        assert conn.execute("SELECT count(*) FROM siramodel_predictions").fetchone()[0] == 20
    (kept,) = rejected(tmp_path / "rejected")
    assert kept["record"] == bad.decode("utf-8", "replace") and error in kept["error"]


def test_copy_row_keeps_every_field_and_sends_odd_types_as_json_text():
    fields = orjson.loads(record(dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)))
    row = copy_row(orjson.dumps(fields))
    assert row[0] == fields["prediction_id"] and row[11] == fields["created_at"] and row[12] is None
    assert orjson.loads(row[7]) == fields["explanation"]
    fields["score"] = {"nested": True}
    assert copy_row(orjson.dumps(fields))[5] == '{"nested":true}'
    with pytest.raises(MalformedRecord):
        copy_row(b'"a string"')
