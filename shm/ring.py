"""Prediction queue rings: one single-producer, single-consumer byte ring per worker slot.

Every HTTP worker appends each prediction record (opaque bytes) to the ring of its slot; the
writer process drains all rings into Postgres and advances a ring's read position only after
the batch is committed, so a record is delivered at least once. A worker that dies leaves its
ring behind; the worker that replaces it continues after the same write position, and what
the dead one published is drained, not lost.

Guarantees and limits:

- One producer per slot and one consumer per segment at a time; neither side takes a lock.
  Two producers on one slot corrupt it. Not thread safe.
- Publication relies on store order: the record bytes are written first, then ``write_pos``
  with one aligned 8-byte store (slice assignment of a packed u64), and the consumer loads
  ``write_pos`` before the records. x86-64 keeps stores (and loads) in program order; on a
  weakly ordered CPU (arm64) pure Python has no memory fence to offer.
- ``append`` never blocks: it returns False when the record does not fit (the caller spills).
- Create ``RingWriter`` / ``RingReader`` in the process that uses them (after any fork): they
  cache positions.
"""
from __future__ import annotations

import os
import struct
from typing import Final, NamedTuple

from shm.segment import (
    COMMON_HEADER_SIZE,
    DEFAULT_DIRECTORY,
    Segment,
    SegmentBacked,
    SegmentError,
    built_over_attached,
    built_over_new,
)

MAGIC: Final = b"SIRAQRNG"
LAYOUT_VERSION: Final = 1
DEFAULT_RING_BYTES: Final = 4 * 1024 * 1024
DEFAULT_BATCH_RECORDS: Final = 1000
DEFAULT_BATCH_BYTES: Final = 1024 * 1024

SPECIFIC_HEADER_SIZE: Final = 64
SLOT_HEADER_SIZE: Final = 128
RING_ALIGN: Final = 64
RECORD_HEADER_SIZE: Final = 4
MAX_RING_BYTES: Final = 1 << 31

# Offsets inside one slot header. Producer fields share one cache line, consumer fields another.
WRITE_POS: Final = 0
RECORDS_WRITTEN: Final = 8
PRODUCER_EPOCH: Final = 16
PRODUCER_PID: Final = 24
READ_POS: Final = 64
RECORDS_READ: Final = 72

_RINGS_HEADER = struct.Struct("<IIQQ")  # slots, reserved, ring bytes, slot stride
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class RingCorrupt(SegmentError):
    """A ring's positions or record lengths are impossible: the bytes were damaged."""


class RingLayout(NamedTuple):
    """Where each slot of a rings segment lives; parsed from and checked against a segment."""

    slots: int
    ring_bytes: int
    data_start: int

    @property
    def slot_stride(self) -> int:
        """Bytes from one slot header to the next."""
        return SLOT_HEADER_SIZE + self.ring_bytes

    def slot_base(self, slot: int) -> int:
        """Offset of a slot's header; raises IndexError for a slot that does not exist."""
        if not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} outside [0, {self.slots})")
        return self.data_start + slot * self.slot_stride

    @classmethod
    def of(cls, segment: Segment) -> RingLayout:
        """Read the layout from a segment's own header, checking every size against the file."""
        if segment.buf[:len(MAGIC)] != MAGIC or segment.version != LAYOUT_VERSION:
            raise SegmentError(f"segment {segment.path} is not a rings segment of layout "
                               f"version {LAYOUT_VERSION}")
        header = segment.specific_header
        if len(header) != SPECIFIC_HEADER_SIZE:
            raise SegmentError(f"segment {segment.path}: rings header is {len(header)} bytes, "
                               f"expected {SPECIFIC_HEADER_SIZE}")
        slots, _reserved, ring_bytes, stride = _RINGS_HEADER.unpack_from(header, 0)
        _check_ring_bytes(ring_bytes, SegmentError)
        layout = cls(slots, ring_bytes, segment.header_size)
        if slots < 1 or stride != layout.slot_stride:
            raise SegmentError(f"segment {segment.path}: {slots} slots of stride {stride} "
                               f"do not match ring size {ring_bytes}: corrupt")
        if segment.size != layout.data_start + slots * stride:
            raise SegmentError(f"segment {segment.path} is {segment.size} bytes, its header "
                               f"says {layout.data_start + slots * stride}: corrupt")
        return layout


def segment_size(slots: int, ring_bytes: int) -> int:
    """Total bytes of a rings segment, headers included."""
    return COMMON_HEADER_SIZE + SPECIFIC_HEADER_SIZE + slots * (SLOT_HEADER_SIZE + ring_bytes)


def record_size(payload_bytes: int) -> int:
    """Ring bytes one record occupies: u32 length + payload, rounded up to 4 bytes."""
    return (payload_bytes + RECORD_HEADER_SIZE + 3) & ~3


class QueueRings(SegmentBacked):
    """One segment holding ``slots`` rings of ``ring_bytes`` each.

    Binary layout (all integers little-endian, offsets in bytes)::

        0 .. 64     common segment header (shm.segment): magic b"SIRAQRNG", layout version 1
        64 .. 128   rings header: slots u32 | reserved u32 | ring_bytes u64 | slot stride u64 | 0..
        128 ..      slot 0, slot 1, ... each ``128 + ring_bytes`` bytes (64-byte aligned)

        one slot:
        0        8          16        24       28          64        72         80        128
        +--------+----------+---------+--------+-----------+---------+----------+---------+
        |write   |records   |producer |producer| reserved  |read     |records   | reserved|
        |pos u64 |written   |epoch u64|pid u32 |           |pos u64  |read u64  |         |
        +--------+----------+---------+--------+-----------+---------+----------+---------+
        |<---- written by the producer only ------------->|<-- by the consumer only ----->|
        128 .. 128 + ring_bytes   data area

        one record, at data offset ``pos % ring_bytes`` (always 4-byte aligned):
        +----------+------------------+---------+
        | len u32  | payload len bytes| pad 0-3 |   occupies record_size(len) bytes
        +----------+------------------+---------+

    ``write_pos`` and ``read_pos`` are byte offsets that only grow (never wrap); the bytes in
    ``[read_pos, write_pos)`` are the unconsumed records and ``write_pos - read_pos <=
    ring_bytes``. Wrap-around is a split copy: a payload that reaches the end of the data area
    continues at its start. ``ring_bytes`` is a multiple of 64, so the 4-byte length never
    straddles the end. ``records written`` is bumped just before ``write_pos`` and ``records
    read`` at commit, so their difference is the depth in records (approximate: off by one
    while an append is in flight or after a producer died between the two stores).
    ``producer epoch`` counts the producers that took the slot and ``producer pid`` names the
    last one.

    Ownership follows ``Segment``: ``create`` owns the file and unlinks it, ``attach`` maps it.
    """

    def __init__(self, segment: Segment) -> None:
        """Wrap a mapped rings segment; use ``create`` or ``attach`` instead."""
        self.segment = segment
        self.layout = RingLayout.of(segment)

    @classmethod
    def create(cls, name: str, slots: int, ring_bytes: int = DEFAULT_RING_BYTES,
               directory: str = DEFAULT_DIRECTORY) -> QueueRings:
        """Create a zeroed segment of ``slots`` empty rings of ``ring_bytes`` each."""
        if slots < 1:
            raise ValueError(f"slots must be at least 1, not {slots}")
        _check_ring_bytes(ring_bytes, ValueError)
        header = _RINGS_HEADER.pack(slots, 0, ring_bytes, SLOT_HEADER_SIZE + ring_bytes)
        header += bytes(SPECIFIC_HEADER_SIZE - len(header))
        segment = Segment.create(name, segment_size(slots, ring_bytes), MAGIC, LAYOUT_VERSION,
                                 directory=directory, header=header)
        return built_over_new(segment, cls)

    @classmethod
    def attach(cls, name: str, directory: str = DEFAULT_DIRECTORY) -> QueueRings:
        """Map an existing rings segment after checking magic, version and sizes."""
        segment = Segment.attach(name, MAGIC, LAYOUT_VERSION, directory=directory)
        return built_over_attached(segment, cls)

    @property
    def slots(self) -> int:
        """Number of rings (worker slots)."""
        return self.layout.slots

    @property
    def ring_bytes(self) -> int:
        """Capacity of each ring's data area in bytes."""
        return self.layout.ring_bytes

    def writer(self, slot: int) -> RingWriter:
        """The producer side of one slot, continuing after its current write position."""
        return RingWriter(self.segment, slot)

    def reader(self, slot: int) -> RingReader:
        """The consumer side of one slot."""
        return RingReader(self.segment, slot)


class RingWriter:
    """The single producer of one slot: appends records without blocking."""

    def __init__(self, segment: Segment, slot: int, pid: int | None = None) -> None:
        """Take over the slot: continue after its write position and record this producer."""
        layout = RingLayout.of(segment)
        base = layout.slot_base(slot)
        self._buf = segment.buf
        self._capacity = layout.ring_bytes
        self._data = base + SLOT_HEADER_SIZE
        self._data_end = self._data + layout.ring_bytes
        self._write_pos_at = base + WRITE_POS
        self._records_written_at = base + RECORDS_WRITTEN
        self._read_pos_at = base + READ_POS
        self.slot = slot
        self._write_pos = _load_u64(self._buf, self._write_pos_at)
        self._records_written = _load_u64(self._buf, self._records_written_at)
        self._read_pos_seen = _load_u64(self._buf, self._read_pos_at)
        _check_positions(self._read_pos_seen, self._write_pos, self._capacity, segment, slot)
        self._claim(base, os.getpid() if pid is None else pid)

    def _claim(self, base: int, pid: int) -> None:
        """Bump the producer epoch and record our pid, so the consumer can tell who writes."""
        epoch = _load_u64(self._buf, base + PRODUCER_EPOCH) + 1
        self._buf[base + PRODUCER_PID:base + PRODUCER_PID + 4] = _U32.pack(pid & 0xFFFFFFFF)
        self._buf[base + PRODUCER_EPOCH:base + PRODUCER_EPOCH + 8] = _U64.pack(epoch)
        self.epoch = epoch

    @property
    def max_record_bytes(self) -> int:
        """The largest payload that can ever fit (in an empty ring)."""
        return self._capacity - RECORD_HEADER_SIZE

    def append(self, record: bytes) -> bool:
        """Publish one record; False (nothing written) when it does not fit now.

        A payload over ``max_record_bytes`` never fits and also returns False: the caller
        spills it like any record that finds the ring full.
        """
        n = len(record)
        size = (n + RECORD_HEADER_SIZE + 3) & ~3
        pos = self._write_pos
        if pos + size - self._read_pos_seen > self._capacity:
            # Our cached read position is stale only in the safe direction; reload it.
            self._read_pos_seen = _load_u64(self._buf, self._read_pos_at)
            if pos + size - self._read_pos_seen > self._capacity:
                return False
        buf = self._buf
        at = self._data + pos % self._capacity
        end = at + RECORD_HEADER_SIZE + n
        if end <= self._data_end:
            buf[at:end] = _U32.pack(n) + record
        else:
            self._write_split(at, n, record)
        pos += size
        self._write_pos = pos
        self._records_written += 1
        buf[self._records_written_at:self._records_written_at + 8] = _U64.pack(
            self._records_written)
        # Publish: one aligned 8-byte store, after the record bytes.
        buf[self._write_pos_at:self._write_pos_at + 8] = _U64.pack(pos)
        return True

    def _write_split(self, at: int, n: int, record: bytes) -> None:
        """Write a record whose payload runs past the end of the data area: wrap to its start."""
        buf = self._buf
        first = self._data_end - at - RECORD_HEADER_SIZE
        buf[at:at + RECORD_HEADER_SIZE] = _U32.pack(n)
        view = memoryview(record)
        buf[at + RECORD_HEADER_SIZE:self._data_end] = view[:first]
        buf[self._data:self._data + n - first] = view[first:]

    def free_bytes(self) -> int:
        """Ring bytes free right now (a record needs ``record_size(len)`` of them)."""
        self._read_pos_seen = _load_u64(self._buf, self._read_pos_at)
        return self._capacity - (self._write_pos - self._read_pos_seen)

    @property
    def write_pos(self) -> int:
        """The byte offset after the last published record."""
        return self._write_pos


class RingReader:
    """The single consumer of one slot: peeks batches and commits them once they are durable."""

    def __init__(self, segment: Segment, slot: int) -> None:
        """Attach to a slot; reading starts at its committed read position."""
        layout = RingLayout.of(segment)
        base = layout.slot_base(slot)
        self._segment = segment
        self._buf = segment.buf
        self._capacity = layout.ring_bytes
        self._data = base + SLOT_HEADER_SIZE
        self._data_end = self._data + layout.ring_bytes
        self._base = base
        self.slot = slot
        self._peeked_end = -1
        self._peeked_count = 0

    def _positions(self) -> tuple[int, int]:
        """Committed read position then published write position, both checked."""
        read_pos = _load_u64(self._buf, self._base + READ_POS)
        write_pos = _load_u64(self._buf, self._base + WRITE_POS)
        _check_positions(read_pos, write_pos, self._capacity, self._segment, self.slot)
        return read_pos, write_pos

    def _record_at(self, pos: int, write_pos: int) -> tuple[int, int]:
        """(data offset of the payload, payload length) of the record at ``pos``, checked."""
        at = self._data + pos % self._capacity
        (n,) = _U32.unpack_from(self._buf, at)
        if pos + ((n + RECORD_HEADER_SIZE + 3) & ~3) > write_pos:
            raise RingCorrupt(f"{self._segment.path} slot {self.slot}: record of {n} bytes at "
                              f"{pos} runs past write position {write_pos}")
        return at + RECORD_HEADER_SIZE, n

    def peek_batch(self, max_records: int = DEFAULT_BATCH_RECORDS,
                   max_bytes: int = DEFAULT_BATCH_BYTES) -> tuple[list[bytes], int]:
        """Copy out the oldest unconsumed records without consuming them.

        Returns the records (at most ``max_records``, payload bytes at most ``max_bytes`` but
        always at least one record when any is there) and the position to ``commit``.
        """
        pos, write_pos = self._positions()
        records: list[bytes] = []
        total = 0
        while pos < write_pos and len(records) < max_records:
            start, n = self._record_at(pos, write_pos)
            if records and total + n > max_bytes:
                break
            records.append(self._copy_payload(start, n))
            total += n
            pos += (n + RECORD_HEADER_SIZE + 3) & ~3
        self._peeked_end, self._peeked_count = pos, len(records)
        return records, pos

    def _copy_payload(self, start: int, n: int) -> bytes:
        """The payload bytes, joining the two parts of a record that wrapped."""
        end = start + n
        if end <= self._data_end:
            return self._buf[start:end]
        return self._buf[start:self._data_end] + self._buf[self._data:end - self._capacity]

    def oldest(self) -> bytes | None:
        """The oldest unconsumed record (e.g. to read the timestamp the app put in it)."""
        records, _end = self.peek_batch(1, 0)
        return records[0] if records else None

    def commit(self, end_pos: int) -> None:
        """Consume every record before ``end_pos``; call only once they are durable."""
        read_pos, write_pos = self._positions()
        if not read_pos <= end_pos <= write_pos:
            raise ValueError(f"commit position {end_pos} outside [{read_pos}, {write_pos}]")
        if end_pos == self._peeked_end:
            count = self._peeked_count
        else:
            count = self._count_records(read_pos, end_pos, write_pos)
        base = self._base
        records_read = _load_u64(self._buf, base + RECORDS_READ) + count
        self._buf[base + RECORDS_READ:base + RECORDS_READ + 8] = _U64.pack(records_read)
        self._buf[base + READ_POS:base + READ_POS + 8] = _U64.pack(end_pos)
        self._peeked_end = -1

    def _count_records(self, pos: int, end_pos: int, write_pos: int) -> int:
        """Records in ``[pos, end_pos)``; ``end_pos`` must fall on a record boundary."""
        count = 0
        while pos < end_pos:
            _start, n = self._record_at(pos, write_pos)
            pos += (n + RECORD_HEADER_SIZE + 3) & ~3
            count += 1
        if pos != end_pos:
            raise ValueError(f"commit position {end_pos} is not on a record boundary")
        return count

    def depth_bytes(self) -> int:
        """Ring bytes waiting to be consumed (record headers and padding included)."""
        read_pos = _load_u64(self._buf, self._base + READ_POS)  # first: it only grows
        return _load_u64(self._buf, self._base + WRITE_POS) - read_pos

    def depth_records(self) -> int:
        """Records waiting to be consumed (approximate, see ``QueueRings``)."""
        records_read = _load_u64(self._buf, self._base + RECORDS_READ)
        return max(0, _load_u64(self._buf, self._base + RECORDS_WRITTEN) - records_read)

    def producer(self) -> tuple[int, int]:
        """(pid, epoch) of the last producer that took this slot; (0, 0) if none ever did."""
        pid = _U32.unpack_from(self._buf, self._base + PRODUCER_PID)[0]
        return pid, _load_u64(self._buf, self._base + PRODUCER_EPOCH)


def _load_u64(buf: object, offset: int) -> int:
    """One aligned 8-byte load."""
    return _U64.unpack_from(buf, offset)[0]


def _check_positions(read_pos: int, write_pos: int, capacity: int, segment: Segment,
                     slot: int) -> None:
    """Raise RingCorrupt unless ``read_pos <= write_pos <= read_pos + capacity``."""
    if not read_pos <= write_pos <= read_pos + capacity:
        raise RingCorrupt(f"{segment.path} slot {slot}: read position {read_pos} and write "
                          f"position {write_pos} are impossible for a {capacity}-byte ring")


def _check_ring_bytes(ring_bytes: int, error: type[Exception]) -> None:
    """Ring sizes are positive multiples of 64 below 2 GiB (lengths are u32)."""
    if not 0 < ring_bytes < MAX_RING_BYTES or ring_bytes % RING_ALIGN:
        raise error(f"ring_bytes {ring_bytes} must be a positive multiple of {RING_ALIGN} "
                    f"below {MAX_RING_BYTES}")
