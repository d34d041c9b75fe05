"""The writer's disk: its spool of batches for when Postgres is away, and the workers' overflow files.

``BatchSpool``: append-only, one file per batch under ``<spool>/batches``, written to a ``.tmp``
name, fsynced, renamed into place and the folder fsynced, so a batch is on disk whole or not at
all. Names are increasing sequence numbers, then the span of the batch's id times
(``<seq>-<first ms>-<last ms>.batch``, ``app.predlog.files.BatchName``: a lookup reads only the
batches whose span holds the id; ``<seq>.batch`` of older releases is still replayed): replay goes
oldest first and removes a file only after Postgres committed its rows. A writer killed at any
point re-sends at most one batch (the rows are idempotent on prediction_id). The spool holds at
most ``max_bytes``: a warning is logged as it passes 50, 75 and 90 % and an error at 100 %, after
which the writer leaves new records in the rings
(``has_room``) rather than drop anything; at shutdown the limit gives way (``force``), because the
rings die with the master.

``OverflowFiles``: the files that workers spill to when their ring is full (``app.predlog.log``). A
file is ready for replay when its worker sealed it, or when its worker is gone: another ``sira
serve`` instance wrote it, a newer worker took its slot (the ring's producer epoch moved on), or
its pid is dead.

Batch file layout (little-endian)::

    0        8          12         16             24
    +--------+----------+----------+--------------+----------------------------------+
    | magic  | records  | crc32 of | body length  | body: records as frames           |
    |SIRASPL1| u32      | body u32 | u64          | (u32 length + JSON), see predlog  |
    +--------+----------+----------+--------------+----------------------------------+
"""
from __future__ import annotations

import dataclasses
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable

from app.ids import id_time_ms
from app.predlog.disk import bytes_under
from app.predlog.files import (
    BATCH_SUFFIX,
    NO_V7_SPAN,
    BatchName,
    OverflowName,
    decode_frames,
    decode_overflow,
    encode_frames,
)
from app.predlog.log import RECORD_PREFIX
from conf.datadir import TMP_SUFFIX, write_atomically

log = logging.getLogger("sira.spool")

BATCH_MAGIC = b"SIRASPL1"
CORRUPT_DIR = "corrupt"
FILL_WARNINGS = (50, 75, 90)  # percent of max_bytes; 100 is an error

_BATCH_HEADER = struct.Struct("<8sIIQ")


class SpoolCorrupt(Exception):
    """A spool file is damaged (the disk lost or changed bytes); it is set aside, never deleted."""


@dataclasses.dataclass(frozen=True)
class SpooledBatch:
    """One batch read back from the spool."""

    path: str
    records: list[bytes]
    size: int


class BatchSpool:
    """Batches of records on disk while Postgres is away, replayed in the order they were written.

    One process (the writer) owns a spool folder. Not thread safe.
    """

    def __init__(self, directory: str, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.bytes_used = 0
        self.batches = 0
        self._next_seq = 1
        self._fill_percent_logged = 0

    def open(self) -> BatchSpool:
        """Create the folder, drop unfinished ``.tmp`` files, and count what is waiting (again after a
        failed open: the counts start from zero)."""
        self.bytes_used = self.batches = 0
        os.makedirs(self.directory, exist_ok=True)
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.endswith(TMP_SUFFIX):
                os.unlink(path)  # a batch the writer was killed writing: still in its ring
            elif name.endswith(BATCH_SUFFIX):
                self.bytes_used += os.path.getsize(path)
                self.batches += 1
                self._next_seq = max(self._next_seq, _sequence_of(name) + 1)
        if self.batches:
            log.warning("prediction spool: %d batches (%d bytes) wait for Postgres in %s",
                        self.batches, self.bytes_used, self.directory)
        return self

    def close(self) -> None:
        """Nothing stays open between calls; here for the lifecycle's symmetry."""

    def __enter__(self) -> BatchSpool:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def has_room(self, other_bytes: int = 0) -> bool:
        """Whether a new batch may be spooled under ``max_bytes``, which ``other_bytes`` (the
        workers' overflow files) share."""
        return self.bytes_used + other_bytes < self.max_bytes

    def append(self, records: list[bytes], force: bool = False) -> None:
        """Write one batch durably; refused (ValueError) when full unless ``force``."""
        if not records:
            return
        if not force and not self.has_room():
            raise ValueError(f"prediction spool {self.directory} is full ({self.bytes_used} bytes)")
        body = encode_frames(records)
        data = _BATCH_HEADER.pack(BATCH_MAGIC, len(records), zlib.crc32(body), len(body)) + body
        name = BatchName(self._next_seq, *id_time_span(records)).file_name()
        path = os.path.join(self.directory, name)
        write_atomically(path, data)
        self._next_seq += 1
        self.bytes_used += len(data)
        self.batches += 1
        self._log_fill()

    def oldest(self) -> SpooledBatch | None:
        """The oldest batch, checked; a damaged one is moved to ``corrupt/`` and skipped."""
        while True:
            names = sorted(name for name in os.listdir(self.directory) if name.endswith(BATCH_SUFFIX))
            if not names:
                return None
            path = os.path.join(self.directory, names[0])
            try:
                return read_batch(path)
            except SpoolCorrupt as exc:
                self._set_aside(path, exc)

    def paths(self) -> list[str]:
        """Every batch file, oldest first."""
        return [os.path.join(self.directory, name) for name in sorted(os.listdir(self.directory))
                if name.endswith(BATCH_SUFFIX)]

    def remove(self, batch: SpooledBatch) -> None:
        """Forget a batch whose rows Postgres committed."""
        os.unlink(batch.path)
        self.bytes_used = max(0, self.bytes_used - batch.size)
        self.batches = max(0, self.batches - 1)
        self._log_fill()

    def _set_aside(self, path: str, reason: Exception) -> None:
        corrupt = os.path.join(os.path.dirname(self.directory), CORRUPT_DIR)
        os.makedirs(corrupt, exist_ok=True)
        size = os.path.getsize(path)
        os.rename(path, os.path.join(corrupt, os.path.basename(path)))
        self.bytes_used = max(0, self.bytes_used - size)
        self.batches = max(0, self.batches - 1)
        log.error("prediction spool: %s set aside in %s: %s", path, corrupt, reason)

    def _log_fill(self) -> None:
        """One log line each time the spool fills past a mark (again after it drained below it)."""
        percent = 100 * self.bytes_used // self.max_bytes if self.max_bytes else 100
        reached = max((mark for mark in (*FILL_WARNINGS, 100) if percent >= mark), default=0)
        if reached > self._fill_percent_logged:
            level = logging.ERROR if reached >= 100 else logging.WARNING
            log.log(level, "prediction spool is %d%% full (%d of %d bytes, SIRA_SPOOL_MAX_BYTES)%s",
                    percent, self.bytes_used, self.max_bytes,
                    ": new predictions wait in the rings" if reached >= 100 else "")
        self._fill_percent_logged = reached


def read_batch(path: str) -> SpooledBatch:
    """Read and check one batch file."""
    with open(path, "rb") as handle:
        data = handle.read()
    return SpooledBatch(path, decode_batch(data, path), len(data))


def decode_batch(data: bytes, label: str) -> list[bytes]:
    """The records of one batch file's bytes, checked (``label`` names it in the error)."""
    if len(data) < _BATCH_HEADER.size:
        raise SpoolCorrupt(f"{label}: {len(data)} bytes, shorter than its header")
    magic, count, crc, body_length = _BATCH_HEADER.unpack_from(data, 0)
    body = memoryview(data)[_BATCH_HEADER.size:]
    if magic != BATCH_MAGIC or body_length != len(body) or zlib.crc32(body) != crc:
        raise SpoolCorrupt(f"{label}: bad magic, length or checksum")
    records, end = decode_frames(body)
    if len(records) != count or end != len(body):
        raise SpoolCorrupt(f"{label}: {len(records)} records, header says {count}")
    return records


def keep_aside(directory: str, name: str, data: bytes) -> str:
    """Keep damaged bytes durably under ``directory`` for a person to look at; returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}-{time.time_ns()}")
    write_atomically(path, data)
    return path


def keep_copy(path: str, directory: str) -> str:
    """A durable copy of the file ``path`` under ``directory`` (e.g. a rings segment that cannot be read)."""
    with open(path, "rb") as handle:
        return keep_aside(directory, os.path.basename(path), handle.read())


def _sequence_of(name: str) -> int:
    """The sequence number of a batch file name, either form (``BatchName``); 0 for another name."""
    parsed = BatchName.parse(name)
    return 0 if parsed is None else parsed.seq


_ID_TEXT = slice(len(RECORD_PREFIX), len(RECORD_PREFIX) + 36)  # where a record's prediction_id sits


def id_time_span(records: list[bytes]) -> tuple[int, int]:
    """The least and greatest time of the records' UUIDv7 ids, for the batch's name (``BatchName``).

    The id is sliced out of each record's first bytes (``RECORD_PREFIX``), never parsed as JSON:
    about half a microsecond a record. ``NO_V7_SPAN`` when no record has a v7 id.
    """
    times = [ms for record in records
             if record.startswith(RECORD_PREFIX) and (ms := id_time_ms(record[_ID_TEXT])) is not None]
    return (min(times), max(times)) if times else NO_V7_SPAN


# -- the workers' overflow files ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OverflowFile:
    """One overflow file ready for replay: its good records, and what followed them (``decode_overflow``)."""

    path: str
    records: list[bytes]
    rest: bytes = b""
    torn: bool = False


class OverflowFiles:
    """The writer's view of the workers' overflow files (see the module doc for "ready")."""

    def __init__(self, directory: str, instance_id: str,
                 producer_epoch: Callable[[int], int], pid_alive: Callable[[int], bool]):
        self.directory = directory
        self.instance_id = instance_id
        self._producer_epoch = producer_epoch
        self._pid_alive = pid_alive  # the writer passes its process check: this module knows no processes

    def waiting(self) -> int:
        """Overflow files on disk, ready or not."""
        try:
            return sum(1 for name in os.listdir(self.directory) if OverflowName.parse(name))
        except FileNotFoundError:
            return 0

    def bytes_waiting(self) -> int:
        """Bytes of every overflow file on disk (they count toward the spool's budget)."""
        return bytes_under([self.directory])

    def ready(self) -> list[str]:
        """Paths of the files ready for replay, oldest first per worker."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        ready = []
        for name in names:
            parsed = OverflowName.parse(name)
            if parsed is not None and self._is_ready(parsed):
                ready.append((parsed.instance_id, parsed.slot, parsed.epoch, parsed.seq, name))
        return [os.path.join(self.directory, item[-1]) for item in sorted(ready)]

    def _is_ready(self, name: OverflowName) -> bool:
        if name.sealed or name.instance_id != self.instance_id:
            return True
        try:
            if self._producer_epoch(name.slot) != name.epoch:
                return True
        except IndexError:
            return True
        return not self._pid_alive(name.pid)

    def read(self, path: str) -> OverflowFile:
        """The good records of one file, and the bytes after them (a torn last frame, or damage)."""
        with open(path, "rb") as handle:
            data = handle.read()
        found = decode_overflow(data)
        if found.rest and found.torn:
            log.warning("overflow file %s ends with %d bytes of a torn record (its worker died "
                        "writing it; that prediction was never answered)", path, len(found.rest))
        return OverflowFile(path, found.records, found.rest, found.torn)

    def remove(self, item: OverflowFile) -> None:
        """Forget a file whose rows Postgres committed."""
        os.unlink(item.path)

    def make_durable(self) -> None:
        """fsync every overflow file left (the writer stops before replaying them all)."""
        for path in self._all_paths():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _all_paths(self) -> list[str]:
        try:
            return [os.path.join(self.directory, name) for name in os.listdir(self.directory)]
        except FileNotFoundError:
            return []
