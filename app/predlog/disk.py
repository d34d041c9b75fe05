"""The prediction log's disk budget and disk errors, for the workers and the writer alike.

Budget: everything the log keeps on disk (the writer's spool batches and the workers' overflow
files) counts toward one limit, SIRA_SPOOL_MAX_BYTES. A worker checks it each time it opens a new
overflow file (``overflow_has_room``), never per record; a file holds at most
``OVERFLOW_FILE_MAX_BYTES``, and a worker opens one only if a whole file still fits, so the folder
passes the limit by at most one file per other worker spilling at that moment. When it does not fit,
the prediction cannot be kept and the request is refused (503): nothing is answered unlogged.

Errors: ENOSPC, EIO and EMFILE (and any other OSError) in a disk path of the log are counted per
reason in the log's counter block, logged once when the state changes (the first failure, a new
reason, and the first success after them), and never end a process: the caller keeps the records
where they are (the ring, the spool) and tries again later.
"""
from __future__ import annotations

import enum
import errno
import logging
import os
from collections.abc import Callable, Iterable

OVERFLOW_FILE_MAX_BYTES = 256 * 1024


class DiskReason(enum.IntEnum):
    """Why a disk operation failed; the label of ``sira_prediction_disk_errors_total``."""

    ENOSPC = 0
    EIO = 1
    EMFILE = 2
    OTHER = 3


_REASONS = {errno.ENOSPC: DiskReason.ENOSPC, errno.EDQUOT: DiskReason.ENOSPC, errno.EIO: DiskReason.EIO,
            errno.EMFILE: DiskReason.EMFILE, errno.ENFILE: DiskReason.EMFILE}


def reason_of(exc: OSError) -> DiskReason:
    return _REASONS.get(exc.errno, DiskReason.OTHER)


class DiskTrouble:
    """One process's disk errors: counted per reason, logged once per change of state. Not thread safe."""

    def __init__(self, count: Callable[[DiskReason], None], logger: logging.Logger, where: str) -> None:
        self._count = count
        self._log = logger
        self.where = where
        self.failing: DiskReason | None = None

    def failed(self, what: str, exc: OSError, consequence: str) -> None:
        """A disk operation failed: count it; log it if the state changed."""
        reason = reason_of(exc)
        self._count(reason)
        if reason is not self.failing:
            self._log.error("%s: %s failed (%s: %s); %s", self.where, what, reason.name,
                            exc.strerror or exc, consequence)
            self.failing = reason

    def ok(self) -> None:
        """A disk operation worked: log the recovery once."""
        if self.failing is not None:
            self._log.warning("%s: the disk works again (after %s)", self.where, self.failing.name)
            self.failing = None


def bytes_under(directories: Iterable[str]) -> int:
    """Bytes of the files directly in ``directories`` (missing folders count 0)."""
    total = 0
    for directory in directories:
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    try:
                        if entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue  # replayed or renamed while we looked
        except FileNotFoundError:
            continue
    return total


class LogFull(Exception):
    """The log's disk budget (SIRA_SPOOL_MAX_BYTES) has no room for another overflow file."""


def overflow_has_room(directories: Iterable[str], max_bytes: int) -> bool:
    """Whether one more whole overflow file fits in the budget."""
    return bytes_under(directories) + OVERFLOW_FILE_MAX_BYTES <= max_bytes
