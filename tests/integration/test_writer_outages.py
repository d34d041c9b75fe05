"""The prediction writer killed, stopped and cut off from Postgres: nothing lost, nothing doubled.

The writer runs as ``python -m workers.writer_process`` and is killed and stopped (SIGTERM) like the
master would; Postgres outages use an embedded server of this module that the tests stop and start.
While Postgres is away the writer spools batches to disk and replays them when it is back; a full
spool leaves new records in the rings. The normal path is in tests/integration/test_writer.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time

import orjson
import pytest

from app.ids import id_time_ms
from app.predlog.files import BatchName
from app.predlog.log import Stat
from app.predlog.spool import read_batch
from tests.fixtures.postgres import create_database, drop_database, unique_database_name
from tests.fixtures.writer_rings import (  # noqa: F401 (setup_fixture)
    Shared,
    WriterProcess,
    logged_ids,
    make_config,
    row_count,
    setup_fixture,
    wait_until,
)
from workers.migrate import apply_migrations
from workers.postgres import EmbeddedPostgres


def is_open(server: EmbeddedPostgres) -> bool:
    try:
        _ = server.url  # RuntimeError unless the server is open
    except RuntimeError:
        return False
    return True


@pytest.fixture(scope="module")
def own_postgres():
    """A Postgres of this module only, which tests stop and start (each leaves it running)."""
    folder = tempfile.mkdtemp(prefix="sira-test-writer-pg-")
    server = EmbeddedPostgres(os.path.join(folder, "pg"), durable=False)
    try:
        server.open()
        yield server
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def own_db(own_postgres):
    """(server, url of a new migrated database on it)."""
    name = unique_database_name("sira_writer")
    url = create_database(own_postgres.url, name)
    apply_migrations(url)
    try:
        yield own_postgres, url
    finally:
        if not is_open(own_postgres):
            own_postgres.open()
        drop_database(own_postgres.url, name)


def test_writer_killed_mid_stream_twice_loses_and_doubles_nothing(setup):
    config, shared, writer = setup
    sent: list[list[str]] = [[], []]
    done = threading.Event()

    def produce(slot: int) -> None:
        while not done.is_set():
            if shared.rings.reader(slot).depth_bytes() > config.ring_bytes // 2:
                time.sleep(0.001)  # keep to the ring: this test is about the writer, not overflow
                continue
            sent[slot].extend(shared.append(slot, 50))

    producers = [threading.Thread(target=produce, args=(slot,)) for slot in range(2)]
    writer.start(shared.stats)
    for thread in producers:
        thread.start()
    try:
        for _ in range(2):
            written = shared.stats.get(Stat.ROWS_WRITTEN)
            wait_until(lambda written=written: shared.stats.get(Stat.ROWS_WRITTEN) > written + 3000,
                       "rows before the kill")
            writer.kill()
            writer.start(shared.stats)
    finally:
        done.set()
        for thread in producers:
            thread.join()
    assert writer.stop() == 0
    ids = logged_ids(config.database_url)
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(sent[0] + sent[1])
    assert shared.depth() == 0


def test_sigterm_drains_every_ring_before_exit(setup):
    config, shared, writer = setup
    writer.start(shared.stats)
    sent = shared.append(0, 4000) + shared.append(1, 4000)
    assert writer.stop() == 0
    assert shared.depth() == 0
    assert sorted(logged_ids(config.database_url)) == sorted(sent)


def test_postgres_away_spools_batches_and_replays_them_when_back(tmp_path, own_db):
    server, dsn = own_db
    config = make_config(tmp_path, dsn, batch_rows=500)
    shared = Shared(config)
    writer = WriterProcess(config, str(tmp_path / "writer.log"))
    try:
        writer.start(shared.stats)
        before = shared.append(0, 300)
        wait_until(lambda: row_count(dsn) == 300, "rows before the outage")
        server.close()  # stops it: this module's handle is its only user
        during = shared.append(0, 1500) + shared.append(1, 1500)
        wait_until(lambda: shared.depth() == 0, "the rings to drain into the spool")
        spooled = os.listdir(config.batches_dir)
        assert len(spooled) >= 6, spooled  # 500-row batches, none lost while Postgres was away
        for name in spooled:  # each named by the span of its ids' times, for GET /v1/infer/{id}
            span = BatchName.parse(name)
            times = [id_time_ms(orjson.loads(record)["prediction_id"])
                     for record in read_batch(os.path.join(config.batches_dir, name)).records]
            assert (span.first_ms, span.last_ms) == (min(times), max(times)), name
        assert shared.stats.get(Stat.ROWS_SPOOLED) == 3000
        assert shared.stats.get(Stat.DATABASE_UP) == 0
        server.open()
        after = shared.append(1, 200)
        wait_until(lambda: row_count(dsn) == 3500, "the spool to be replayed")
        wait_until(lambda: not os.listdir(config.batches_dir), "the spool to empty")
        assert writer.stop() == 0
        assert sorted(logged_ids(dsn)) == sorted(before + during + after)
        assert "Postgres is away" in writer.log() and "Postgres is back" in writer.log()
    finally:
        writer.cleanup()
        shared.close()


def test_sigterm_while_postgres_is_away_drains_the_rings_to_the_spool(tmp_path, own_db):
    server, dsn = own_db
    config = make_config(tmp_path, dsn)
    shared = Shared(config)
    writer = WriterProcess(config, str(tmp_path / "writer.log"))
    try:
        server.close()
        writer.start(shared.stats)
        sent = shared.append(0, 2500) + shared.append(1, 100)
        assert writer.stop() == 0
        assert shared.depth() == 0
        server.open()
        assert row_count(dsn) == 0
        writer.start(shared.stats)  # the next start replays what the last one spooled
        wait_until(lambda: row_count(dsn) == len(sent), "the replay at the next start")
        assert writer.stop() == 0
        assert sorted(logged_ids(dsn)) == sorted(sent)
    finally:
        writer.cleanup()
        shared.close()


def test_full_spool_leaves_new_records_in_the_rings_and_loses_nothing(tmp_path, own_db):
    server, dsn = own_db
    config = make_config(tmp_path, dsn, batch_rows=200, spool_max_bytes=100_000)
    shared = Shared(config)
    writer = WriterProcess(config, str(tmp_path / "writer.log"))
    try:
        server.close()
        writer.start(shared.stats)
        sent = shared.append(0, 1500)
        wait_until(lambda: shared.stats.get(Stat.SPOOL_FULL) == 1, "the spool to fill")
        assert shared.depth() > 0  # the rest waits in the ring
        assert "prediction spool is full" in writer.log()
        server.open()
        wait_until(lambda: row_count(dsn) == len(sent), "everything once Postgres is back")
        assert writer.stop() == 0
        assert sorted(logged_ids(dsn)) == sorted(sent)
        assert "full (" in writer.log()
    finally:
        writer.cleanup()
        shared.close()
