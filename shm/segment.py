"""Named shared-memory segments: plain files in /dev/shm mapped with mmap.

Every structure of ``shm/`` (cache, queue rings, control block, stats) lives in one
``Segment``. The master of ``sira serve`` creates the segments before it forks and unlinks
them at exit; workers, the supervisor and the writer attach by name (or keep the mapping
they inherited across fork). ``multiprocessing.shared_memory`` is deliberately not used: on
Python 3.11 every process that attaches registers the segment with the resource tracker,
which may unlink it when that process exits (bpo-38119).
"""
from __future__ import annotations

import errno
import mmap
import os
import re
import struct
import time
from collections.abc import Callable
from typing import Final, TypeVar

DEFAULT_DIRECTORY: Final = "/dev/shm"
NAME_PREFIX: Final = "sira-"
COMMON_HEADER_SIZE: Final = 64
MAGIC_SIZE: Final = 8

# magic, layout version, header size, total size, creator pid, flags, created (unix ns)
_COMMON_HEADER = struct.Struct("<8sIIQIIQ")
_FIELDS_AFTER_MAGIC = struct.Struct("<IIQIIQ")
# Map every page up front, so that requests never take the first-touch page faults.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
_NAME_PART = re.compile(r"[A-Za-z0-9_]{1,64}")
_SEGMENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}")


class SegmentError(Exception):
    """A segment is missing, of another kind or layout version, truncated or corrupt."""


class Segment:
    """One named shared-memory file, mapped read-write (or read-only) with ``mmap``.

    Binary layout. All integers little-endian; offsets in bytes::

        0        8        12       16               24       28       32               40        64
        +--------+--------+--------+----------------+--------+--------+----------------+---------+
        | magic  | layout | header | total size     | creator| flags  | created        | reserved|
        | 8 bytes| version| size   | u64 (file size)| pid u32| u32 (0)| unix ns u64    | zeros   |
        |        | u32    | u32    |                |        |        |                |         |
        +--------+--------+--------+----------------+--------+--------+----------------+---------+
        64 .. header_size      the structure's own header (``specific_header``), opaque here
        header_size .. total   the structure's data area

    ``header size`` counts the common header and the structure's header, so the data area
    starts at ``header_size``. ``magic`` names the kind of structure (b"SIRACACH", ...);
    ``layout version`` is bumped by a structure whenever its bytes change meaning.

    Creation is exclusive (``O_EXCL``) and the file is zero-filled and fully allocated
    (``posix_fallocate``, so a full /dev/shm is an error now, not a SIGBUS later). The
    structure's header is written first, then the common header, and the 8 magic bytes last:
    a reader that attaches to a half-created segment sees no magic and gets ``SegmentError``.

    Ownership: the process that calls ``create`` owns the file and is the only one that may
    ``unlink`` it; everyone may ``close`` their own mapping. Both are idempotent.

    Fork: the mapping is ``MAP_SHARED``, so a ``Segment`` inherited across ``fork`` maps the
    very same pages and is fine to use in the child; attaching again by name after the fork
    works too (the master creates, children attach). ``mapped_by_pid`` records which process
    mapped it; a child that inherited the owner's object cannot ``unlink`` (the check uses
    the pid, not the object). Not thread safe: one thread closes a segment.

    ``buf`` is the ``mmap`` object itself: slicing it copies bytes out, slice assignment
    copies bytes in. Anyone who takes a ``memoryview`` of it must release that view before
    ``close``.
    """

    def __init__(self, path: str, mm: mmap.mmap, *, owner_pid: int | None, inode: int,
                 header_size: int, version: int, creator_pid: int) -> None:
        """Wrap an existing mapping; use ``create`` or ``attach`` instead."""
        self.path = path
        self.name = os.path.basename(path)
        self.buf: mmap.mmap = mm
        self.size = len(mm)
        self.header_size = header_size
        self.version = version
        self.creator_pid = creator_pid
        self.mapped_by_pid = os.getpid()
        self._owner_pid = owner_pid
        self._inode = inode
        self._closed = False
        self._unlinked = False

    @classmethod
    def create(cls, name: str, size: int, magic: bytes, version: int,
               directory: str = DEFAULT_DIRECTORY, header: bytes = b"") -> Segment:
        """Create, zero-fill and map a new segment of ``size`` bytes (headers included).

        ``header`` is the structure's own header, written before the common one. Raises
        ``FileExistsError`` when the name is taken (see ``remove_stale_segments``).
        """
        _check_magic(magic)
        header_size = COMMON_HEADER_SIZE + len(header)
        if size < header_size:
            raise ValueError(f"size {size} is smaller than the headers ({header_size} bytes)")
        path = segment_path(name, directory)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _allocate(fd, size, path)
            mm = mmap.mmap(fd, size, _MAP_FLAGS, mmap.PROT_READ | mmap.PROT_WRITE)
            inode = os.fstat(fd).st_ino
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        pid = os.getpid()
        mm[COMMON_HEADER_SIZE:header_size] = header
        mm[MAGIC_SIZE:MAGIC_SIZE + _FIELDS_AFTER_MAGIC.size] = _FIELDS_AFTER_MAGIC.pack(
            version, header_size, size, pid, 0, time.time_ns())
        mm[0:MAGIC_SIZE] = magic  # last: a segment without its magic is never valid
        return cls(path, mm, owner_pid=pid, inode=inode, header_size=header_size,
                   version=version, creator_pid=pid)

    @classmethod
    def attach(cls, name: str, magic: bytes, version: int,
               directory: str = DEFAULT_DIRECTORY, readonly: bool = False) -> Segment:
        """Map an existing segment after checking its magic, layout version and sizes."""
        _check_magic(magic)
        path = segment_path(name, directory)
        try:
            fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        except FileNotFoundError:
            raise SegmentError(f"segment {path} does not exist") from None
        try:
            stat = os.fstat(fd)
            if stat.st_size < COMMON_HEADER_SIZE:
                raise SegmentError(f"segment {path} is {stat.st_size} bytes, shorter than "
                                   f"its {COMMON_HEADER_SIZE}-byte header")
            prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
            mm = mmap.mmap(fd, stat.st_size, _MAP_FLAGS, prot)
        finally:
            os.close(fd)
        try:
            header_size, creator_pid = _check_common_header(mm, path, magic, version)
        except SegmentError:
            mm.close()
            raise
        return cls(path, mm, owner_pid=None, inode=stat.st_ino, header_size=header_size,
                   version=version, creator_pid=creator_pid)

    @property
    def specific_header(self) -> bytes:
        """The structure's own header bytes (between the common header and the data)."""
        return self.buf[COMMON_HEADER_SIZE:self.header_size]

    @property
    def closed(self) -> bool:
        """True once this process closed its mapping."""
        return self._closed

    @property
    def is_owner(self) -> bool:
        """True in the process that created the segment (not in its forked children)."""
        return self._owner_pid == os.getpid()

    def close(self) -> None:
        """Unmap the segment in this process; the file stays for the others."""
        if self._closed:
            return
        try:
            self.buf.close()
        except BufferError as exc:
            raise SegmentError(f"segment {self.path}: release every memoryview of buf "
                               f"before close") from exc
        self._closed = True

    def unlink(self) -> None:
        """Remove the file (owner only); mappings stay valid until each process closes."""
        if self._unlinked:
            return
        if not self.is_owner:
            raise SegmentError(f"segment {self.path} belongs to pid {self._owner_pid}; "
                               f"only its creator unlinks it")
        try:
            if os.stat(self.path).st_ino == self._inode:  # never remove a successor's file
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._unlinked = True

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close; the owner also unlinks."""
        try:
            self.close()
        finally:
            if self.is_owner:
                self.unlink()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.size} bytes"
        return f"<Segment {self.path} {state}>"


# The segments of one instance are ``sira-<instance>-<kind>``; every kind, in one table:
CONTROL_KIND: Final = "control"        # shm/control.py: the supervisor's generations and model slots
MODEL_STATS_KIND: Final = "modelstats"  # shm/model_stats.py: the workers' per-model counts
CACHE_KIND: Final = "cache"            # shm/cache.py: the prediction cache
RATE_LIMIT_KIND: Final = "ratelimit"   # shm/ratelimit.py: the rate limits' token buckets
RINGS_KIND: Final = "predlog"          # shm/ring.py: the workers' prediction rings
STATS_KIND: Final = "predstats"        # shm/counters.py: the prediction log's counts
SEGMENT_KINDS: Final = (CONTROL_KIND, MODEL_STATS_KIND, CACHE_KIND, RATE_LIMIT_KIND, RINGS_KIND, STATS_KIND)


def segment_name(instance_id: str, kind: str) -> str:
    """Name of one segment of one ``sira serve`` instance: ``sira-<instance>-<kind>``."""
    for label, part in (("instance_id", instance_id), ("kind", kind)):
        if not _NAME_PART.fullmatch(part):
            raise ValueError(f"{label} {part!r} must be 1-64 of [A-Za-z0-9_]")
    return f"{NAME_PREFIX}{instance_id}-{kind}"


def instance_prefix(instance_id: str) -> str:
    """The name prefix shared by every segment of one instance: ``sira-<instance>-``."""
    return segment_name(instance_id, "x")[:-1]


def segment_path(name: str, directory: str = DEFAULT_DIRECTORY) -> str:
    """Full path of a segment, refusing names that could leave the directory."""
    if not _SEGMENT_NAME.fullmatch(name):
        raise ValueError(f"segment name {name!r} must be [A-Za-z0-9_.-], not starting with . or -")
    return os.path.join(directory, name)


def remove_stale_segments(prefix: str, directory: str = DEFAULT_DIRECTORY) -> list[str]:
    """Unlink every segment whose name starts with ``prefix`` (e.g. ``instance_prefix(id)``).

    The master calls it before creating its segments, so segments left by a predecessor that
    was killed (SIGKILL skips every cleanup) do not pile up. Use a stable instance id per data
    directory for that to work. Returns the names removed.
    """
    if not prefix.startswith(NAME_PREFIX) or not _SEGMENT_NAME.fullmatch(prefix):
        raise ValueError(f"prefix {prefix!r} must start with {NAME_PREFIX!r}")
    removed = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(prefix) and entry.is_file(follow_symlinks=False):
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                removed.append(entry.name)
    return sorted(removed)


def remove_segment(name: str, directory: str = DEFAULT_DIRECTORY) -> bool:
    """Unlink one segment by name, whoever created it; False if it was already gone.

    For a successor that took over a dead creator's segments (the data dir lock proves the creator
    is gone); a live creator's segments are removed with ``unlink`` instead.
    """
    try:
        os.unlink(segment_path(name, directory))
    except FileNotFoundError:
        return False
    return True


def _check_magic(magic: bytes) -> None:
    """Magic numbers are exactly 8 bytes and never all zeros (zeros mean unfinished)."""
    if len(magic) != MAGIC_SIZE or magic == bytes(MAGIC_SIZE):
        raise ValueError(f"magic must be 8 bytes, not all zero: {magic!r}")


def _allocate(fd: int, size: int, path: str) -> None:
    """Reserve every page now so that a full /dev/shm fails here and not as a SIGBUS later."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise SegmentError(f"no room for {size} bytes at {path}: /dev/shm is full or too "
                               f"small (containers default to 64 MiB)") from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)


def _check_common_header(mm: mmap.mmap, path: str, magic: bytes,
                         version: int) -> tuple[int, int]:
    """Validate the common header; return (header size, creator pid)."""
    (found_magic, found_version, header_size, total_size, creator_pid, _flags,
     _created_ns) = _COMMON_HEADER.unpack_from(mm, 0)
    if found_magic == bytes(MAGIC_SIZE):
        raise SegmentError(f"segment {path} has no magic: it is not (yet) initialised")
    if found_magic != magic:
        raise SegmentError(f"segment {path} has magic {found_magic!r}, expected {magic!r}")
    if found_version != version:
        raise SegmentError(f"segment {path} has layout version {found_version}, "
                           f"this code reads version {version}")
    if total_size != len(mm):
        raise SegmentError(f"segment {path} records {total_size} bytes but the file has "
                           f"{len(mm)}: truncated or corrupt")
    if not COMMON_HEADER_SIZE <= header_size <= total_size:
        raise SegmentError(f"segment {path} records header size {header_size}, outside "
                           f"[{COMMON_HEADER_SIZE}, {total_size}]: corrupt")
    return header_size, creator_pid


T = TypeVar("T")


def built_over_new(segment: Segment, build: Callable[[Segment], T]) -> T:
    """``build(segment)`` over a segment just created; if it refuses the segment, unmap and remove it."""
    try:
        return build(segment)
    except BaseException:
        segment.close()
        segment.unlink()
        raise


def built_over_attached(segment: Segment, build: Callable[[Segment], T],
                        check: Callable[[Segment], None] | None = None) -> T:
    """``build(segment)`` over an attached segment, after ``check``; if either refuses it, unmap it."""
    try:
        if check is not None:
            check(segment)
        return build(segment)
    except BaseException:
        segment.close()
        raise


class SegmentBacked:
    """Lifecycle of a structure laid over one `Segment` held in `self.segment`.

    close() unmaps in this process, unlink() removes the file (creator only), and the context
    manager closes, the creator also unlinking: the same for every structure of shm/.
    """

    segment: Segment

    def close(self) -> None:
        """Unmap in this process (idempotent)."""
        self.segment.close()

    def unlink(self) -> None:
        """Remove the file (creator only, idempotent)."""
        self.segment.unlink()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close; the creator also unlinks."""
        self.segment.__exit__(*exc_info)
