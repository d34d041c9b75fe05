"""The prediction writer as a real process against a real Postgres: nothing lost, nothing doubled.

The test process plays the HTTP workers (it appends to the rings through ``app.predlog.log``); the
writer runs as ``python -m workers.writer_process`` and is killed, stopped and restarted like the master
would. Postgres outages use an embedded server of this module that the tests stop and start.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import orjson
import psycopg
import pytest

from app.ids import id_time_ms, new_prediction_id
from app.predlog.files import BatchName, OverflowSpill
from app.predlog.log import (
    PredictionLog,
    PredictionLogConfig,
    Stat,
    encode_record,
    stat_cells,
)
from app.predlog.spool import read_batch
from shm.counters import CounterBlock
from shm.ring import QueueRings
from shm.segment import segment_name
from tests.fixtures.postgres import create_database, drop_database, unique_database_name
from workers.migrate import apply_migrations
from workers.postgres import EmbeddedPostgres
from workers.writer_process import prediction_log_segments

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WAIT_S = 60.0


def body(prediction_id: str | None = None, **changes) -> dict:
    """A response body as app.http.infer builds it."""
    answer = {"prediction_id": prediction_id or new_prediction_id(),
              "model_id": "6f1c3f7e-2d1b-4c55-9a47-7d2f0c1e9b10", "model_role": "production",
              "score": 0.25, "decision": "allow",
              "explain_summary": [{"feature": "amount", "importance": 0.4}],
              "latency_ms": 0.8, "cached": False}
    answer.update(changes)
    return answer


def make_config(tmp_path, dsn: str, **changes) -> PredictionLogConfig:
    instance = "t" + uuid.uuid4().hex[:12]
    config = PredictionLogConfig(
        instance_id=instance, rings_segment=segment_name(instance, "predlog"),
        stats_segment=segment_name(instance, "predstats"), slots=2, ring_bytes=4 << 20,
        spool_dir=str(tmp_path / "spool"), database_url=dsn, spool_max_bytes=1 << 30, batch_rows=2000)
    return dataclasses.replace(config, **changes)


class Shared:
    """The segments the master would create, and one producer handle per slot (the "workers")."""

    def __init__(self, config: PredictionLogConfig):
        self.config = config
        self.rings = QueueRings.create(config.rings_segment, config.slots, config.ring_bytes)
        self.stats = CounterBlock.create(config.stats_segment, stat_cells(config.slots))
        self.logs = [PredictionLog(config, slot, self.rings, self.stats) for slot in range(config.slots)]

    def append(self, slot: int, count: int, **changes) -> list[str]:
        ids = []
        log = self.logs[slot]
        for _ in range(count):
            answer = body(**changes)
            log.append(answer, f"evt-{answer['prediction_id'][:8]}", "fraud_score", "req-1")
            ids.append(answer["prediction_id"])
        return ids

    def depth(self) -> int:
        return sum(self.rings.reader(slot).depth_bytes() for slot in range(self.rings.slots))

    def close(self) -> None:
        for log in self.logs:
            log.spill.seal()
        for segment in (self.stats, self.rings):
            segment.close()
            segment.unlink()
        assert not os.path.exists(self.rings.segment.path) and not os.path.exists(self.stats.segment.path)


class WriterProcess:
    """``python -m workers.writer_process`` with this test's config; every process is killed at teardown."""

    def __init__(self, config: PredictionLogConfig, log_path: str):
        self.config = config
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.all: list[subprocess.Popen] = []

    def start(self, stats: CounterBlock) -> WriterProcess:
        env = dict(os.environ, PYTHONPATH=REPO)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "workers.writer_process", orjson.dumps(dataclasses.asdict(self.config))],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.all.append(self.process)
        wait_until(lambda: stats.get(Stat.WRITER_PID) == self.process.pid or self.process.poll() is not None,
                   "the writer to start")
        assert self.process.poll() is None, self.log()
        return self

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(WAIT_S)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def cleanup(self) -> None:
        for process in self.all:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def wait_until(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}")
        time.sleep(0.02)


def is_open(server: EmbeddedPostgres) -> bool:
    try:
        _ = server.url  # RuntimeError unless the server is open
    except RuntimeError:
        return False
    return True


def logged_ids(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [row[0] for row in conn.execute("SELECT prediction_id::text FROM siramodel_predictions")]


def row_count(dsn: str) -> int:
    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            return conn.execute("SELECT count(*) FROM siramodel_predictions").fetchone()[0]
    except psycopg.OperationalError:
        return -1


@pytest.fixture
def setup(tmp_path, migrated_db):
    """(config, shared segments, writer process) on a fresh migrated database."""
    config = make_config(tmp_path, migrated_db)
    shared = Shared(config)
    writer = WriterProcess(config, str(tmp_path / "writer.log"))
    try:
        yield config, shared, writer
    finally:
        writer.cleanup()
        shared.close()


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
