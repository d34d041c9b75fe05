"""The writer where production breaks: damaged ring records set aside while every other slot flows, and
the rings of a dead instance drained and removed (``python -m workers.writer_process``, real Postgres)."""

from __future__ import annotations

import dataclasses
import os

import orjson

from app.predlog.disk import DiskReason
from app.predlog.files import OverflowSpill
from app.predlog.log import PredictionLog, Stat, encode_record, slot_cell
from shm.ring import SLOT_HEADER_SIZE, QueueRings
from shm.segment import segment_name, segment_path
from tests.fixtures.writer_rings import (  # noqa: F401
    Shared,
    WriterProcess,
    body,
    logged_ids,
    make_config,
    row_count,
    setup_fixture,
    wait_until,
)


def damage_first_record(rings: QueueRings, slot: int) -> None:
    """Flip a payload byte of the slot's oldest record (the record's checksum no longer matches)."""
    data = rings.layout.slot_base(slot) + SLOT_HEADER_SIZE
    at = data + 8 + 150  # past the record's length and crc32, and past its prediction id
    rings.segment.buf[at] ^= 0xFF


def test_a_damaged_record_is_set_aside_and_every_other_record_flows(setup):
    config, shared, writer = setup
    damaged = shared.append(0, 1)
    sent = shared.append(0, 99) + shared.append(1, 100)
    damage_first_record(shared.rings, 0)
    writer.start(shared.stats)
    wait_until(lambda: row_count(config.database_url) == len(sent), "every intact record")
    wait_until(lambda: shared.stats.get(Stat.RING_DAMAGE) == 1, "the damage counted")
    assert sorted(logged_ids(config.database_url)) == sorted(sent)
    (kept,) = os.listdir(config.corrupt_dir)
    assert kept.startswith(f"ring-{config.rings_segment}-s0-record-")
    with open(os.path.join(config.corrupt_dir, kept), "rb") as handle:
        evidence = handle.read()
    assert damaged[0].encode() in evidence  # the id survives the flipped byte further on
    assert "failed its checksum" in writer.log()
    assert writer.process.poll() is None
    assert shared.depth() == 0
    assert writer.stop() == 0


def test_a_dead_instances_rings_are_drained_then_removed(setup, tmp_path):
    config, shared, writer = setup
    dead = dataclasses.replace(make_config(tmp_path / "dead", config.database_url), slots=2, ring_bytes=1 << 16)
    dead_rings = QueueRings.create(dead.rings_segment, dead.slots, dead.ring_bytes)
    dead_shared = Shared.__new__(Shared)  # the dead instance's "workers": producers on its rings
    dead_shared.config, dead_shared.rings, dead_shared.stats = dead, dead_rings, shared.stats
    dead_shared.logs = [PredictionLog(dead, slot, dead_rings, shared.stats) for slot in range(dead.slots)]
    left = dead_shared.append(0, 40) + dead_shared.append(1, 60)
    dead_rings.close()  # its master is gone; the segment stays in /dev/shm
    writer.config = dataclasses.replace(config, adopted_rings=(dead.rings_segment,))
    try:
        ours = shared.append(1, 25)
        writer.start(shared.stats)
        wait_until(lambda: row_count(config.database_url) == len(left) + len(ours), "both instances' records")
        wait_until(lambda: not os.path.exists(segment_path(dead.rings_segment)), "the drained rings removed")
        assert sorted(logged_ids(config.database_url)) == sorted(left + ours)
        assert shared.stats.get(Stat.ADOPTED_RECORDS) == 0
        assert writer.stop() == 0
    finally:
        dead_rings.unlink()  # idempotent: the writer removed it already


def test_rings_a_dead_instance_left_that_cannot_be_read_are_kept_aside(setup):
    config, shared, writer = setup
    name = segment_name("t" + os.urandom(6).hex(), "predlog")
    with open(segment_path(name), "wb") as handle:
        handle.write(b"SIRAQRNG" + b"\x01" * 120)  # a layout this code does not read
    writer.config = dataclasses.replace(config, adopted_rings=(name,))
    try:
        writer.start(shared.stats)
        wait_until(lambda: not os.path.exists(segment_path(name)), "the unreadable rings removed")
        (kept,) = os.listdir(config.corrupt_dir)
        assert kept.startswith(name)
        assert "cannot be read" in writer.log()
        sent = shared.append(0, 10)
        wait_until(lambda: row_count(config.database_url) == len(sent), "our own records still flow")
        assert writer.stop() == 0
    finally:
        if os.path.exists(segment_path(name)):
            os.unlink(segment_path(name))


def test_disk_errors_in_the_writer_are_counted_and_never_end_it(setup):
    config, shared, writer = setup
    os.makedirs(config.spool_dir)
    with open(config.batches_dir, "w") as handle:  # a file where the spool's folder should be
        handle.write("not a folder")
    writer.start(shared.stats)
    sent = shared.append(0, 50)
    wait_until(lambda: row_count(config.database_url) == len(sent), "the rings to reach Postgres all the same")
    assert shared.stats.get(Stat.WRITER_DISK_ERRORS + DiskReason.OTHER) >= 1
    assert shared.stats.get(slot_cell(0, 0)) == 0  # nothing spilled
    assert writer.log().count("opening the spool") == 1  # logged once, though retried every step
    os.unlink(config.batches_dir)
    wait_until(lambda: "the disk works again" in writer.log(), "the spool opened once it can")
    assert writer.process.poll() is None
    assert writer.stop() == 0


def test_an_overflow_file_with_a_damaged_record_replays_the_good_ones_and_keeps_the_rest(setup):
    config, shared, writer = setup
    spill = OverflowSpill(config.overflow_dir, "deadinstance", 0, 1)
    records = [encode_record(body(), "evt", "fraud_score", "req", 1.7e9) for _ in range(5)]
    for record in records:
        spill.write(record)
    spill.seal()
    (name,) = os.listdir(config.overflow_dir)
    path = os.path.join(config.overflow_dir, name)
    data = bytearray(open(path, "rb").read())
    data[data.index(records[3]) + 100] ^= 0x01
    with open(path, "wb") as handle:
        handle.write(data)
    writer.start(shared.stats)
    wait_until(lambda: not os.path.exists(path), "the overflow file replayed")
    good = [orjson.loads(record)["prediction_id"] for record in records[:3]]
    assert sorted(logged_ids(config.database_url)) == sorted(good)
    (kept,) = os.listdir(config.corrupt_dir)
    assert kept.startswith(name)
    with open(os.path.join(config.corrupt_dir, kept), "rb") as handle:
        assert records[4] in handle.read()  # the record after the damage is kept, not replayed
    assert shared.stats.get(Stat.FILE_DAMAGE) == 1
    assert "failed its checksum" in writer.log()
    assert writer.stop() == 0
