"""The prediction log's files: record frames, and the overflow files a worker spills to.

Frames are how records sit in every file of the log: a u32 little-endian length, then the record
bytes. The writer's spool batches (``app/predlog/spool.py``) hold such frames under one crc32 of the
whole body. An overflow file is appended record by record, so each of its frames carries its own
crc32 (``u32 length | u32 crc32 | record``, after the file's magic ``SIRAOVF2``): a record damaged
on disk, or put there by hand, is told apart from the good ones (``decode_overflow``). Files
written before that (no magic) are read as plain frames. A reader stops at a torn last frame (a
process killed mid-write), so whatever precedes it is still good.

An overflow file belongs to one worker, which appends a frame per record that found its ring
full. Its name says whose it is and whether it is complete (``OverflowName``):
``<instance>-s<slot>-e<producer epoch>-p<pid>-<seq>.open`` while the worker writes it,
``.sealed`` once it handed it to the writer.

A search for one record (``search_files``, for ``GET /v1/infer/{id}``) reads only the files that
can hold it, chosen from the id's time (``app.ids.id_time_ms``: prediction ids are UUIDv7) and
the file names, at most a stat each, never the spool's gigabytes:

- a spool batch (``BatchName``) carries in its name the least and greatest id time of its
  records: it is read when the id's time is in that span. A batch named in the older form
  ``<seq>.batch`` has no span and is always read (written before ids were v7; it goes as the
  writer replays it).
- an overflow file takes records for at most ``OVERFLOW_FILE_MAX_AGE_S`` from its first write,
  and its mtime is its last write: it is read when the id's time is within
  ``[mtime - OVERFLOW_FILE_MAX_AGE_S - ID_TIME_SLACK_MS, mtime + ID_TIME_SLACK_MS]``. The slack
  covers the time between making an id and appending its record (a batch request scores all its
  events first), the kernel's coarse file clock and small steps of the wall clock. A file whose
  mtime was changed by hand (a copy without ``-p``) is missed until the writer replays it.
"""
from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import re
import struct
import time
import zlib
from typing import Any

from app.predlog.disk import OVERFLOW_FILE_MAX_BYTES, LogFull, overflow_has_room
from conf.datadir import fsync_directory

OVERFLOW_FILE_RECORDS = 1000  # also the most the writer re-sends of one file after a crash
OVERFLOW_FILE_MAX_AGE_S = 1.0
ID_TIME_SLACK_MS = 5000  # overflow files: see the module doc
BATCH_SUFFIX = ".batch"
NO_V7_SPAN = (0, 0)  # a batch without one UUIDv7 id: no search for a v7 id reads it

_FRAME = struct.Struct("<I")  # record length; the record bytes follow
_CHECKED_FRAME = struct.Struct("<II")  # record length, crc32 of the record; the record bytes follow
OVERFLOW_MAGIC = b"SIRAOVF2"  # the first bytes of an overflow file whose frames carry a crc32
_OVERFLOW_NAME = re.compile(
    r"(?P<instance>[A-Za-z0-9_]+)-s(?P<slot>\d+)-e(?P<epoch>\d+)-p(?P<pid>\d+)-(?P<seq>\d+)"
    r"\.(?P<state>open|sealed)")
_BATCH_NAME = re.compile(r"(?P<seq>\d{20})(?:-(?P<first>\d+)-(?P<last>\d+))?\.batch")


# -- frames -------------------------------------------------------------------------------------

def encode_frames(records: list[bytes]) -> bytes:
    """Records as length-prefixed frames: u32 little-endian length, then the bytes."""
    pack = _FRAME.pack
    return b"".join(pack(len(record)) + record for record in records)


def decode_frames(data: bytes | memoryview, start: int = 0) -> tuple[list[bytes], int]:
    """The complete frames of ``data`` from ``start``, and where they end (a torn tail stops it)."""
    records = []
    pos, end = start, len(data)
    while pos + _FRAME.size <= end:
        (n,) = _FRAME.unpack_from(data, pos)
        if pos + _FRAME.size + n > end:
            break
        records.append(bytes(data[pos + _FRAME.size:pos + _FRAME.size + n]))
        pos += _FRAME.size + n
    return records, pos


def find_framed_record(data: Any, prefix: bytes) -> bytes | None:
    """The framed record in ``data`` (bytes or mmap) that starts with ``prefix``, else None.

    An overflow file (``OVERFLOW_MAGIC``) has checked frames: a record whose crc32 fails is no match.
    """
    checked = data[:len(OVERFLOW_MAGIC)] == OVERFLOW_MAGIC
    header = _CHECKED_FRAME.size if checked else _FRAME.size
    at = data.find(prefix, header)
    while at >= 0:
        (n,) = _FRAME.unpack_from(data, at - header)
        if at + n <= len(data):
            record = bytes(data[at:at + n])
            if not checked or zlib.crc32(record) == _CHECKED_FRAME.unpack_from(data, at - header)[1]:
                return record
        at = data.find(prefix, at + 1)
    return None


@dataclasses.dataclass(frozen=True)
class OverflowRecords:
    """What an overflow file holds: its good records, and the bytes after the last good frame.

    ``rest`` is a torn last frame when ``torn`` (its worker was killed writing it: that record was
    never answered), else the bytes from a frame whose crc32 failed on: damage.
    """

    records: list[bytes]
    rest: bytes
    torn: bool


def decode_overflow(data: bytes) -> OverflowRecords:
    """The records of an overflow file up to the first frame that is torn or fails its crc32.

    Nothing after a damaged frame is trusted: its length may be what was damaged.
    """
    if not data.startswith(OVERFLOW_MAGIC):  # written before frames carried a crc32
        records, end = decode_frames(data)
        return OverflowRecords(records, data[end:], end != len(data))  # no crc: a bad tail counts as torn
    records = []
    pos, end = len(OVERFLOW_MAGIC), len(data)
    while pos < end:
        if pos + _CHECKED_FRAME.size > end:
            return OverflowRecords(records, data[pos:], True)
        n, crc = _CHECKED_FRAME.unpack_from(data, pos)
        record = data[pos + _CHECKED_FRAME.size:pos + _CHECKED_FRAME.size + n]
        if len(record) != n:
            return OverflowRecords(records, data[pos:], True)
        if zlib.crc32(record) != crc:
            return OverflowRecords(records, data[pos:], False)
        records.append(record)
        pos += _CHECKED_FRAME.size + n
    return OverflowRecords(records, b"", False)



# -- overflow files -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OverflowName:
    """What an overflow file's name says: whose it is and whether it is complete."""

    instance_id: str
    slot: int
    epoch: int
    pid: int
    seq: int
    sealed: bool

    def file_name(self, sealed: bool | None = None) -> str:
        state = "sealed" if (self.sealed if sealed is None else sealed) else "open"
        return f"{self.instance_id}-s{self.slot}-e{self.epoch}-p{self.pid}-{self.seq:06d}.{state}"

    @classmethod
    def parse(cls, name: str) -> OverflowName | None:
        """The parts of an overflow file name; None for any other file."""
        match = _OVERFLOW_NAME.fullmatch(name)
        if match is None:
            return None
        return cls(match["instance"], int(match["slot"]), int(match["epoch"]), int(match["pid"]),
                   int(match["seq"]), match["state"] == "sealed")


class OverflowSpill:
    """A worker's overflow files: records that found its ring full, one ``write`` each.

    Not thread safe; one per worker. Files are written without fsync: they are as durable as the
    ring they stand in for (a killed worker's writes are in the page cache).
    """

    def __init__(self, directory: str, instance_id: str, slot: int, epoch: int,
                 budget_dirs: tuple[str, ...] = (), max_bytes: int = 0) -> None:
        self.directory = directory
        self.budget_dirs = budget_dirs or (directory,)  # what counts toward max_bytes (0: no limit)
        self.max_bytes = max_bytes
        self._name = OverflowName(instance_id, slot, epoch, os.getpid(), 0, False)
        self._fd = -1
        self._path = ""
        self._size = 0
        self._records = 0
        self._opened_at = 0.0
        self.spilled = 0
        self.files_sealed = 0

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    def age(self) -> float:
        """Seconds since the current file was opened."""
        return time.monotonic() - self._opened_at

    def write(self, record: bytes) -> None:
        """Append one record, rotating to a new file when the current one is full or old.

        LogFull when a new file is needed and the budget has no room for it (app/predlog/disk.py).
        """
        frame = _CHECKED_FRAME.pack(len(record), zlib.crc32(record)) + record
        if self._fd < 0 or self._records >= OVERFLOW_FILE_RECORDS or \
                (self._size and self._size + len(frame) > OVERFLOW_FILE_MAX_BYTES) or \
                time.monotonic() - self._opened_at > OVERFLOW_FILE_MAX_AGE_S:
            self.seal()
            if self.max_bytes and not overflow_has_room(self.budget_dirs, self.max_bytes):
                raise LogFull(f"the prediction log's disk budget is spent ({self.max_bytes} bytes, "
                              f"SIRA_SPOOL_MAX_BYTES)")
            self._open_next()
        try:
            written = os.write(self._fd, frame)
            if written != len(frame):
                raise OSError(f"short write of {written} of {len(frame)} bytes to {self._path}")
        except OSError:
            os.ftruncate(self._fd, self._size)  # never leave a torn frame before the next one
            raise
        self._size += len(frame)
        self._records += 1
        self.spilled += 1

    def _open_next(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        self._name = dataclasses.replace(self._name, seq=self._name.seq + 1)
        path = os.path.join(self.directory, self._name.file_name())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:  # a file without its magic would be read as unchecked frames: it must not stay
            if os.write(fd, OVERFLOW_MAGIC) != len(OVERFLOW_MAGIC):
                raise OSError(errno.ENOSPC, f"short write of the magic of {path}")
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        self._fd, self._path = fd, path
        self._size, self._records = len(OVERFLOW_MAGIC), 0
        self._opened_at = time.monotonic()

    def seal(self, durable: bool = False) -> None:
        """Hand the current file to the writer (idempotent); ``durable`` also fsyncs it.

        On the request path a seal is a close and a rename (tens of microseconds): the file is then
        as durable as the ring it stands in for. The worker's last seal, at exit, is durable.
        """
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(self._path, os.path.join(self.directory, self._name.file_name(sealed=True)))
        if durable:
            fsync_directory(self.directory)
        self.files_sealed += 1


# -- spool batch names --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BatchName:
    """What a spool batch file's name says: its place in the replay order and its records' id times.

    ``<seq, 20 digits>-<first ms>-<last ms>.batch``: the least and greatest unix ms of the batch's
    UUIDv7 prediction ids (``NO_V7_SPAN`` when it holds none). The older ``<seq>.batch`` has no
    span (``first_ms`` None): a search reads it whatever the id. The fixed-width sequence comes
    first, so sorting the names sorts by sequence in either form.
    """

    seq: int
    first_ms: int | None = None
    last_ms: int | None = None

    def file_name(self) -> str:
        if self.first_ms is None:
            return f"{self.seq:020d}{BATCH_SUFFIX}"
        return f"{self.seq:020d}-{self.first_ms}-{self.last_ms}{BATCH_SUFFIX}"

    @classmethod
    def parse(cls, name: str) -> BatchName | None:
        """The parts of a batch file name; None for any other file (a ``.tmp`` one included)."""
        match = _BATCH_NAME.fullmatch(name)
        if match is None:
            return None
        if match["first"] is None:
            return cls(int(match["seq"]))
        return cls(int(match["seq"]), int(match["first"]), int(match["last"]))

    def may_hold(self, id_ms: int) -> bool:
        """Whether a record whose id was made at ``id_ms`` can be in this batch."""
        return self.first_ms is None or self.first_ms <= id_ms <= self.last_ms


def overflow_may_hold(mtime_ns: int, id_ms: int) -> bool:
    """Whether an overflow file last written at ``mtime_ns`` can hold an id made at ``id_ms`` (module doc)."""
    last_write_ms = mtime_ns // 1_000_000
    first_write_ms = last_write_ms - int(OVERFLOW_FILE_MAX_AGE_S * 1000)
    return first_write_ms - ID_TIME_SLACK_MS <= id_ms <= last_write_ms + ID_TIME_SLACK_MS


# -- search -------------------------------------------------------------------------------------

def search_files(directories: list[str], prefix: bytes, id_ms: int) -> bytes | None:
    """The record starting with ``prefix``, whose id was made at ``id_ms``, in ``directories``.

    Only the files that can hold it are read (module doc). FileNotFoundError if a file vanished
    while we looked (sealed or replayed): the caller lists again.
    """
    for directory in directories:
        for path in files_that_may_hold(directory, id_ms):
            record = search_file(path, prefix)
            if record is not None:
                return record
    return None


def files_that_may_hold(directory: str, id_ms: int) -> list[str]:
    """Paths of the batch and overflow files of ``directory`` that can hold an id made at ``id_ms``."""
    chosen = []
    try:
        entries = os.scandir(directory)
    except FileNotFoundError:
        return []
    with entries:
        for entry in entries:
            if _may_hold(entry, id_ms):
                chosen.append(entry.path)
    return sorted(chosen)


def _may_hold(entry: os.DirEntry, id_ms: int) -> bool:
    """A batch by its name, an overflow file by its name and mtime; anything else (``.tmp``) no."""
    batch = BatchName.parse(entry.name)
    if batch is not None:
        return batch.may_hold(id_ms)
    if OverflowName.parse(entry.name) is not None:
        return overflow_may_hold(entry.stat().st_mtime_ns, id_ms)
    return False


def search_file(path: str, prefix: bytes) -> bytes | None:
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return None
        with mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_READ) as data:
            return find_framed_record(data, prefix)
