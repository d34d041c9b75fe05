"""The data dir: where things live under $SIRA_DATA_DIR, and the one way a file there is replaced.

Every file SIRA writes whole (spool batches, shared weights, the registry snapshot, pidfiles,
state files) goes through ``write_atomically``: a reader, or a restart after a crash or a power
loss, sees the old file or the new one, never a part. One durability rule for all of them: the
data is fsynced before the rename and the folder after it. The files are small or rare, so the
two fsyncs cost nothing that matters; a rule per file would be a rule someone gets wrong.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

MASTER_PIDFILE = "sira.pid"
SUPERVISOR_PIDFILE = "supervisor.pid"
WRITER_PIDFILE = "writer.pid"
STORE_DIR = "store"
MODELS_DIR = "models"
PG_DIR = "pg"
TMP_SUFFIX = ".tmp"  # ``.<name>.<random>.tmp``: a file being written; one a dead process left is litter


def data_path(data_dir: str, *parts: str) -> str:
    return os.path.join(os.path.abspath(data_dir), *parts)


def write_atomically(path: str, data: bytes | str | Iterable[bytes | memoryview], mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` whole: a temporary file beside it, fsync, rename, fsync the folder.

    ``data`` may be an iterable of chunks (a download, checked as it streams): on any failure,
    there or in the write, the temporary file is removed, ``path`` is left as it was, and the
    exception propagates; each caller decides whether a failed write stops it.
    """
    chunks = [data.encode()] if isinstance(data, str) else [data] if isinstance(data, bytes) else data
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=TMP_SUFFIX)  # unique: threads too
    try:
        os.fchmod(fd, mode)
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp_path, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(folder)


def fsync_directory(path: str) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
