"""Unit tests of the prediction queue rings (shm/ring.py), one process."""
from __future__ import annotations

import collections
import contextlib
import os
import random
import struct
import zlib
from collections.abc import Callable, Iterator

import pytest

from shm.ring import (
    MAGIC,
    READ_POS,
    SLOT_HEADER_SIZE,
    WRITE_POS,
    QueueRings,
    RingCorrupt,
    RingReader,
    RingWriter,
    record_size,
)
from shm.segment import Segment, SegmentError


@contextlib.contextmanager
def rings_factory(directory) -> Iterator[Callable[..., QueueRings]]:
    """Create rings segments in ``directory``; close and unlink every one afterwards."""
    created: list[QueueRings] = []

    def make(slots: int = 2, ring_bytes: int = 1024) -> QueueRings:
        rings = QueueRings.create(f"rings{len(created)}", slots, ring_bytes,
                                  directory=str(directory))
        created.append(rings)
        return rings

    try:
        yield make
    finally:
        for rings in created:
            rings.close()
            rings.unlink()
        assert not [name for name in os.listdir(directory) if name.startswith("rings")]


@pytest.fixture
def make_rings(tmp_path):
    """``rings_factory`` over tmp_path (test_ring_damage and test_ring_search use it too)."""
    with rings_factory(tmp_path) as make:
        yield make


def drain(reader: RingReader) -> list[bytes]:
    """Consume everything in a ring, batch by batch."""
    out: list[bytes] = []
    while True:
        records, end = reader.peek_batch(max_records=7)
        if not records:
            return out
        reader.commit(end)
        out.extend(records)


def slot_base(rings: QueueRings, slot: int) -> int:
    return rings.layout.slot_base(slot)


def data_offset(rings: QueueRings, slot: int) -> int:
    """Segment offset of a slot's data area."""
    return slot_base(rings, slot) + SLOT_HEADER_SIZE


def test_round_trip_preserves_records_and_order(make_rings):
    rings = make_rings()
    writer, reader = rings.writer(0), rings.reader(0)
    sent = [b"", b"a", b"hello world", bytes(range(256))]
    assert all(writer.append(record) for record in sent)
    assert reader.depth_records() == 4
    assert reader.depth_bytes() == sum(record_size(len(r)) for r in sent)
    records, end = reader.peek_batch()
    assert records == sent
    reader.commit(end)
    assert reader.depth_bytes() == 0 and reader.depth_records() == 0
    assert reader.peek_batch() == ([], end)


def test_slots_are_independent(make_rings):
    rings = make_rings(slots=3)
    for slot in range(3):
        assert rings.writer(slot).append(f"slot {slot}".encode())
    for slot in range(3):
        assert drain(rings.reader(slot)) == [f"slot {slot}".encode()]
    with pytest.raises(IndexError):
        rings.writer(3)


def test_wraps_around_many_times_with_varied_sizes(make_rings):
    rings = make_rings(ring_bytes=256)
    writer, reader = rings.writer(0), rings.reader(0)
    rng = random.Random(7)
    expected: collections.deque[bytes] = collections.deque()
    received = []
    for number in range(5000):
        record = bytes([number % 251]) * rng.randrange(0, 120)
        while not writer.append(record):
            records, end = reader.peek_batch(max_records=rng.randrange(1, 4))
            reader.commit(end)
            received.extend(records)
        expected.append(record)
        assert reader.depth_records() == len(expected) - len(received)
    received.extend(drain(reader))
    assert received == list(expected)
    assert writer.write_pos > 100 * 256  # the ring wrapped at least 100 times


def test_record_split_across_the_end_round_trips(make_rings):
    rings = make_rings(ring_bytes=64)
    writer, reader = rings.writer(0), rings.reader(0)
    assert writer.append(b"x" * 36)  # 44 bytes, 48 with padding: the next record starts at 48
    reader.commit(reader.peek_batch()[1])
    wrapped = bytes(range(50))  # header at 48..56, payload wraps after 8 bytes
    assert writer.append(wrapped)
    assert reader.peek_batch()[0] == [wrapped]
    assert reader.damaged_at is None


def test_header_at_the_very_end_and_payload_at_the_start_round_trip(make_rings):
    rings = make_rings(ring_bytes=64)
    writer, reader = rings.writer(0), rings.reader(0)
    data = data_offset(rings, 0)
    assert writer.append(b"x" * 48)  # 56 bytes: the next header fills 56..64 exactly
    reader.commit(reader.peek_batch()[1])
    assert writer.append(b"after the wrap")
    assert struct.unpack_from("<II", rings.segment.buf, data + 56) == (
        14, zlib.crc32(b"after the wrap"))  # the header whole at the end...
    assert rings.segment.buf[data:data + 14] == b"after the wrap"  # ...the payload at the start
    assert drain(reader) == [b"after the wrap"] and reader.damaged_at is None
    assert writer.append(b"y" * 32)  # 80 + 40: the next record starts at 120, 56 in the ring
    assert writer.append(b"")  # an empty record that ends exactly at the end
    assert struct.unpack_from("<II", rings.segment.buf, data + 56) == (0, zlib.crc32(b""))
    assert drain(reader) == [b"y" * 32, b""] and reader.damaged_at is None


def test_full_ring_refuses_and_loses_nothing(make_rings):
    rings = make_rings(ring_bytes=256)
    writer, reader = rings.writer(0), rings.reader(0)
    sent = []
    while writer.append(b"%04d" % len(sent) + b"." * 20):
        sent.append(b"%04d" % len(sent) + b"." * 20)
    assert len(sent) == 256 // record_size(24)
    assert writer.free_bytes() < record_size(24)
    assert not writer.append(b"more" + b"." * 20)
    records, end = reader.peek_batch(max_records=1)
    reader.commit(end)
    assert writer.append(b"late")
    assert records + drain(reader) == sent + [b"late"]


def test_record_larger_than_ring_is_refused(make_rings):
    rings = make_rings(ring_bytes=64)
    writer = rings.writer(0)
    assert writer.max_record_bytes == 56  # 64 minus the 8-byte header
    assert not writer.append(b"x" * 57)
    assert writer.append(b"x" * 56)
    assert drain(rings.reader(0)) == [b"x" * 56]


def test_peek_without_commit_rereads_the_same_records(make_rings):
    rings = make_rings()
    writer, reader = rings.writer(0), rings.reader(0)
    for number in range(10):
        writer.append(b"record %d" % number)
    first, end = reader.peek_batch(max_records=4)
    assert reader.peek_batch(max_records=4) == (first, end)
    # A consumer that died before commit: its successor re-reads the same batch.
    successor = QueueRings.attach(rings.segment.name, os.path.dirname(rings.segment.path))
    try:
        assert successor.reader(0).peek_batch(max_records=4) == (first, end)
    finally:
        successor.close()
    reader.commit(end)
    assert reader.peek_batch(max_records=1)[0] == [b"record 4"]


def test_batch_limits_and_oversized_first_record(make_rings):
    rings = make_rings()
    writer, reader = rings.writer(0), rings.reader(0)
    for size in (100, 10, 10, 10):
        writer.append(b"y" * size)
    records, _end = reader.peek_batch(max_records=10, max_bytes=50)
    assert [len(r) for r in records] == [100]  # always at least one record
    reader.commit(_end)
    records, _end = reader.peek_batch(max_records=10, max_bytes=25)
    assert [len(r) for r in records] == [10, 10]
    records, _end = reader.peek_batch(max_records=0)
    assert records == []


def test_oldest_returns_first_unconsumed_record(make_rings):
    rings = make_rings()
    writer, reader = rings.writer(0), rings.reader(0)
    assert reader.oldest() is None
    writer.append(b"first")
    writer.append(b"second")
    assert reader.oldest() == b"first"
    assert reader.depth_records() == 2


def test_commit_of_a_prefix_counts_its_records(make_rings):
    rings = make_rings()
    writer, reader = rings.writer(0), rings.reader(0)
    for number in range(5):
        writer.append(b"n%d" % number)
    _records, end = reader.peek_batch()
    reader.commit(2 * record_size(2))
    assert reader.depth_records() == 3
    assert reader.peek_batch() == ([b"n2", b"n3", b"n4"], end)


def test_commit_rejects_impossible_positions(make_rings):
    rings = make_rings()
    writer, reader = rings.writer(0), rings.reader(0)
    writer.append(b"abc")
    _records, end = reader.peek_batch()
    with pytest.raises(ValueError):
        reader.commit(end + 8)
    with pytest.raises(ValueError):
        reader.commit(2)  # not a record boundary
    reader.commit(end)
    with pytest.raises(ValueError):
        reader.commit(0)  # behind the read position


def test_new_writer_continues_after_the_old_one(make_rings):
    rings = make_rings()
    reader = rings.reader(0)
    old = RingWriter(rings.segment, 0, pid=1111)
    assert old.epoch == 1 and reader.producer() == (1111, 1)
    old.append(b"from the dead worker 1")
    old.append(b"from the dead worker 2")
    replacement = RingWriter(rings.segment, 0, pid=2222)
    assert replacement.write_pos == old.write_pos
    assert reader.producer() == (2222, 2)
    replacement.append(b"from the replacement")
    assert drain(reader) == [b"from the dead worker 1", b"from the dead worker 2",
                             b"from the replacement"]


def test_new_writer_sees_space_freed_before_it_started(make_rings):
    rings = make_rings(ring_bytes=64)
    reader = rings.reader(0)
    assert rings.writer(0).append(b"z" * 50)
    reader.commit(reader.peek_batch()[1])
    replacement = rings.writer(0)
    assert replacement.free_bytes() == 64
    assert replacement.append(b"w" * 50)
    assert drain(reader) == [b"w" * 50]


def test_impossible_positions_raise_ring_corrupt(make_rings):
    rings = make_rings(ring_bytes=256)
    base = slot_base(rings, 0)
    rings.segment.buf[base + WRITE_POS:base + WRITE_POS + 8] = struct.pack("<Q", 257)
    with pytest.raises(RingCorrupt):
        rings.reader(0).peek_batch()
    with pytest.raises(RingCorrupt):
        rings.writer(0)
    rings.segment.buf[base + READ_POS:base + READ_POS + 8] = struct.pack("<Q", 300)
    with pytest.raises(RingCorrupt):
        rings.reader(0).peek_batch()


def test_attach_rejects_bad_magic(make_rings):
    rings = make_rings()
    rings.segment.buf[0:8] = b"NOTARING"
    with pytest.raises(SegmentError):
        QueueRings.attach(rings.segment.name, os.path.dirname(rings.segment.path))
    rings.segment.buf[0:8] = MAGIC


def test_attach_rejects_a_header_that_disagrees_with_the_size(make_rings):
    rings = make_rings(slots=2, ring_bytes=128)
    rings.segment.buf[64:68] = struct.pack("<I", 3)  # claims 3 slots
    with pytest.raises(SegmentError):
        QueueRings.attach(rings.segment.name, os.path.dirname(rings.segment.path))


def test_attach_sees_the_creators_records(make_rings):
    rings = make_rings(slots=4, ring_bytes=4096)
    rings.writer(2).append(b"shared")
    other = QueueRings.attach(rings.segment.name, os.path.dirname(rings.segment.path))
    try:
        assert (other.slots, other.ring_bytes) == (4, 4096)
        assert drain(other.reader(2)) == [b"shared"]
    finally:
        other.close()


@pytest.mark.parametrize("ring_bytes", [0, 100, -64, 1 << 31])
def test_create_rejects_bad_ring_sizes(tmp_path, ring_bytes):
    with pytest.raises(ValueError):
        QueueRings.create("bad", 1, ring_bytes, directory=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_context_manager_unlinks_the_file(tmp_path):
    with QueueRings.create("ctx", 1, 64, directory=str(tmp_path)) as rings:
        assert rings.writer(0).append(b"x")
    assert os.listdir(tmp_path) == []


def test_writer_refuses_a_segment_of_another_kind(tmp_path):
    with Segment.create("other", 4096, b"SIRAOTHR", 1, directory=str(tmp_path),
                        header=bytes(64)) as other:
        with pytest.raises(SegmentError):
            RingWriter(other, 0)
        with pytest.raises(SegmentError):
            RingReader(other, 0)
