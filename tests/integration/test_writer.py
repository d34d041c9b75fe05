"""The prediction writer as a real process against a real Postgres, on its normal path: nothing lost, nothing doubled.

The test process plays the HTTP workers (it appends to the rings through ``app.predlog.log``); the
writer runs as ``python -m workers.writer_process``. Here every record reaches Postgres once, in few
commits; overflow files are replayed once sealed or orphaned; rows Postgres refuses are set aside;
and the master drains rings no writer took. Kills, stops and Postgres outages are in
tests/integration/test_writer_outages.py.
"""

from __future__ import annotations

import os
import time

import orjson
import psycopg

from app.predlog.files import OverflowSpill
from app.predlog.log import PredictionLog, Stat, encode_record
from shm.counters import CounterBlock
from shm.ring import QueueRings
from tests.fixtures.writer_rings import (  # noqa: F401 (setup_fixture)
    Shared,
    WriterProcess,
    body,
    logged_ids,
    make_config,
    row_count,
    setup_fixture,
    wait_until,
)
from workers.writer_process import prediction_log_segments


def test_every_appended_record_reaches_postgres_exactly_once(setup):
    config, shared, writer = setup
    sent = shared.append(0, 3000) + shared.append(1, 2000)
    writer.start(shared.stats)
    wait_until(lambda: row_count(config.database_url) == len(sent), "every row")
    assert writer.stop() == 0
    ids = logged_ids(config.database_url)
    assert sorted(ids) == sorted(sent)
    assert shared.depth() == 0
    assert shared.stats.get(Stat.ROWS_WRITTEN) >= len(sent)
    assert shared.stats.get(Stat.BATCHES_WRITTEN) >= 3  # 2000-row batches
    with psycopg.connect(config.database_url) as conn:
        row = conn.execute("SELECT event_id, product, model_role, decision, explanation, cached, request_id, "
                           "created_at > now() - interval '5 minutes' FROM siramodel_predictions "
                           "WHERE prediction_id = %s", (sent[0],)).fetchone()
    assert row == (f"evt-{sent[0][:8]}", "fraud_score", "production", "allow",
                   [{"feature": "amount", "importance": 0.4}], False, "req-1", True)


def test_a_steady_trickle_is_sent_in_few_commits_with_a_linger(tmp_path, migrated_db):
    config = make_config(tmp_path, migrated_db, linger_s=0.5)
    shared = Shared(config)
    writer = WriterProcess(config, str(tmp_path / "writer.log"))
    try:
        writer.start(shared.stats)
        sent = []
        for _ in range(150):  # one prediction every 10 ms for about 1.5 s
            sent += shared.append(0, 1)
            time.sleep(0.01)
        wait_until(lambda: row_count(config.database_url) == len(sent), "every row")
        batches = shared.stats.get(Stat.BATCHES_WRITTEN)
        assert writer.stop() == 0
    finally:
        writer.cleanup()
        shared.close()
    # Sent as soon as each commit returned, 150 rows over 1.5 s make dozens of commits; with a
    # 0.5 s linger there is one every 0.5 s at most, plus the first (found at an idle poll).
    assert 1 <= batches <= 8, batches


def test_full_batches_do_not_wait_for_the_linger(tmp_path, migrated_db):
    config = make_config(tmp_path, migrated_db, linger_s=30.0, batch_rows=100)
    shared = Shared(config)
    writer = WriterProcess(config, str(tmp_path / "writer.log"))
    try:
        sent = shared.append(0, 1000)
        writer.start(shared.stats)
        # Ten full batches back to back: a writer that lingered after each would need 300 s.
        wait_until(lambda: row_count(config.database_url) == len(sent), "every row", timeout=25)
        assert writer.stop() == 0
    finally:
        writer.cleanup()
        shared.close()


def test_overflow_files_are_replayed_once_sealed_or_orphaned(setup):
    config, shared, writer = setup
    epochs = [shared.rings.reader(slot).producer()[1] for slot in range(2)]
    sealed = OverflowSpill(config.overflow_dir, config.instance_id, 0, epochs[0])
    orphan = OverflowSpill(config.overflow_dir, "old_instance", 1, 1)  # a previous `sira serve`
    live = OverflowSpill(config.overflow_dir, config.instance_id, 1, epochs[1])  # our pid, current epoch
    records = {}
    for name, spill in (("sealed", sealed), ("orphan", orphan), ("live", live)):
        records[name] = []
        for _ in range(30):
            answer = body()
            spill.write(encode_record(answer, "evt", "fraud_score", "req", time.time()))
            records[name].append(answer["prediction_id"])
    sealed.seal()
    orphan._fd, fd = -1, orphan._fd  # the old worker died without sealing
    os.close(fd)
    writer.start(shared.stats)
    wait_until(lambda: row_count(config.database_url) == 60, "the sealed and orphaned files")
    time.sleep(0.5)
    assert sorted(logged_ids(config.database_url)) == sorted(records["sealed"] + records["orphan"])
    live.seal()  # now the writer may take it
    wait_until(lambda: row_count(config.database_url) == 90, "the file once sealed")
    wait_until(lambda: not os.listdir(config.overflow_dir), "the overflow files to go")
    assert writer.stop() == 0
    assert shared.stats.get(Stat.ROWS_REPLAYED) == 90


def test_rows_postgres_refuses_are_kept_aside_and_the_rest_written(setup):
    config, shared, writer = setup
    good = shared.append(0, 100)
    bad = shared.append(0, 1, model_role="champion")  # breaks the model_role CHECK
    good += shared.append(0, 100)
    writer.start(shared.stats)
    wait_until(lambda: row_count(config.database_url) == 200, "the good rows")
    wait_until(lambda: shared.stats.get(Stat.ROWS_REJECTED) == 1, "the bad row to be counted")
    assert writer.stop() == 0
    assert sorted(logged_ids(config.database_url)) == sorted(good)
    (rejected_file,) = os.listdir(config.rejected_dir)
    with open(os.path.join(config.rejected_dir, rejected_file), "rb") as handle:
        (item,) = [orjson.loads(line) for line in handle]
    assert orjson.loads(item["record"])["prediction_id"] == bad[0]
    assert "model_role" in item["error"]


def test_master_drains_rings_no_writer_took_before_removing_them(tmp_path, migrated_db):
    config = make_config(tmp_path, migrated_db)
    with prediction_log_segments(config):
        rings = QueueRings.attach(config.rings_segment)
        stats = CounterBlock.attach(config.stats_segment)
        try:
            log = PredictionLog(config, 1, rings, stats)
            sent = []
            for _ in range(700):
                answer = body()
                log.append(answer, "evt", "fraud_score", None)
                sent.append(answer["prediction_id"])
        finally:
            stats.close()
            rings.close()
    assert sorted(logged_ids(migrated_db)) == sorted(sent)
    assert not os.path.exists(os.path.join("/dev/shm", config.rings_segment))
    assert not os.path.exists(os.path.join("/dev/shm", config.stats_segment))
