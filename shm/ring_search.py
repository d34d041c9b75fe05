"""Find one record in the unconsumed part of a queue ring, without consuming anything.

Read-your-writes for the prediction log: a record a worker appended a moment ago may still wait in
its ring. ``find_record`` searches ``[read_pos, write_pos)`` of one slot with ``mmap.find`` (C
speed, no copy of the ring) for a payload that starts with a given prefix, and copies out only the
record it found. It never writes to the segment, so any process may search while the producer and
the consumer run.

Races, and why the answer is still right for a record published before the search began:

- ``write_pos`` is loaded before ``read_pos``. Both only grow, so ``write_pos - read_pos`` stays
  within the ring's capacity and the region holds whole records.
- A match is trusted only if, after its bytes were copied, ``read_pos`` has not passed the start of
  its record: until then the producer cannot overwrite it. A record the consumer committed in the
  meantime is reported as not found here; the consumer commits only after the record is durable
  elsewhere, which is where the caller looks next.
- A match is also trusted only if its payload's crc32 matches the record header (layout in
  ``shm.ring.QueueRings``): a damaged record, or one whose bytes are not visible yet on a weakly
  ordered CPU, is never returned, and the search goes on to the next match. A slot whose
  positions are impossible is searched not at all.
"""
from __future__ import annotations

import zlib

from shm.ring import QueueRings
from shm.ring_layout import (
    READ_POS,
    RECORD_ALIGN,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    SLOT_HEADER_SIZE,
    U64,
    WRITE_POS,
    positions_possible,
    record_size,
)


def find_record(rings: QueueRings, slot: int, prefix: bytes) -> bytes | None:
    """The payload of the unconsumed record of ``slot`` that starts with ``prefix``, else None."""
    return _SlotView(rings, slot).find(prefix)


class _SlotView:
    """Read-only positions and bytes of one slot."""

    def __init__(self, rings: QueueRings, slot: int) -> None:
        base = rings.layout.slot_base(slot)
        self.buf = rings.segment.buf
        self.capacity = rings.ring_bytes
        self.data = base + SLOT_HEADER_SIZE
        self.read_pos_at = base + READ_POS
        self.write_pos_at = base + WRITE_POS

    def read_pos(self) -> int:
        return U64.unpack_from(self.buf, self.read_pos_at)[0]

    def find(self, prefix: bytes) -> bytes | None:
        """Search the unconsumed region for a record payload starting with ``prefix``."""
        write_pos = U64.unpack_from(self.buf, self.write_pos_at)[0]  # first, see module doc
        read_pos = self.read_pos()
        if read_pos == write_pos or not prefix:
            return None
        if not positions_possible(read_pos, write_pos, self.capacity):
            return None  # a damaged slot: its positions map to no records
        for payload_pos in self._matches(prefix, read_pos, write_pos):
            record = self._record_at(payload_pos - RECORD_HEADER_SIZE, read_pos, write_pos)
            if record is not None and record.startswith(prefix):
                return record
        return None

    def _matches(self, prefix: bytes, read_pos: int, write_pos: int):
        """Absolute positions where ``prefix`` occurs in ``[read_pos, write_pos)``, in order."""
        capacity, data = self.capacity, self.data
        start = read_pos % capacity
        length = write_pos - read_pos
        first_len = min(length, capacity - start)
        yield from self._find_all(prefix, data + start, data + start + first_len, read_pos - start)
        if length > first_len:
            # The region wraps: search the junction (a prefix may straddle it), then the head.
            yield from self._find_across_end(prefix, read_pos + first_len, write_pos)
            yield from self._find_all(prefix, data, data + length - first_len,
                                      read_pos + first_len)

    def _find_all(self, prefix: bytes, begin: int, end: int, pos_of_data: int):
        """Matches in ``buf[begin:end]``, mapped to absolute ring positions."""
        at = self.buf.find(prefix, begin, end)
        while at >= 0:
            yield pos_of_data + (at - self.data)
            at = self.buf.find(prefix, at + 1, end)

    def _find_across_end(self, prefix: bytes, wrap_pos: int, write_pos: int):
        """Matches that start before the end of the data area and finish after its start."""
        reach = len(prefix) - 1
        head = min(reach, write_pos - wrap_pos)
        window = self.buf[self.data + self.capacity - reach:self.data + self.capacity] + \
            self.buf[self.data:self.data + head]
        at = window.find(prefix)
        while 0 <= at < reach:
            yield wrap_pos - reach + at
            at = window.find(prefix, at + 1)

    def _record_at(self, pos: int, read_pos: int, write_pos: int) -> bytes | None:
        """Copy the record starting at absolute ``pos``, if that is a plausible, intact record."""
        if pos < read_pos or pos % RECORD_ALIGN:
            return None
        at = self.data + pos % self.capacity
        n, crc = RECORD_HEADER.unpack_from(self.buf, at)
        if pos + record_size(n) > write_pos:
            return None
        start = at + RECORD_HEADER_SIZE
        end = start + n
        data_end = self.data + self.capacity
        if end <= data_end:
            payload = self.buf[start:end]
        else:
            payload = self.buf[start:data_end] + self.buf[self.data:end - self.capacity]
        if self.read_pos() > pos:
            return None  # consumed while we copied: the bytes may be a newer record's
        return payload if zlib.crc32(payload) == crc else None
