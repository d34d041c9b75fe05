"""The consumer side of one queue ring (see ``shm.ring``): batches out, damage set aside.

The consumer reads ``[read_pos, write_pos)`` and is the only one to move ``read_pos``. Records
come out only when their length fits and their crc32 matches; a bad record or a slot with
impossible positions is handed back as raw bytes (for the caller to keep as evidence) while the
slot goes on, so one damaged record never stops the prediction log of every worker.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Final

from shm.ring_layout import (
    PRODUCER_EPOCH,
    PRODUCER_PID,
    READ_POS,
    RECORD_ALIGN,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RECORDS_READ,
    RECORDS_WRITTEN,
    SLOT_HEADER_SIZE,
    U32,
    U64,
    WRITE_POS,
    RingLayout,
    check_positions,
    load_u64,
    positions_possible,
)
from shm.segment import Segment

DEFAULT_BATCH_RECORDS: Final = 1000
DEFAULT_BATCH_BYTES: Final = 1024 * 1024

_SIZE_ROUND: Final = RECORD_HEADER_SIZE + RECORD_ALIGN - 1  # record_size, inlined in loops
_crc32 = zlib.crc32
_unpack_header = RECORD_HEADER.unpack_from
assert (RECORD_HEADER_SIZE, _SIZE_ROUND) == (8, 15), "_good_payload inlines both"


class RingReader:
    """The single consumer of one slot: peeks batches and commits them once they are durable.

    ``damaged_at`` is the ring position of the damaged record the last ``peek_batch`` stopped
    before, None when it stopped for any other reason (ring empty, batch limits). The
    consumer's loop, per slot::

        try:
            records, end = reader.peek_batch()
        except RingCorrupt:
            keep(reader.reset_damaged_slot())      # the slot's positions are impossible
        else:
            ...make ``records`` durable...; reader.commit(end)
            if not records and reader.damaged_at is not None:
                keep(reader.skip_damaged())        # the good records before it are committed
    """

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
        self.damaged_at: int | None = None
        self._peeked_end = -1
        self._peeked_count = 0

    def _positions(self) -> tuple[int, int]:
        """Committed read position then published write position; RingCorrupt if impossible."""
        read_pos = load_u64(self._buf, self._base + READ_POS)
        write_pos = load_u64(self._buf, self._base + WRITE_POS)
        check_positions(read_pos, write_pos, self._capacity, self._segment, self.slot)
        return read_pos, write_pos

    def _header_at(self, pos: int, write_pos: int) -> tuple[int, int, int]:
        """(data offset of the header, payload length, stored crc) of the record at ``pos``.

        The length is -1 when the record would run past ``write_pos``: a damaged length (or,
        since ``write_pos - pos`` is at most the capacity, one longer than the ring).
        """
        at = self._data + pos % self._capacity
        n, crc = RECORD_HEADER.unpack_from(self._buf, at)
        if pos + ((n + _SIZE_ROUND) & -RECORD_ALIGN) > write_pos:
            return at, -1, crc
        return at, n, crc

    def _good_payload(self, pos: int, write_pos: int) -> bytes | None:
        """The payload of the record at ``pos``, or None when its length or crc is wrong.

        ``_header_at`` and ``_copy`` inlined: this runs for every record drained.
        """
        at = self._data + pos % self._capacity
        n, crc = _unpack_header(self._buf, at)
        if pos + ((n + 15) & -8) > write_pos:  # record_size(n)
            return None
        start = at + 8
        end = start + n
        payload = self._buf[start:end] if end <= self._data_end else self._copy(start, n)
        return payload if _crc32(payload) == crc else None

    def peek_batch(self, max_records: int = DEFAULT_BATCH_RECORDS,
                   max_bytes: int = DEFAULT_BATCH_BYTES) -> tuple[list[bytes], int]:
        """Copy out the oldest unconsumed intact records without consuming them.

        Returns the records (at most ``max_records``, payload bytes at most ``max_bytes`` but
        always at least one record when any is there) and the position to ``commit``. Stops
        before a damaged record and sets ``damaged_at`` to its position (see
        ``skip_damaged``). Raises RingCorrupt when the slot's positions are impossible.
        """
        self.damaged_at = None
        pos, write_pos = self._positions()
        records: list[bytes] = []
        total = 0
        while pos < write_pos and len(records) < max_records:
            payload = self._good_payload(pos, write_pos)
            if payload is None:
                self.damaged_at = pos
                break
            n = len(payload)
            if records and total + n > max_bytes:
                break
            records.append(payload)
            total += n
            pos += (n + 15) & -8  # record_size(n)
        self._peeked_end, self._peeked_count = pos, len(records)
        return records, pos

    def _copy(self, start: int, n: int) -> bytes:
        """``n`` ring bytes from data offset ``start``, joining the two parts of a wrap."""
        end = start + n
        if end <= self._data_end:
            return self._buf[start:end]
        return self._buf[start:self._data_end] + self._buf[self._data:end - self._capacity]

    def oldest(self) -> bytes | None:
        """The oldest unconsumed record (e.g. to read the timestamp the app put in it).

        None when the ring is empty or its oldest record is damaged (``damaged_at`` says so).
        """
        records, _end = self.peek_batch(1, 0)
        return records[0] if records else None

    def commit(self, end_pos: int) -> None:
        """Consume every record before ``end_pos``; call only once they are durable.

        ``end_pos`` must be a position ``peek_batch`` could return: on a record boundary,
        with only intact records before it (ValueError otherwise).
        """
        read_pos, write_pos = self._positions()
        if not read_pos <= end_pos <= write_pos:
            raise ValueError(f"commit position {end_pos} outside [{read_pos}, {write_pos}]")
        if end_pos == self._peeked_end:
            count = self._peeked_count
        else:
            count = self._count_records(read_pos, end_pos, write_pos)
        self._consume(end_pos, load_u64(self._buf, self._base + RECORDS_READ) + count)

    def _consume(self, end_pos: int, records_read: int) -> None:
        """Store the records-read counter, then the read position (which frees the bytes)."""
        base = self._base
        self._buf[base + RECORDS_READ:base + RECORDS_READ + 8] = U64.pack(records_read)
        self._buf[base + READ_POS:base + READ_POS + 8] = U64.pack(end_pos)
        self._peeked_end = -1

    def _count_records(self, pos: int, end_pos: int, write_pos: int) -> int:
        """Intact records in ``[pos, end_pos)``; ``end_pos`` must fall on a record boundary."""
        count = 0
        while pos < end_pos:
            payload = self._good_payload(pos, write_pos)
            if payload is None:
                raise ValueError(f"commit position {end_pos} lies past the damaged record at "
                                 f"{pos}: use skip_damaged")
            pos += (len(payload) + _SIZE_ROUND) & -RECORD_ALIGN
            count += 1
        if pos != end_pos:
            raise ValueError(f"commit position {end_pos} is not on a record boundary")
        return count

    def skip_damaged(self, keep: Callable[[bytes], None] | None = None) -> bytes:
        """Consume the damaged record at the read position; return its raw bytes.

        ``keep`` is called with the bytes before anything is consumed: if it raises (the
        evidence could not be made durable), nothing is consumed and the exception propagates.

        Commit the intact records before it first (``peek_batch`` stops before the damage, so
        once they are committed the damage sits at the read position). When the record's
        length fits before ``write_pos``, exactly that record is consumed and its header and
        payload returned as stored (padding left out); when the length is impossible, no
        later record boundary can be trusted, so everything up to ``write_pos`` is consumed
        and returned (intact records among it are lost to the consumer). A length damaged to
        a plausible value makes the next record look damaged as well: each is set aside in
        turn until the reads are back on a record boundary. Returns b"" and
        consumes nothing when the record there is intact (e.g. on arm64 its bytes became
        visible meanwhile) or the ring is empty. Raises RingCorrupt for impossible positions.
        """
        read_pos, write_pos = self._positions()
        if read_pos == write_pos:
            return b""
        at, n, crc = self._header_at(read_pos, write_pos)
        if n >= 0:
            raw = self._copy(at, RECORD_HEADER_SIZE + n)
            if zlib.crc32(raw[RECORD_HEADER_SIZE:]) == crc:
                return b""
            end_pos, skipped = read_pos + ((n + _SIZE_ROUND) & -RECORD_ALIGN), 1
        else:
            raw = self._copy(at, write_pos - read_pos)
            end_pos, skipped = write_pos, 0
        if keep is not None:
            keep(raw)
        self._consume(end_pos, self._records_read_after(skipped))
        self.damaged_at = None
        return raw

    def _records_read_after(self, skipped: int) -> int:
        """Records-read counter after skipping ``skipped`` records, 0 meaning all that remain.

        Skipping to ``write_pos`` catches up with the producer's records-written counter, so
        the depth in records reads 0 again (approximate, like the counters themselves).
        """
        records_read = load_u64(self._buf, self._base + RECORDS_READ)
        if skipped:
            return records_read + skipped
        return max(records_read, load_u64(self._buf, self._base + RECORDS_WRITTEN))

    def reset_damaged_slot(self, keep: Callable[[bytes], None] | None = None) -> bytes:
        """Restart a slot whose positions are impossible; return its whole data area.

        ``keep`` is called with the data area first, as for ``skip_damaged``.

        The read position moves to the published write position (rounded down to the record
        grid, also written back as the write position when it was off it), so the ring reads
        empty. A live producer continues consistently: it only ever trusts a read position
        between its cached one and its own write position, and adopts a reset position ahead
        of its own; if the damaged field was ``write_pos``, its next append republishes its
        own position and the slot may need one more reset. Every record that waited is lost
        to the consumer (its bytes are in the returned data area; records a producer wrote
        over while the positions were wrong are gone). ValueError when the positions are not
        damaged: use ``skip_damaged`` for a bad record.
        """
        base, buf = self._base, self._buf
        read_pos = load_u64(buf, base + READ_POS)
        write_pos = load_u64(buf, base + WRITE_POS)
        if positions_possible(read_pos, write_pos, self._capacity):
            raise ValueError(f"{self._segment.path} slot {self.slot}: positions {read_pos} and "
                             f"{write_pos} are possible; nothing to reset")
        evidence = buf[self._data:self._data_end]
        if keep is not None:
            keep(evidence)
        new_pos = write_pos & -RECORD_ALIGN
        if new_pos != write_pos:
            buf[base + WRITE_POS:base + WRITE_POS + 8] = U64.pack(new_pos)
        self._consume(new_pos, load_u64(buf, base + RECORDS_WRITTEN))
        self.damaged_at = None
        return evidence

    def depth_bytes(self) -> int:
        """Ring bytes waiting to be consumed (record headers and padding included)."""
        read_pos = load_u64(self._buf, self._base + READ_POS)  # first: it only grows
        return load_u64(self._buf, self._base + WRITE_POS) - read_pos

    def depth_records(self) -> int:
        """Records waiting to be consumed (approximate, see ``QueueRings``)."""
        records_read = load_u64(self._buf, self._base + RECORDS_READ)
        return max(0, load_u64(self._buf, self._base + RECORDS_WRITTEN) - records_read)

    def producer(self) -> tuple[int, int]:
        """(pid, epoch) of the last producer that took this slot; (0, 0) if none ever did."""
        pid = U32.unpack_from(self._buf, self._base + PRODUCER_PID)[0]
        return pid, load_u64(self._buf, self._base + PRODUCER_EPOCH)
