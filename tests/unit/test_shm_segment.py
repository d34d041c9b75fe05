"""Segment: exclusive create, checked attach, ownership, fork, names and stale cleanup."""
from __future__ import annotations

import os
import struct
import uuid

import pytest

from shm.segment import (
    COMMON_HEADER_SIZE,
    DEFAULT_DIRECTORY,
    Segment,
    SegmentError,
    instance_prefix,
    remove_stale_segments,
    segment_name,
    segment_path,
)

MAGIC = b"SIRATEST"
VERSION = 3


@pytest.fixture
def directory(tmp_path):
    """A private directory standing in for /dev/shm; pytest removes it with every file."""
    return str(tmp_path)


@pytest.fixture
def segment(directory):
    """A 4 KiB segment with a 16-byte structure header, closed and unlinked afterwards."""
    seg = Segment.create("sira-test-seg", 4096, MAGIC, VERSION, directory, header=b"H" * 16)
    try:
        yield seg
    finally:
        seg.close()
        seg.unlink()


def test_attach_sees_the_creators_header_and_bytes(segment, directory):
    segment.buf[200:205] = b"hello"
    with Segment.attach("sira-test-seg", MAGIC, VERSION, directory) as other:
        assert other.size == 4096
        assert other.header_size == COMMON_HEADER_SIZE + 16
        assert other.specific_header == b"H" * 16
        assert other.creator_pid == os.getpid()
        assert other.buf[200:205] == b"hello"
        other.buf[300:303] = b"abc"
    assert segment.buf[300:303] == b"abc"


def test_create_is_zero_filled_after_the_headers(segment):
    assert segment.buf[segment.header_size:] == bytes(4096 - segment.header_size)


def test_create_is_exclusive(segment, directory):
    with pytest.raises(FileExistsError):
        Segment.create("sira-test-seg", 4096, MAGIC, VERSION, directory)


def test_create_refuses_a_size_smaller_than_the_headers(directory):
    with pytest.raises(ValueError):
        Segment.create("sira-test-small", COMMON_HEADER_SIZE + 3, MAGIC, VERSION, directory,
                       header=b"1234")
    assert os.listdir(directory) == []


def test_attach_to_a_missing_segment_raises(directory):
    with pytest.raises(SegmentError, match="does not exist"):
        Segment.attach("sira-test-none", MAGIC, VERSION, directory)


def test_attach_with_wrong_magic_raises(segment, directory):
    with pytest.raises(SegmentError, match="magic"):
        Segment.attach("sira-test-seg", b"SIRAXXXX", VERSION, directory)


def test_attach_with_wrong_layout_version_raises(segment, directory):
    with pytest.raises(SegmentError, match="layout version 3"):
        Segment.attach("sira-test-seg", MAGIC, VERSION + 1, directory)


def test_attach_to_a_half_created_segment_raises(segment, directory):
    segment.buf[0:8] = bytes(8)  # what a reader sees before the creator writes the magic
    with pytest.raises(SegmentError, match="not .*initialised"):
        Segment.attach("sira-test-seg", MAGIC, VERSION, directory)


def test_attach_to_a_resized_file_raises(segment, directory):
    os.truncate(segment.path, 8192)
    with pytest.raises(SegmentError, match="records 4096 bytes but the file has 8192"):
        Segment.attach("sira-test-seg", MAGIC, VERSION, directory)


def test_attach_to_a_file_shorter_than_the_header_raises(directory):
    path = os.path.join(directory, "sira-test-short")
    with open(path, "wb") as file:
        file.write(MAGIC)
    with pytest.raises(SegmentError, match="shorter"):
        Segment.attach("sira-test-short", MAGIC, VERSION, directory)


def test_attach_with_a_corrupt_header_size_raises(segment, directory):
    segment.buf[12:16] = struct.pack("<I", 5000)
    with pytest.raises(SegmentError, match="header size 5000"):
        Segment.attach("sira-test-seg", MAGIC, VERSION, directory)


def test_readonly_attach_cannot_write(segment, directory):
    with Segment.attach("sira-test-seg", MAGIC, VERSION, directory, readonly=True) as reader:
        assert reader.buf[0:8] == MAGIC
        with pytest.raises(TypeError):
            reader.buf[100:101] = b"x"


def test_close_and_unlink_are_idempotent_and_remove_the_file(directory):
    seg = Segment.create("sira-test-idem", 4096, MAGIC, VERSION, directory)
    seg.close()
    seg.close()
    assert seg.closed
    assert os.path.exists(seg.path)
    seg.unlink()
    seg.unlink()
    assert not os.path.exists(seg.path)


def test_unlink_after_someone_else_removed_the_file_is_quiet(directory):
    seg = Segment.create("sira-test-gone", 4096, MAGIC, VERSION, directory)
    os.unlink(seg.path)
    seg.close()
    seg.unlink()


def test_unlink_leaves_a_successor_with_the_same_name_alone(directory):
    first = Segment.create("sira-test-again", 4096, MAGIC, VERSION, directory)
    os.unlink(first.path)
    second = Segment.create("sira-test-again", 4096, MAGIC, VERSION, directory)
    try:
        first.close()
        first.unlink()
        assert os.path.exists(second.path)
    finally:
        second.close()
        second.unlink()


def test_only_the_creator_unlinks(segment, directory):
    other = Segment.attach("sira-test-seg", MAGIC, VERSION, directory)
    try:
        assert segment.is_owner and not other.is_owner
        with pytest.raises(SegmentError, match="only its creator"):
            other.unlink()
        assert os.path.exists(segment.path)
    finally:
        other.close()


def test_context_manager_closes_and_the_owner_unlinks(directory):
    with Segment.create("sira-test-ctx", 4096, MAGIC, VERSION, directory) as seg:
        with Segment.attach("sira-test-ctx", MAGIC, VERSION, directory) as other:
            pass
        assert other.closed and os.path.exists(seg.path)
    assert seg.closed
    assert not os.path.exists(seg.path)


def test_close_with_an_exported_view_raises_until_released(directory):
    seg = Segment.create("sira-test-view", 4096, MAGIC, VERSION, directory)
    try:
        view = memoryview(seg.buf)
        with pytest.raises(SegmentError, match="memoryview"):
            seg.close()
        view.release()
        seg.close()
        assert seg.closed
    finally:
        seg.unlink()


def test_mapping_inherited_across_fork_is_shared_and_not_owned(segment):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report, then leave without running pytest's cleanup
        status = 1
        try:
            segment.buf[500:505] = b"child"
            refused = False
            try:
                segment.unlink()
            except SegmentError:
                refused = True
            os.write(write_end, b"%d%d" % (int(refused), int(segment.is_owner)))
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        report = os.read(read_end, 2)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == b"10"  # unlink refused, not the owner
    assert segment.buf[500:505] == b"child"
    assert os.path.exists(segment.path)


def test_segment_name_is_prefixed_and_checked():
    assert segment_name("a1b2", "cache") == "sira-a1b2-cache"
    assert instance_prefix("a1b2") == "sira-a1b2-"
    for instance_id, kind in (("a-b", "cache"), ("a", "../x"), ("", "cache"), ("a", "c d")):
        with pytest.raises(ValueError):
            segment_name(instance_id, kind)


def test_segment_path_refuses_names_that_leave_the_directory():
    for name in ("../etc", "a/b", ".hidden", "", "-x"):
        with pytest.raises(ValueError):
            segment_path(name, "/dev/shm")


def test_remove_stale_segments_removes_only_that_instance(directory):
    mine = [segment_name("old1", kind) for kind in ("cache", "ring_0", "control")]
    others = [segment_name("old10", "cache"), "unrelated"]
    for name in mine + others:
        open(os.path.join(directory, name), "wb").close()
    removed = remove_stale_segments(instance_prefix("old1"), directory)
    assert removed == sorted(mine)
    assert sorted(os.listdir(directory)) == sorted(others)


def test_remove_stale_segments_refuses_a_foreign_prefix(directory):
    with pytest.raises(ValueError):
        remove_stale_segments("", directory)


def test_real_dev_shm_segment_is_created_and_removed():
    if not os.path.isdir(DEFAULT_DIRECTORY):
        pytest.skip("no /dev/shm on this system")
    name = segment_name(f"t{uuid.uuid4().hex[:12]}", "unit")
    seg = Segment.create(name, 8192, MAGIC, VERSION)
    try:
        assert seg.path == os.path.join(DEFAULT_DIRECTORY, name)
        with Segment.attach(name, MAGIC, VERSION) as other:
            assert other.size == 8192
    finally:
        seg.close()
        seg.unlink()
    assert not os.path.exists(seg.path)
