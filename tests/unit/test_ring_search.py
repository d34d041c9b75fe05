"""find_record (shm/ring_search.py) reads the checksummed record layout, skips damaged records."""
from __future__ import annotations

import struct

import pytest

from shm.ring import READ_POS, WRITE_POS, record_size
from shm.ring_search import find_record
from tests.unit.test_ring_damage import data_offset, flip, store_u64
from tests.unit.test_shm_ring import drain, rings_factory


@pytest.fixture
def make_rings(tmp_path):
    with rings_factory(tmp_path) as make:
        yield make


PREFIX = b'{"prediction_id":"'


def record(number: int, tail: bytes = b"") -> bytes:
    return PREFIX + b"%036d" % number + b'"' + tail


def test_finds_records_with_the_crc_header_including_one_whose_header_ends_the_ring(make_rings):
    rings = make_rings(ring_bytes=256)
    writer, reader = rings.writer(0), rings.reader(0)
    assert writer.append(bytes(240))  # 248 bytes: the next header fills 248..256
    reader.commit(reader.peek_batch()[1])
    sent = [record(1, b"x" * 40), record(2), record(3)]  # the first one's payload at 0
    assert all(writer.append(r) for r in sent)
    for r in sent:
        assert find_record(rings, 0, r[:56]) == r
    assert find_record(rings, 0, record(4)[:56]) is None


def test_a_record_whose_crc_fails_is_not_returned(make_rings):
    rings = make_rings()
    writer = rings.writer(0)
    first, second = record(1, b" original"), record(2)
    assert writer.append(first) and writer.append(second)
    flip(rings, 8 + len(first) - 3)  # a payload byte after the prefix searched for
    assert find_record(rings, 0, first[:56]) is None
    assert find_record(rings, 0, second[:56]) == second


def test_a_damaged_copy_is_passed_over_for_an_intact_one(make_rings):
    rings = make_rings()
    writer = rings.writer(0)
    damaged, intact = record(7, b" first copy"), record(7, b" second copy")
    assert writer.append(damaged) and writer.append(intact)
    flip(rings, 8 + len(damaged) - 1)
    assert find_record(rings, 0, damaged[:56]) == intact
    assert rings.reader(0).peek_batch()[0] == []  # the consumer stops before it as well


def test_a_damaged_length_is_not_trusted(make_rings):
    rings = make_rings()
    writer = rings.writer(0)
    r = record(5, b"tail")
    assert writer.append(r)
    at = data_offset(rings)
    rings.segment.buf[at:at + 4] = struct.pack("<I", len(r) - 4)  # plausible, but wrong
    assert find_record(rings, 0, r[:56]) is None


def test_a_slot_with_impossible_positions_is_not_searched(make_rings):
    rings = make_rings(ring_bytes=256)
    writer = rings.writer(0)
    r = record(9)
    assert writer.append(r)
    store_u64(rings, WRITE_POS, 1 << 20)  # more than a ring ahead of the read position
    assert find_record(rings, 0, r[:56]) is None
    store_u64(rings, WRITE_POS, record_size(len(r)) + 4)  # off the record grid
    assert find_record(rings, 0, r[:56]) is None
    store_u64(rings, WRITE_POS, record_size(len(r)))
    assert find_record(rings, 0, r[:56]) == r
    store_u64(rings, READ_POS, record_size(len(r)))
    assert find_record(rings, 0, r[:56]) is None
    assert drain(rings.reader(0)) == []
