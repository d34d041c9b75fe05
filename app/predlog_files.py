"""The prediction log's files: record frames, and the overflow files a worker spills to.

Frames are how records sit in every file of the log (overflow files here, the writer's spool
batches in ``workers/spool.py``): a u32 little-endian length, then the record bytes. A reader
stops at a torn last frame (a process killed mid-write), so whatever precedes it is still good.

An overflow file belongs to one worker, which appends a frame per record that found its ring
full. Its name says whose it is and whether it is complete (``OverflowName``):
``<instance>-s<slot>-e<producer epoch>-p<pid>-<seq>.open`` while the worker writes it,
``.sealed`` once it handed it to the writer.
"""
from __future__ import annotations

import dataclasses
import mmap
import os
import re
import struct
import time
from typing import Any

OVERFLOW_FILE_RECORDS = 1000  # also the most the writer re-sends of one file after a crash
OVERFLOW_FILE_MAX_AGE_S = 1.0

_FRAME = struct.Struct("<I")  # record length; the record bytes follow
_OVERFLOW_NAME = re.compile(
    r"(?P<instance>[A-Za-z0-9_]+)-s(?P<slot>\d+)-e(?P<epoch>\d+)-p(?P<pid>\d+)-(?P<seq>\d+)"
    r"\.(?P<state>open|sealed)")


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
    """The framed record in ``data`` (bytes or mmap) that starts with ``prefix``, else None."""
    at = data.find(prefix, _FRAME.size)
    while at >= 0:
        (n,) = _FRAME.unpack_from(data, at - _FRAME.size)
        if at + n <= len(data):
            return bytes(data[at:at + n])
        at = data.find(prefix, at + 1)
    return None



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

    def __init__(self, directory: str, instance_id: str, slot: int, epoch: int) -> None:
        self.directory = directory
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
        """Append one record, rotating to a new file when the current one is full or old."""
        if self._fd < 0 or self._records >= OVERFLOW_FILE_RECORDS or \
                time.monotonic() - self._opened_at > OVERFLOW_FILE_MAX_AGE_S:
            self.seal()
            self._open_next()
        frame = _FRAME.pack(len(record)) + record
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
        self._path = os.path.join(self.directory, self._name.file_name())
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND |
                           os.O_CLOEXEC, 0o600)
        self._size = self._records = 0
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


def fsync_directory(path: str) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)



# -- search -------------------------------------------------------------------------------------

def search_files(directories: list[str], prefix: bytes) -> bytes | None:
    """The record starting with ``prefix`` in any file of ``directories``; FileNotFoundError if one vanished."""
    for directory in directories:
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            continue
        for name in names:
            if name.endswith(".tmp"):
                continue
            record = search_file(os.path.join(directory, name), prefix)
            if record is not None:
                return record
    return None


def search_file(path: str, prefix: bytes) -> bytes | None:
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return None
        with mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_READ) as data:
            return find_framed_record(data, prefix)
