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
  weakly ordered CPU (arm64) pure Python has no memory fence to offer, and a record seen
  before its bytes fails its crc (below) instead of being delivered wrong.
- ``append`` never blocks: it returns False when the record does not fit (the caller spills).
- Create ``RingWriter`` / ``RingReader`` in the process that uses them (after any fork): they
  cache positions.

Damage. Every record carries the crc32 of its payload, so damaged bytes are found rather than
delivered, and one bad record or slot no longer stops the consumer:

- ``peek_batch`` returns only intact records. It stops before the first record whose length is
  impossible (it would run past ``write_pos``) or whose crc does not match, and names it in
  ``damaged_at``; ``commit`` the good ones, then ``skip_damaged`` returns the bad bytes (keep
  them as evidence) and moves past them. crc32 finds accidental damage (any burst of up to
  32 bits, other damage but for about 1 in 2**32), not deliberate forgery. It covers the
  payload only: a damaged length is caught because it runs past ``write_pos`` or because the
  crc of the bytes it delimits does not match.
- After a damaged length, reads may land inside other records until they reach a boundary
  again; eight zero bytes there read as an intact empty record (crc32 of b"" is 0).
  Prediction records are never empty, so a consumer may treat b"" as damage too.
- On arm64 a crc mismatch can also be a record whose bytes are not visible yet: wait a poll
  before skipping (``skip_damaged`` re-checks and skips nothing when the record turned out
  intact).
- Impossible slot positions (read after write, more than a ring apart, off the 8-byte grid)
  raise ``RingCorrupt`` from the reader's calls, per slot, and from ``RingWriter()``;
  ``reset_damaged_slot`` returns the data area and restarts the slot at the published write
  position. What waited in the slot is lost to the consumer (it is in the returned bytes). A
  live producer never trusts an impossible read position, so it spills rather than overwrite.
"""
from __future__ import annotations

import os
import zlib
from typing import Final

from shm.ring_layout import (
    LAYOUT_VERSION,
    MAGIC,
    MAX_RING_BYTES,
    PRODUCER_EPOCH,
    PRODUCER_PID,
    READ_POS,
    RECORD_ALIGN,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RECORDS_READ,
    RECORDS_WRITTEN,
    RING_ALIGN,
    RINGS_HEADER,
    SLOT_HEADER_SIZE,
    SPECIFIC_HEADER_SIZE,
    U32,
    U64,
    WRITE_POS,
    RingCorrupt,
    RingLayout,
    check_positions,
    check_ring_bytes,
    load_u64,
    record_size,
    segment_size,
)
from shm.ring_reader import DEFAULT_BATCH_BYTES, DEFAULT_BATCH_RECORDS, RingReader
from shm.segment import (
    DEFAULT_DIRECTORY,
    Segment,
    SegmentBacked,
    built_over_attached,
    built_over_new,
)

# shm.ring is the public module: the layout and the reader live in siblings, re-exported here.
__all__ = [
    "DEFAULT_BATCH_BYTES", "DEFAULT_BATCH_RECORDS", "DEFAULT_RING_BYTES", "LAYOUT_VERSION",
    "MAGIC", "MAX_RING_BYTES", "PRODUCER_EPOCH", "PRODUCER_PID", "READ_POS", "RECORD_ALIGN",
    "RECORD_HEADER_SIZE", "RECORDS_READ", "RECORDS_WRITTEN", "RING_ALIGN", "SLOT_HEADER_SIZE",
    "SPECIFIC_HEADER_SIZE", "WRITE_POS", "QueueRings", "RingCorrupt", "RingLayout",
    "RingReader", "RingWriter", "record_size", "segment_size",
]

DEFAULT_RING_BYTES: Final = 4 * 1024 * 1024

# Bound once: ``append`` runs for every prediction; the lookups saved cost ~120 ns per call.
_crc32 = zlib.crc32
_pack_header = RECORD_HEADER.pack
_pack_u64 = U64.pack
assert (RECORD_HEADER_SIZE, RECORD_ALIGN) == (8, 8), "RingWriter.append inlines both"


class QueueRings(SegmentBacked):
    """One segment holding ``slots`` rings of ``ring_bytes`` each.

    Binary layout (all integers little-endian, offsets in bytes)::

        0 .. 64     common segment header (shm.segment): magic b"SIRAQRNG", layout version 2
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

        one record, at data offset ``pos % ring_bytes`` (always 8-byte aligned):
        0          4            8                       8 + len
        +----------+------------+-----------------------+---------+
        | len u32  | crc32 u32  | payload, len bytes    | pad 0-7 |   record_size(len) bytes
        +----------+------------+-----------------------+---------+
        crc32 is zlib.crc32(payload); the pad bytes are whatever was there before.

    ``write_pos`` and ``read_pos`` are byte offsets that only grow (never wrap); the bytes in
    ``[read_pos, write_pos)`` are the unconsumed records and ``write_pos - read_pos <=
    ring_bytes``. Wrap-around is a split copy: a payload that reaches the end of the data area
    continues at its start. The 8-byte header is never split: records start on the 8-byte grid
    and ``ring_bytes`` is a multiple of 64 (so of 8), hence a header starting before the end
    ends at the latest exactly there, and its payload (possibly all of it) continues at the
    start. ``records written`` is bumped just before ``write_pos`` and ``records
    read`` at commit, so their difference is the depth in records (approximate: off by one
    while an append is in flight or after a producer died between the two stores; after
    ``skip_damaged`` or ``reset_damaged_slot`` it counts what the bad bytes claimed to hold).
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
        check_ring_bytes(ring_bytes, ValueError)
        header = RINGS_HEADER.pack(slots, 0, ring_bytes, SLOT_HEADER_SIZE + ring_bytes)
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
        """Take over the slot: continue after its write position and record this producer.

        Raises RingCorrupt for a slot whose positions are impossible: the consumer must
        ``reset_damaged_slot`` it first.
        """
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
        self._write_pos = load_u64(self._buf, self._write_pos_at)
        self._records_written = load_u64(self._buf, self._records_written_at)
        self._read_pos_seen = load_u64(self._buf, self._read_pos_at)
        check_positions(self._read_pos_seen, self._write_pos, self._capacity, segment, slot)
        self._claim(base, os.getpid() if pid is None else pid)

    def _claim(self, base: int, pid: int) -> None:
        """Bump the producer epoch and record our pid, so the consumer can tell who writes."""
        epoch = load_u64(self._buf, base + PRODUCER_EPOCH) + 1
        self._buf[base + PRODUCER_PID:base + PRODUCER_PID + 4] = U32.pack(pid & 0xFFFFFFFF)
        self._buf[base + PRODUCER_EPOCH:base + PRODUCER_EPOCH + 8] = U64.pack(epoch)
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
        size = (n + 15) & -8  # record_size(n), inlined: this is the hot path
        pos = self._write_pos
        if pos + size - self._read_pos_seen > self._capacity:
            # Our cached read position is stale only in the safe direction; reload it.
            self._reload_read_pos()
            pos = self._write_pos  # moved if the consumer reset the slot ahead of us
            if pos + size - self._read_pos_seen > self._capacity:
                return False
        buf = self._buf
        at = self._data + pos % self._capacity
        end = at + 8 + n  # 8: RECORD_HEADER_SIZE
        if end <= self._data_end:
            buf[at:end] = _pack_header(n, _crc32(record)) + record
        else:
            self._write_split(at, _pack_header(n, _crc32(record)), record)
        pos += size
        self._write_pos = pos
        self._records_written += 1
        buf[self._records_written_at:self._records_written_at + 8] = _pack_u64(
            self._records_written)
        # Publish: one aligned 8-byte store, after the record bytes.
        buf[self._write_pos_at:self._write_pos_at + 8] = _pack_u64(pos)
        return True

    def _write_split(self, at: int, header: bytes, record: bytes) -> None:
        """Write a record whose payload runs past the end of the data area: wrap to its start.

        The header itself always fits before the end (see ``QueueRings``); the payload part
        before the end may be empty.
        """
        buf = self._buf
        payload_at = at + RECORD_HEADER_SIZE
        first = self._data_end - payload_at
        buf[at:payload_at] = header
        view = memoryview(record)
        buf[payload_at:self._data_end] = view[:first]
        buf[self._data:self._data + len(record) - first] = view[first:]

    def _reload_read_pos(self) -> None:
        """Load the consumer's position, ignoring one that is impossible from where we stand.

        A damaged ``read_pos`` ahead of our write position would make the ring look empty
        forever and let us overwrite unconsumed records; one behind our cached value cannot be
        (it only grows). Either way we keep the last good value, so at worst we refuse (the
        caller spills) until the consumer repairs the slot with ``reset_damaged_slot``.
        """
        read_pos = load_u64(self._buf, self._read_pos_at)
        if self._read_pos_seen <= read_pos <= self._write_pos:
            self._read_pos_seen = read_pos
        elif read_pos > self._write_pos and self._reset_at(read_pos):
            # The consumer reset the slot at a (damaged) write position ahead of ours, and the
            # ring is empty there: continue from it, as a new producer would.
            self._write_pos = self._read_pos_seen = read_pos

    def _reset_at(self, read_pos: int) -> bool:
        """True when the published write position equals ``read_pos``, on the record grid."""
        write_pos = load_u64(self._buf, self._write_pos_at)
        return write_pos == read_pos and not read_pos % RECORD_ALIGN

    def free_bytes(self) -> int:
        """Ring bytes free right now (a record needs ``record_size(len)`` of them)."""
        self._reload_read_pos()
        return self._capacity - (self._write_pos - self._read_pos_seen)

    @property
    def write_pos(self) -> int:
        """The byte offset after the last published record."""
        return self._write_pos
