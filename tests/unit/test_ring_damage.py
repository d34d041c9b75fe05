"""Damaged queue-ring records and slots (shm/ring_reader.py): found, set aside, the slot goes on."""
from __future__ import annotations

import random
import struct
import zlib

import pytest

from shm.ring import (
    READ_POS,
    RECORDS_WRITTEN,
    SLOT_HEADER_SIZE,
    WRITE_POS,
    QueueRings,
    RingCorrupt,
    RingReader,
    record_size,
)
from tests.unit.test_shm_ring import drain, rings_factory


@pytest.fixture
def make_rings(tmp_path):
    with rings_factory(tmp_path) as make:
        yield make


def data_offset(rings: QueueRings, slot: int = 0) -> int:
    return rings.layout.slot_base(slot) + SLOT_HEADER_SIZE


def flip(rings: QueueRings, ring_pos: int, slot: int = 0) -> None:
    """Invert one byte of a slot's data area, at ring position ``ring_pos``."""
    at = data_offset(rings, slot) + ring_pos % rings.ring_bytes
    rings.segment.buf[at] ^= 0xFF


def set_length(rings: QueueRings, ring_pos: int, length: int, slot: int = 0) -> None:
    at = data_offset(rings, slot) + ring_pos % rings.ring_bytes
    rings.segment.buf[at:at + 4] = struct.pack("<I", length)


def store_u64(rings: QueueRings, field: int, value: int, slot: int = 0) -> None:
    at = rings.layout.slot_base(slot) + field
    rings.segment.buf[at:at + 8] = struct.pack("<Q", value)


def load_u64(rings: QueueRings, field: int, slot: int = 0) -> int:
    return struct.unpack_from("<Q", rings.segment.buf, rings.layout.slot_base(slot) + field)[0]


def positions_of(sizes: list[int]) -> list[int]:
    """Ring positions of records of these payload sizes appended to an empty ring."""
    out, pos = [], 0
    for size in sizes:
        out.append(pos)
        pos += record_size(size)
    return out


def drain_setting_damage_aside(reader: RingReader) -> tuple[list[bytes], list[bytes]]:
    """The consumer loop the writer runs: commit the good records, skip what is damaged."""
    good: list[bytes] = []
    set_aside: list[bytes] = []
    while True:
        records, end = reader.peek_batch(max_records=5)
        reader.commit(end)
        good.extend(records)
        if records:
            continue
        if reader.damaged_at is None:
            return good, set_aside
        set_aside.append(reader.skip_damaged())


@pytest.mark.parametrize("offset", [8, 8 + 5, 4, 0], ids=["payload-first", "payload", "crc", "len"])
def test_a_damaged_record_is_set_aside_and_the_records_around_it_flow(make_rings, offset):
    rings = make_rings()
    writer, reader = rings.writer(0), rings.reader(0)
    sent = [b"record %d" % n + b"." * n for n in range(6)]
    assert all(writer.append(record) for record in sent)
    bad = positions_of([len(r) for r in sent])[2]
    if offset == 0:
        set_length(rings, bad, len(sent[2]) - 1)  # still fits: only the crc can tell
    else:
        flip(rings, bad + offset)
    stored = rings.segment.buf[data_offset(rings) + bad:data_offset(rings) + bad + 8 + len(sent[2])]

    records, end = reader.peek_batch()
    assert records == sent[:2] and end == bad and reader.damaged_at == bad
    assert reader.skip_damaged() == b""  # the good records are not committed yet: nothing to skip
    reader.commit(end)
    assert reader.peek_batch() == ([], bad) and reader.damaged_at == bad
    assert reader.oldest() is None and reader.damaged_at == bad  # no exception either
    assert reader.depth_records() == 4 and reader.depth_bytes() > 0
    skipped = reader.skip_damaged()
    if offset == 0:
        assert skipped == stored[:-1]  # the header and as many payload bytes as it claims
    else:
        assert skipped == stored  # header and payload as stored
    assert reader.damaged_at is None
    assert reader.peek_batch()[0] == sent[3:]
    assert drain(reader) == sent[3:]
    assert reader.depth_records() == 0 and reader.depth_bytes() == 0


@pytest.mark.parametrize("length", [200, 0xFFFFFFF0], ids=["past-write-pos", "over-capacity"])
def test_an_impossible_length_sets_everything_to_the_write_position_aside(make_rings, length):
    rings = make_rings()
    writer, reader = rings.writer(0), rings.reader(0)
    sent = [b"first", b"second", b"third", b"fourth"]
    assert all(writer.append(record) for record in sent)
    bad = positions_of([len(r) for r in sent])[1]
    set_length(rings, bad, length)
    records, end = reader.peek_batch()
    assert records == [b"first"] and reader.damaged_at == bad
    reader.commit(end)
    skipped = reader.skip_damaged()
    assert len(skipped) == writer.write_pos - bad
    assert skipped[8:14] == b"second" and skipped.endswith(b"fourth" + bytes(2))
    assert reader.depth_bytes() == 0 and reader.depth_records() == 0
    assert writer.append(b"fifth")
    assert drain(reader) == [b"fifth"]


def test_a_record_running_past_the_write_position_is_damaged_even_if_its_crc_matches(make_rings):
    rings = make_rings()
    writer, reader = rings.writer(0), rings.reader(0)
    assert writer.append(b"abc") and writer.append(b"unpublished")
    store_u64(rings, WRITE_POS, record_size(3))  # as if the second were not published yet
    data = data_offset(rings)
    claimed = rings.segment.buf[data + 8:data + 8 + 16]  # runs 8 bytes past write_pos
    rings.segment.buf[data:data + 8] = struct.pack("<II", 16, zlib.crc32(claimed))
    assert reader.peek_batch() == ([], 0) and reader.damaged_at == 0
    assert reader.skip_damaged() == struct.pack("<II", 16, zlib.crc32(claimed)) + b"abc" + bytes(5)


def test_a_damaged_record_that_wraps_is_found_and_set_aside_whole(make_rings):
    rings = make_rings(ring_bytes=64)
    writer, reader = rings.writer(0), rings.reader(0)
    assert writer.append(b"x" * 36)
    reader.commit(reader.peek_batch()[1])  # the next record starts at 48
    wrapped = bytes(range(40))  # header at 48..56, payload 56..64 then 0..32
    assert writer.append(wrapped)
    flip(rings, 64 + 20)  # a byte after the wrap
    assert reader.peek_batch() == ([], 48) and reader.damaged_at == 48
    damaged = wrapped[:28] + bytes([wrapped[28] ^ 0xFF]) + wrapped[29:]
    assert reader.skip_damaged() == struct.pack("<II", 40, zlib.crc32(wrapped)) + damaged
    assert writer.append(b"next")
    assert drain(reader) == [b"next"]


def test_commit_refuses_to_pass_a_damaged_record(make_rings):
    rings = make_rings()
    writer, reader = rings.writer(0), rings.reader(0)
    for record in (b"one", b"two"):
        writer.append(record)
    flip(rings, 8)
    with pytest.raises(ValueError):
        reader.commit(writer.write_pos)
    assert reader.peek_batch()[0] == [] and reader.damaged_at == 0


def test_random_damage_never_delivers_a_wrong_record_nor_stops_the_slot(make_rings):
    rng = random.Random(11)
    for _round in range(200):
        rings = make_rings(ring_bytes=256)
        writer, reader = rings.writer(0), rings.reader(0)
        # Distinct records without zero bytes (8 zero bytes read as an intact empty record).
        sent = [bytes([n + 1]) * rng.randrange(1, 40) for n in range(rng.randrange(1, 9))]
        sent = [record for record in sent if writer.append(record)]
        for _ in range(rng.randrange(1, 4)):
            flip(rings, rng.randrange(writer.write_pos))
        good, set_aside = drain_setting_damage_aside(reader)
        assert all(set_aside) and (set_aside or good == sent)  # a flip may hit only padding
        order = [sent.index(record) for record in good]  # ValueError for a record never sent
        assert order == sorted(set(order))
        assert reader.depth_bytes() == 0
        assert writer.append(b"after") and drain(reader) == [b"after"]
        rings.close()


def test_damaged_positions_raise_until_reset_and_a_live_writer_goes_on(make_rings):
    rings = make_rings(ring_bytes=256)
    writer, reader = rings.writer(0), rings.reader(0)
    sent = [b"waiting %d" % n for n in range(3)]
    assert all(writer.append(record) for record in sent)
    store_u64(rings, READ_POS, 10_000)  # ahead of the write position
    for call in (reader.peek_batch, reader.oldest, reader.skip_damaged, lambda: rings.writer(0)):
        with pytest.raises(RingCorrupt):
            call()
    # The live writer does not believe the impossible read position: it refuses, never overwrites.
    while writer.append(b"more"):
        pass
    assert writer.write_pos <= 256
    evidence = reader.reset_damaged_slot()
    assert len(evidence) == 256 and all(record in evidence for record in sent)
    assert load_u64(rings, READ_POS) == writer.write_pos
    assert reader.peek_batch()[0] == [] and reader.depth_records() == 0
    assert writer.append(b"after the reset")
    assert drain(reader) == [b"after the reset"]
    assert rings.writer(0).append(b"a new writer too") and drain(reader) == [b"a new writer too"]


def test_reset_refuses_a_slot_that_is_not_damaged(make_rings):
    rings = make_rings()
    rings.writer(0).append(b"keep me")
    with pytest.raises(ValueError):
        rings.reader(0).reset_damaged_slot()
    assert drain(rings.reader(0)) == [b"keep me"]


def test_a_damaged_write_position_is_reset_and_the_live_writer_republishes_its_own(make_rings):
    rings = make_rings(ring_bytes=256)
    writer, reader = rings.writer(0), rings.reader(0)
    writer.append(b"before")
    store_u64(rings, WRITE_POS, 1 << 40)
    with pytest.raises(RingCorrupt):
        reader.peek_batch()
    reader.reset_damaged_slot()
    assert reader.peek_batch()[0] == []
    assert writer.append(b"next")  # republishes its own, lower write position
    with pytest.raises(RingCorrupt):
        reader.peek_batch()
    reader.reset_damaged_slot()  # a second reset adopts the writer's position
    assert writer.append(b"flows")
    assert drain(reader) == [b"flows"]


def test_a_full_writer_adopts_a_reset_write_position_ahead_of_its_own(make_rings):
    rings = make_rings(ring_bytes=64)
    writer, reader = rings.writer(0), rings.reader(0)
    assert writer.append(b"f" * 56) and not writer.append(b"")  # full
    store_u64(rings, WRITE_POS, 1 << 40)
    reader.reset_damaged_slot()
    assert writer.append(b"room again")  # it would otherwise refuse forever
    assert writer.write_pos == (1 << 40) + record_size(10)
    assert drain(reader) == [b"room again"]


def test_a_write_position_off_the_record_grid_is_reset_onto_it(make_rings):
    rings = make_rings()
    writer, reader = rings.writer(0), rings.reader(0)
    writer.append(b"one")
    store_u64(rings, WRITE_POS, writer.write_pos + 4)
    with pytest.raises(RingCorrupt):
        reader.peek_batch()
    reader.reset_damaged_slot()
    assert load_u64(rings, WRITE_POS) == load_u64(rings, READ_POS) == writer.write_pos
    assert load_u64(rings, RECORDS_WRITTEN) == 1 and reader.depth_records() == 0
    assert writer.append(b"two") and drain(reader) == [b"two"]
