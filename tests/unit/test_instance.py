"""One `sira serve` per data dir: the lock, the instance ids, and finding what a dead predecessor left."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import time

import pytest

from workers.instance import (
    DataDirInUse,
    DataDirNotPrivate,
    check_private,
    data_dir_key,
    dead_predecessor_segments,
    lock_data_dir,
    new_instance_id,
)


def in_child(action) -> int:
    """Fork a child that runs ``action`` and then sleeps until killed; its pid."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            action()
            os.write(write_end, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(write_end)
    assert os.read(read_end, 1) == b"x"
    os.close(read_end)
    return pid


def reap(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_a_second_lock_on_the_same_data_dir_is_refused_naming_the_holder(tmp_path):
    with lock_data_dir(str(tmp_path)):
        with pytest.raises(DataDirInUse, match=f"in use by sira serve pid {os.getpid()}"):
            lock_data_dir(str(tmp_path), wait_for_orphans_s=0.1)
    with lock_data_dir(str(tmp_path)):  # let go: free again
        pass


def test_the_lock_goes_with_a_killed_holder(tmp_path):
    holder = in_child(lambda: lock_data_dir(str(tmp_path)))
    with pytest.raises(DataDirInUse, match=str(holder)):
        lock_data_dir(str(tmp_path), wait_for_orphans_s=0.1)
    reap(holder)  # SIGKILL: no cleanup ran, the kernel drops the lock
    with lock_data_dir(str(tmp_path)):
        with open(tmp_path / "sira.lock", encoding="ascii") as handle:
            assert int(handle.read()) == os.getpid()


def holder_that_leaves_an_orphan(data_dir: str, orphan_lives_s: float) -> None:
    """Take the lock, fork a child that inherits it (a worker), and exit like a killed master."""
    lock = lock_data_dir(data_dir)
    orphan = os.fork()
    if orphan == 0:
        time.sleep(orphan_lives_s)
        os._exit(0)
    with open(os.path.join(data_dir, "orphan.pid"), "w", encoding="ascii") as handle:
        handle.write(str(orphan))
    lock.close()


def dead_master(data_dir: str, orphan_lives_s: float) -> int:
    """The pid of a master that took the lock and exited, leaving a child that holds it."""
    master = os.fork()
    if master == 0:
        holder_that_leaves_an_orphan(data_dir, orphan_lives_s)
        os._exit(0)
    os.waitpid(master, 0)
    return master


def test_a_dead_masters_children_keep_the_lock_until_they_exit(tmp_path):
    data_dir = str(tmp_path)
    master = dead_master(data_dir, orphan_lives_s=30)
    try:
        with pytest.raises(DataDirInUse, match=f"still held by processes of sira serve pid {master}, which has exited"):
            lock_data_dir(data_dir, wait_for_orphans_s=0.3)
    finally:
        with open(os.path.join(data_dir, "orphan.pid"), encoding="ascii") as handle:
            os.kill(int(handle.read()), signal.SIGKILL)  # not our child: init reaps it


def test_a_dead_masters_children_are_waited_for_a_little(tmp_path):
    data_dir = str(tmp_path)
    dead_master(data_dir, orphan_lives_s=0.5)
    started = time.monotonic()
    with lock_data_dir(data_dir, wait_for_orphans_s=10):
        assert time.monotonic() - started < 9


def test_the_data_dir_key_is_stable_and_tells_volumes_apart(tmp_path):
    first = tmp_path / "a"
    first.mkdir()
    (tmp_path / "b").mkdir()
    key = data_dir_key(str(first))
    assert key == data_dir_key(str(first)) == data_dir_key(str(tmp_path / "x" / ".." / "a"))
    assert key != data_dir_key(str(tmp_path / "b"))
    shutil.rmtree(first)
    os.rename(tmp_path / "b", first)  # another volume at the same path (a new pod's emptyDir)
    assert data_dir_key(str(first)) != key
    instance = new_instance_id(str(first))
    assert instance.startswith(data_dir_key(str(first)) + f"_{os.getpid()}_")


def test_only_dead_instances_of_the_same_data_dir_are_predecessors(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    key = data_dir_key(str(data))
    ours = f"{key}_100_aaaa"
    names = [f"sira-{ours}-predlog", f"sira-{ours}-cache",  # ours: kept
             f"sira-{key}_90_bbbb-predlog", f"sira-{key}_90_bbbb-control",  # a dead predecessor
             f"sira-{key}_80_cccc-predstats",  # an older one
             "sira-0123456789ab_90_bbbb-predlog",  # another data dir's instance: never touched
             f"other-{key}_90_bbbb-predlog"]
    for name in names:
        (shm / name).write_bytes(b"")
    left = dead_predecessor_segments(ours, str(shm))
    assert [(item.instance_id, item.kind) for item in left] == [
        (f"{key}_80_cccc", "predstats"), (f"{key}_90_bbbb", "control"), (f"{key}_90_bbbb", "predlog")]


def test_the_data_dir_is_created_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        with lock_data_dir(str(tmp_path / "new")):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o700
    check_private(str(tmp_path / "new"))  # passes


def test_a_data_dir_others_can_write_is_refused_with_the_fix(tmp_path):
    os.chmod(tmp_path, 0o775)
    with pytest.raises(DataDirNotPrivate, match=f"chmod go-w {tmp_path}$"):
        check_private(str(tmp_path))
