"""The worker side of the prediction log (app/predlog/log.py), ring search, counters and slots, one process."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time
import uuid

import orjson
import pytest

from app.errors import ServiceUnavailable
from app.http.lookup import canonical_prediction_id, prediction_json
from app.ids import new_prediction_id
from app.predlog.disk import DiskReason
from app.predlog.files import (
    OverflowName,
    OverflowSpill,
    decode_frames,
    decode_overflow,
    encode_frames,
    find_framed_record,
)
from app.predlog.log import (
    OVERFLOW_DIR,
    PredictionLog,
    PredictionLogConfig,
    SlotStat,
    Stat,
    encode_record,
    record_prefix,
    slot_cell,
    stat_cells,
)
from shm.counters import CounterBlock
from shm.ring import QueueRings
from shm.ring_search import find_record
from shm.segment import SegmentError
from workers.slots import lowest_free_slot


def body(**changes) -> dict:
    answer = {"prediction_id": new_prediction_id(), "model_id": str(uuid.uuid4()), "model_role": "production",
              "score": 0.5, "decision": "review", "explain_summary": [], "latency_ms": 1.25, "cached": True}
    answer.update(changes)
    return answer


@pytest.fixture
def segments(tmp_path):
    """Rings and counters in a private folder, closed and removed afterwards."""
    made = []

    def make(slots: int = 2, ring_bytes: int = 4096):
        name = f"t{len(made)}"
        rings = QueueRings.create(f"{name}-rings", slots, ring_bytes, directory=str(tmp_path))
        stats = CounterBlock.create(f"{name}-stats", stat_cells(slots), directory=str(tmp_path))
        made.append((rings, stats))
        return rings, stats

    yield make
    for rings, stats in made:
        for segment in (rings, stats):
            segment.close()
            segment.unlink()


def make_log(tmp_path, rings, stats, slot: int = 0) -> PredictionLog:
    config = PredictionLogConfig(instance_id="inst", rings_segment="unused", stats_segment="unused",
                                 slots=rings.slots, ring_bytes=rings.ring_bytes, spool_dir=str(tmp_path / "spool"),
                                 database_url=None, spool_max_bytes=1 << 20, batch_rows=100)
    return PredictionLog(config, slot, rings, stats)


# -- records ------------------------------------------------------------------------------------

def test_a_record_is_its_row_as_json_starting_with_its_id():
    answer = body(explain_summary=[{"feature": "amount", "importance": 0.3}])
    record = encode_record(answer, "evt-1", "fraud_score", "req-9", 1700000000.25)
    assert record.startswith(record_prefix(answer["prediction_id"]))
    assert orjson.loads(record) == {
        "prediction_id": answer["prediction_id"], "event_id": "evt-1", "product": "fraud_score",
        "model_id": answer["model_id"], "model_role": "production", "score": 0.5, "decision": "review",
        "explanation": [{"feature": "amount", "importance": 0.3}], "latency_ms": 1.25, "cached": True,
        "request_id": "req-9", "created_at": 1700000000.25}
    assert b"\n" not in encode_record(body(), "evt\nwith newline\t", "p", None, 0.0)  # one COPY line


def test_frames_round_trip_and_a_torn_tail_is_left_out():
    records = [b"", b"a", b"{}" * 100, bytes(range(256))]
    data = encode_frames(records)
    assert decode_frames(data) == (records, len(data))
    assert decode_frames(data + b"\x05\x00\x00\x00ab") == (records, len(data))
    assert decode_frames(data[:-1]) == (records[:-1], len(encode_frames(records[:-1])))


def test_find_framed_record_finds_only_whole_records():
    wanted = encode_record(body(), "e", "p", None, 1.0)
    prefix = wanted[:len(record_prefix(str(uuid.uuid4())))]
    data = encode_frames([encode_record(body(), "e", "p", None, 1.0), wanted])
    assert find_framed_record(data, prefix) == wanted
    assert find_framed_record(data[:-1], prefix) is None
    assert find_framed_record(data, record_prefix(str(uuid.uuid4()))) is None


# -- ring search --------------------------------------------------------------------------------

def test_ring_search_finds_every_unconsumed_record_and_no_consumed_one(segments):
    """Random sizes over many wraps: every record still in the ring is found, none already consumed."""
    rings, _stats = segments(slots=1, ring_bytes=1024)
    writer, reader = rings.writer(0), rings.reader(0)
    rng = random.Random(5)
    waiting: list[bytes] = []
    consumed: list[bytes] = []
    for _ in range(600):
        if rng.random() < 0.6:
            record = record_prefix(str(uuid.UUID(int=rng.getrandbits(128)))) + bytes(rng.randrange(0, 90))
            if writer.append(record):
                waiting.append(record)
        else:
            records, end = reader.peek_batch(rng.randrange(1, 4))
            reader.commit(end)
            consumed.extend(records)
            del waiting[:len(records)]
        for record in waiting[-3:] + waiting[:2]:
            assert find_record(rings, 0, record[:55]) == record
        for record in consumed[-3:]:
            assert find_record(rings, 0, record[:55]) is None


def test_ring_search_finds_a_prefix_that_straddles_the_end_of_the_ring(segments):
    rings, _stats = segments(slots=1, ring_bytes=256)
    writer, reader = rings.writer(0), rings.reader(0)
    assert writer.append(bytes(228))  # 232 bytes: the next record starts 24 bytes before the end
    reader.commit(reader.peek_batch()[1])
    record = record_prefix(str(uuid.uuid4())) + b"tail"
    assert writer.append(record)
    assert find_record(rings, 0, record[:57]) == record


# -- appending ----------------------------------------------------------------------------------

def test_append_goes_to_the_ring_of_the_workers_slot(tmp_path, segments):
    rings, stats = segments()
    log = make_log(tmp_path, rings, stats, slot=1)
    answer = body()
    log.append(answer, "evt", "fraud_score", "rid")
    records, _end = rings.reader(1).peek_batch()
    assert [orjson.loads(r)["prediction_id"] for r in records] == [answer["prediction_id"]]
    assert rings.reader(0).peek_batch()[0] == []
    assert log.appended == 1 and log.overflowed == 0


def test_a_full_ring_spills_to_an_overflow_file_counted_and_sealed_when_room_returns(tmp_path, segments):
    rings, stats = segments(slots=2, ring_bytes=4096)
    log = make_log(tmp_path, rings, stats, slot=1)
    sent = [body() for _ in range(30)]  # ~250 bytes each: about 16 fit
    for answer in sent:
        log.append(answer, "evt", "fraud_score", None)
    in_ring, end = rings.reader(1).peek_batch()
    assert 0 < log.overflowed == stats.get(slot_cell(1, SlotStat.OVERFLOW)) == 30 - len(in_ring)
    overflow_dir = tmp_path / "spool" / OVERFLOW_DIR
    (open_file,) = os.listdir(overflow_dir)
    name = OverflowName.parse(open_file)
    assert (name.instance_id, name.slot, name.pid, name.sealed) == ("inst", 1, os.getpid(), False)
    spilled = decode_overflow((overflow_dir / open_file).read_bytes()).records
    ring_ids = [orjson.loads(r)["prediction_id"] for r in in_ring]
    spilled_ids = [orjson.loads(r)["prediction_id"] for r in spilled]
    assert ring_ids + spilled_ids == [answer["prediction_id"] for answer in sent]  # none lost, none twice

    rings.reader(1).commit(end)  # the writer took the ring
    log.append(body(), "evt", "fraud_score", None)
    assert [OverflowName.parse(n).sealed for n in os.listdir(overflow_dir)] == [True]


def test_spill_files_rotate_after_their_record_limit(tmp_path, monkeypatch):
    monkeypatch.setattr("app.predlog.files.OVERFLOW_FILE_RECORDS", 10)
    spill = OverflowSpill(str(tmp_path), "inst", 0, 3)
    for _ in range(25):
        spill.write(encode_record(body(), "e", "p", None, time.time()))
    spill.seal()
    names = sorted(os.listdir(tmp_path))
    assert [OverflowName.parse(n).seq for n in names] == [1, 2, 3]
    assert all(OverflowName.parse(n).sealed for n in names)
    assert [len(decode_overflow((tmp_path / n).read_bytes()).records) for n in names] == [10, 10, 5]


def test_when_the_ring_and_the_disk_both_refuse_the_request_fails(tmp_path, segments):
    rings, stats = segments(slots=1, ring_bytes=4096)
    log = make_log(tmp_path, rings, stats)
    (tmp_path / "spool").write_text("a file where the spool folder should be")
    with pytest.raises(ServiceUnavailable):
        for _ in range(40):
            log.append(body(), "evt", "fraud_score", None)


def test_an_idle_spill_is_sealed_by_a_timer(tmp_path, segments, monkeypatch):
    for module in ("app.predlog.log", "app.predlog.files"):
        monkeypatch.setattr(f"{module}.OVERFLOW_FILE_MAX_AGE_S", 0.05)
    rings, stats = segments(slots=1, ring_bytes=4096)
    log = make_log(tmp_path, rings, stats)

    async def spill_then_idle():
        for _ in range(30):
            log.append(body(), "evt", "fraud_score", None)
        await asyncio.sleep(0.3)

    asyncio.run(spill_then_idle())
    names = os.listdir(tmp_path / "spool" / OVERFLOW_DIR)
    assert names and all(OverflowName.parse(n).sealed for n in names)


# -- finding ------------------------------------------------------------------------------------

def test_find_unwritten_looks_in_every_ring_and_in_the_spill_files(tmp_path, segments):
    rings, stats = segments(slots=2, ring_bytes=4096)
    writers = [make_log(tmp_path, rings, stats, slot) for slot in (0, 1)]
    reader_log = make_log(tmp_path, rings, stats, 0)
    sent = []
    for i in range(40):
        answer = body()
        writers[i % 2].append(answer, f"evt-{i}", "fraud_score", "rid")
        sent.append(answer["prediction_id"])
    assert writers[0].overflowed and writers[1].overflowed

    async def find_all():
        return [await reader_log.find_unwritten(prediction_id) for prediction_id in sent]

    found = asyncio.run(find_all())
    assert [row["prediction_id"] for row in found] == sent
    assert asyncio.run(reader_log.find_unwritten(new_prediction_id())) is None


def test_an_id_that_is_not_v7_is_never_looked_for_on_disk(tmp_path, segments, monkeypatch):
    """Its time is unknown, so no file can be chosen: the rings, then Postgres (app/predlog/log.py)."""
    rings, stats = segments(slots=1, ring_bytes=256)
    log = make_log(tmp_path, rings, stats)
    old = body(prediction_id=str(uuid.uuid4()))
    for answer in [body() for _ in range(10)] + [old]:
        log.append(answer, "evt", "fraud_score", None)
    spilled = (tmp_path / "spool" / OVERFLOW_DIR).iterdir()
    assert any(record_prefix(old["prediction_id"]) in path.read_bytes() for path in spilled)
    searched = []
    monkeypatch.setattr(log, "find_on_disk", lambda *args: searched.append(args))
    assert asyncio.run(log.find_unwritten(old["prediction_id"])) is None
    assert searched == []


def test_prediction_json_has_the_seeds_shape():
    row = orjson.loads(encode_record(body(), "evt", "fraud_score", "rid", 0.5))
    shown = prediction_json(row)
    assert set(shown) >= {"prediction_id", "model_id", "event_id", "product", "score", "decision", "explain",
                          "latency_ms", "model_role", "created_at"}
    assert shown["created_at"] == "1970-01-01T00:00:00.500Z"


@pytest.mark.parametrize("value", ["nope", "", "123", str(uuid.uuid4()).replace("-", ""),
                                   "{" + str(uuid.uuid4()) + "}", str(uuid.uuid4())[:-1] + "g"])
def test_a_malformed_prediction_id_is_refused(value):
    with pytest.raises(Exception) as error:
        canonical_prediction_id(value)
    assert getattr(error.value, "status", None) == 400


def test_prediction_ids_are_compared_in_canonical_form():
    value = str(uuid.uuid4())
    assert canonical_prediction_id(value.upper()) == value


# -- counters and slots -------------------------------------------------------------------------

def test_counter_block_cells_are_shared_by_name(tmp_path):
    with CounterBlock.create("c", 4, directory=str(tmp_path)) as block:
        other = CounterBlock.attach("c", directory=str(tmp_path))
        block.set(0, 41)
        assert other.add(0) == 42 and block.get(0) == 42
        other.set(3, 2**64 + 5)  # wraps
        assert block.snapshot() == [42, 0, 0, 5]
        with pytest.raises(IndexError):
            block.get(4)
        other.close()


def test_counter_block_refuses_a_corrupt_size(tmp_path):
    with CounterBlock.create("c", 4, directory=str(tmp_path)) as block:
        block.segment.buf[64:68] = (9).to_bytes(4, "little")
        with pytest.raises(SegmentError):
            CounterBlock.attach("c", directory=str(tmp_path))


def test_lowest_free_slot():
    assert lowest_free_slot(set(), 3) == 0
    assert lowest_free_slot({0, 2, None}, 3) == 1
    assert lowest_free_slot({0, 1, 2}, 3) is None


def test_config_paths_live_under_the_spool():
    config = PredictionLogConfig("i", "r", "s", 1, 65536, "/data/spool", None, 1, 1)
    assert (config.overflow_dir, config.batches_dir, config.rejected_dir) == (
        "/data/spool/overflow", "/data/spool/batches", "/data/spool/rejected")
    assert dataclasses.replace(config, slots=2).slots == 2


class FakeWorker:
    """Stands for a gunicorn worker object: hooks only set and read an attribute on it."""


def fake_server(slots: int, live_slots: list[int | None]):
    from types import SimpleNamespace

    workers = {}
    for pid, slot in enumerate(live_slots, start=100):
        worker = FakeWorker()
        worker.sira_slot = slot
        workers[pid] = worker
    app = SimpleNamespace(app_config=SimpleNamespace(prediction_log=SimpleNamespace(slots=slots)), worker_slot=None)
    return SimpleNamespace(WORKERS=workers, app=app, num_workers=len(live_slots) + 1)


def test_a_new_worker_takes_the_lowest_slot_no_live_worker_holds():
    from workers.slots import assign_worker_slot, take_worker_slot

    server = fake_server(3, [0, 2])  # the worker of slot 1 died and was reaped
    worker = FakeWorker()
    assign_worker_slot(server, worker)
    take_worker_slot(server, worker)
    assert worker.sira_slot == 1 and server.app.worker_slot == 1


def test_a_worker_beyond_the_slots_is_refused_and_the_count_lowered():
    from workers.slots import assign_worker_slot, take_worker_slot

    server = fake_server(2, [0, 1])  # TTIN asked for a third worker
    worker = FakeWorker()
    assign_worker_slot(server, worker)
    assert worker.sira_slot is None and server.num_workers == 2
    with pytest.raises(SystemExit) as leaving:
        take_worker_slot(server, worker)
    assert leaving.value.code == 0


# -- metrics read from the counter block --------------------------------------------------------

def test_the_collector_reads_the_counter_block_and_the_rings(tmp_path, segments):
    from prometheus_client import CollectorRegistry

    from app.predlog.metrics import PredictionLogCollector

    rings, stats = segments(slots=2, ring_bytes=4096)
    log = make_log(tmp_path, rings, stats, slot=1)
    for _ in range(3):
        log.append(body(), "evt", "fraud_score", "rid")
    stats.add(slot_cell(0, SlotStat.OVERFLOW), 2)
    stats.add(slot_cell(1, SlotStat.OVERFLOW), 5)
    stats.add(slot_cell(0, SlotStat.REFUSED), 4)
    stats.add(slot_cell(1, SlotStat.DISK_ERRORS + DiskReason.ENOSPC), 3)
    stats.add(Stat.WRITER_DISK_ERRORS + DiskReason.ENOSPC, 2)
    stats.add(Stat.WRITER_DISK_ERRORS + DiskReason.EIO, 1)
    stats.add(Stat.RING_DAMAGE, 6)
    stats.add(Stat.FILE_DAMAGE, 2)
    stats.set(Stat.ADOPTED_RECORDS, 8)
    stats.set(Stat.OVERFLOW_BYTES, 1234)
    stats.set(Stat.ROWS_WRITTEN, 900)
    stats.set(Stat.BATCHES_WRITTEN, 3)
    stats.set(Stat.FLUSH_US_TOTAL, 1_500_000)
    stats.set(Stat.SPOOL_BYTES, 4096)
    stats.set(Stat.OLDEST_UNWRITTEN_MS, 2500)
    stats.set(Stat.WRITER_HEARTBEAT_MS, 1_000_000)
    registry = CollectorRegistry()
    registry.register(PredictionLogCollector(log, clock=lambda: 1_004.5))
    sample = registry.get_sample_value
    assert sample("sira_prediction_queue_depth") == 3
    assert sample("sira_prediction_queue_overflow_total") == 7  # every slot's cell
    assert sample("sira_prediction_rows_written_total") == 900
    assert sample("sira_prediction_batch_rows_count") == 3 and sample("sira_prediction_batch_rows_sum") == 900
    assert sample("sira_prediction_flush_seconds_sum") == 1.5
    assert sample("sira_prediction_spool_bytes") == 4096
    assert sample("sira_prediction_oldest_unwritten_seconds") == 2.5
    assert sample("sira_prediction_writer_heartbeat_age_seconds") == 4.5
    assert sample("sira_prediction_refused_total") == 4
    assert sample("sira_prediction_disk_errors_total", {"process": "worker", "reason": "ENOSPC"}) == 3
    assert sample("sira_prediction_disk_errors_total", {"process": "writer", "reason": "ENOSPC"}) == 2
    assert sample("sira_prediction_disk_errors_total", {"process": "writer", "reason": "EIO"}) == 1
    assert sample("sira_prediction_disk_errors_total", {"process": "worker", "reason": "EMFILE"}) == 0
    assert sample("sira_prediction_damage_total", {"source": "ring"}) == 6
    assert sample("sira_prediction_damage_total", {"source": "overflow"}) == 2
    assert sample("sira_prediction_adopted_records") == 8
    assert sample("sira_prediction_overflow_bytes") == 1234
