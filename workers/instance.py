"""One `sira serve` per data dir: the lock that proves it, the instance id, and what a dead predecessor left.

The master takes an exclusive ``flock`` on ``<data dir>/sira.lock`` before it touches anything there
(the embedded Postgres, the metrics folder, the spool). The lock's open file is inherited by every
process the master forks (HTTP workers, supervisor, writer), so the data dir stays "in use" until the
last process of an instance is gone, not only its master: a successor never runs beside a worker or a
writer of its predecessor. The kernel drops the lock when the last of them exits, however it died
(SIGKILL, OOM kill), so a stale lock file never blocks a start. The file holds the master's pid, for
the refusal's message only.

Instance ids start with a key of the data dir (``data_dir_key``): the shared-memory segments of
every instance that ever served this data dir on this host share the prefix
``sira-<key>_``. Holding the lock proves that no such instance runs, so every segment with that
prefix other than our own belongs to a dead predecessor (``dead_predecessor_segments``): its queue
rings are drained by the writer, the rest is unlinked. Segments of other data dirs (another
instance on the same host) have other keys and are never touched.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import stat
import time

from app.predlog.log import BATCHES_DIR, CORRUPT_DIR, OVERFLOW_DIR, REJECTED_DIR, SPOOL_DIR
from shm.segment import DEFAULT_DIRECTORY, NAME_PREFIX
from workers.processes import process_exists

log = logging.getLogger("sira.master")

LOCK_FILE = "sira.lock"
SPOOL_SUBDIRS = (BATCHES_DIR, OVERFLOW_DIR, REJECTED_DIR, CORRUPT_DIR)
# The lock's last master is gone but its workers may still be finishing (gunicorn's workers notice a
# dead master within a second; the sidecars die with it): wait this long before refusing.
ORPHANS_EXIT_WAIT_S = 5.0
_LOCK_POLL_S = 0.05


class DataDirInUse(Exception):
    """Another `sira serve` (or what is left of one) holds the data dir."""


class DataDirNotPrivate(Exception):
    """Someone other than the server's user could write into the data dir or its spool."""


GROUP_OR_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


def check_private(data_dir: str) -> None:
    """The data dir and its spool folders must not be writable by group or others.

    What they hold goes into the immutable prediction log as it is: a file another user could put
    there would become rows. A folder that does not exist yet is created private by the server.
    """
    spool = os.path.join(data_dir, SPOOL_DIR)
    for path in (data_dir, spool, *(os.path.join(spool, sub) for sub in SPOOL_SUBDIRS)):
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            continue
        if mode & GROUP_OR_OTHERS_WRITE:
            raise DataDirNotPrivate(
                f"{os.path.abspath(path)} is writable by group or others (mode {stat.S_IMODE(mode):04o}); only the "
                f"server's user may write where the prediction log keeps its files: chmod go-w {os.path.abspath(path)}")


def data_dir_key(data_dir: str) -> str:
    """A short, stable key of this data dir on this host: its real path and its inode.

    The inode tells apart two volumes mounted at the same path (a new pod's fresh emptyDir), which
    must not take each other's segments; a container restart in the same pod keeps both.
    """
    real = os.path.realpath(data_dir)
    st = os.stat(real)
    digest = hashlib.sha256(f"{real}\0{st.st_dev}\0{st.st_ino}".encode()).hexdigest()
    return digest[:12]


def new_instance_id(data_dir: str) -> str:
    """``<data dir key>_<pid>_<random>``: names this serve's segments and overflow files."""
    return f"{data_dir_key(data_dir)}_{os.getpid()}_{secrets.token_hex(4)}"


class DataDirLock:
    """The held lock of a data dir; ``close`` (or leaving the ``with``) lets go of this process's hold."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # children that inherited it keep the lock until they exit
            self.fd = -1

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def lock_data_dir(data_dir: str, wait_for_orphans_s: float = ORPHANS_EXIT_WAIT_S) -> DataDirLock:
    """Hold the data dir for this process and its children; DataDirInUse when another instance has it."""
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    path = os.path.join(os.path.abspath(data_dir), LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        _acquire(fd, path, wait_for_orphans_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except BaseException:
        os.close(fd)
        raise
    return DataDirLock(fd, path)


def _acquire(fd: int, path: str, wait_for_orphans_s: float) -> None:
    """Take the lock; while its master is dead but its children finish, wait a little for them."""
    deadline = time.monotonic() + wait_for_orphans_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        holder = _holder_pid(fd)
        master_alive = holder is not None and process_exists(holder)
        if master_alive or time.monotonic() >= deadline:
            raise DataDirInUse(_in_use_message(path, holder, master_alive))
        time.sleep(_LOCK_POLL_S)


def _holder_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode("ascii").strip())
    except (ValueError, UnicodeDecodeError):
        return None


def _in_use_message(path: str, pid: int | None, master_alive: bool) -> str:
    data_dir = os.path.dirname(path)
    if master_alive:
        return f"data dir {data_dir} is in use by sira serve pid {pid} (stop it, or set another SIRA_DATA_DIR)"
    return (f"data dir {data_dir} is still held by processes of sira serve pid {pid or '?'}, which has "
            f"exited (they hold {path}; they stop within seconds, or stop them by pid)")


# -- what a dead predecessor left in /dev/shm ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LeftSegment:
    """A segment of a dead instance of this data dir: ``sira-<instance>-<kind>``."""

    name: str
    instance_id: str
    kind: str


def dead_predecessor_segments(instance_id: str, directory: str = DEFAULT_DIRECTORY) -> list[LeftSegment]:
    """Segments of earlier instances of our data dir (call only while holding its lock)."""
    key = instance_id.split("_", 1)[0]
    prefix = f"{NAME_PREFIX}{key}_"
    left = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.name.startswith(prefix) or not entry.is_file(follow_symlinks=False):
                continue
            owner, _, kind = entry.name[len(NAME_PREFIX):].rpartition("-")
            if owner and owner != instance_id:
                left.append(LeftSegment(entry.name, owner, kind))
    return sorted(left, key=lambda segment: segment.name)
