"""The bounded disk search of GET /v1/infer/{id}: batch names with id time spans, and which files a lookup reads."""

from __future__ import annotations

import os
import uuid

import pytest

import app.predlog.files as predlog_files
from app.ids import id_time_ms, new_prediction_id
from app.predlog.files import (
    ID_TIME_SLACK_MS,
    NO_V7_SPAN,
    OVERFLOW_FILE_MAX_AGE_S,
    BatchName,
    OverflowName,
    encode_frames,
    files_that_may_hold,
    overflow_may_hold,
    search_files,
)
from app.predlog.log import record_prefix
from app.predlog.spool import BatchSpool, _sequence_of, id_time_span

T0 = 1_800_000_000_000  # unix ms of the ids made here


def v7_at(ms: int, tail: int = 0) -> str:
    """A UUIDv7 made at ``ms`` (the variant bits set, ``tail`` in the random bits)."""
    return str(uuid.UUID(int=(ms << 80) | (0x7 << 76) | (0b10 << 62) | tail))


def record(prediction_id: str) -> bytes:
    return record_prefix(prediction_id) + b',"score":0.5}'


@pytest.fixture
def opened(monkeypatch):
    """The paths ``search_file`` reads, in order."""
    paths: list[str] = []
    real = predlog_files.search_file

    def observed(path: str, prefix: bytes):
        paths.append(os.path.basename(path))
        return real(path, prefix)

    monkeypatch.setattr(predlog_files, "search_file", observed)
    return paths


# -- names --------------------------------------------------------------------------------------

def test_a_batch_name_carries_its_sequence_and_its_span_and_parses_back():
    name = BatchName(42, T0, T0 + 250)
    assert name.file_name() == f"{42:020d}-{T0}-{T0 + 250}.batch"
    assert BatchName.parse(name.file_name()) == name
    assert _sequence_of(name.file_name()) == 42


def test_an_old_batch_name_has_no_span_and_may_hold_any_id():
    old = BatchName.parse(f"{7:020d}.batch")
    assert old == BatchName(7) and old.file_name() == f"{7:020d}.batch"
    assert _sequence_of(f"{7:020d}.batch") == 7
    assert old.may_hold(T0) and old.may_hold(0)


@pytest.mark.parametrize("name", [f"{1:020d}.batch.tmp", f"{1:020d}-{T0}-{T0}.batch.tmp", "1.batch",
                                  f"{1:020d}-{T0}.batch", "inst-s0-e1-p2-000001.sealed", "notes.txt"])
def test_other_names_are_not_batches(name):
    assert BatchName.parse(name) is None
    assert _sequence_of(name) == 0


def test_a_batch_may_hold_exactly_the_ids_of_its_span():
    name = BatchName(1, T0, T0 + 10)
    assert [name.may_hold(ms) for ms in (T0 - 1, T0, T0 + 10, T0 + 11)] == [False, True, True, False]


def test_the_span_of_a_batch_comes_from_its_v7_ids_alone():
    records = [record(v7_at(T0 + 5)), record(v7_at(T0 + 1)), record(str(uuid.uuid4())), record(v7_at(T0 + 9))]
    assert id_time_span(records) == (T0 + 1, T0 + 9)
    assert id_time_span([record(str(uuid.uuid4())), b'{"prediction_id":"a-1"}', b"junk"]) == NO_V7_SPAN


def test_an_overflow_file_may_hold_the_ids_of_its_last_second_and_the_slack():
    mtime_ns = T0 * 1_000_000
    first = T0 - int(OVERFLOW_FILE_MAX_AGE_S * 1000) - ID_TIME_SLACK_MS
    assert overflow_may_hold(mtime_ns, first) and overflow_may_hold(mtime_ns, T0 + ID_TIME_SLACK_MS)
    assert not overflow_may_hold(mtime_ns, first - 1)
    assert not overflow_may_hold(mtime_ns, T0 + ID_TIME_SLACK_MS + 1)


# -- the spool with the new names ---------------------------------------------------------------

def test_spooled_batches_are_named_by_their_span_and_come_back_in_order(tmp_path):
    spool = BatchSpool(str(tmp_path), max_bytes=1 << 20).open()
    batches = [[record(v7_at(T0 + 10 * n + i)) for i in range(3)] for n in range(3)]
    for records in batches:
        spool.append(records)
    assert sorted(os.listdir(tmp_path)) == [BatchName(n + 1, T0 + 10 * n, T0 + 10 * n + 2).file_name()
                                            for n in range(3)]
    reopened = BatchSpool(str(tmp_path), max_bytes=1 << 20).open()
    assert reopened.batches == 3 and reopened._next_seq == 4
    replayed = []
    while (item := reopened.oldest()) is not None:
        replayed.append(item.records)
        reopened.remove(item)
    assert replayed == batches


def test_batches_with_old_names_are_still_counted_and_replayed_first(tmp_path):
    spool = BatchSpool(str(tmp_path), max_bytes=1 << 20).open()
    old = [[record(str(uuid.uuid4()))] for _ in range(2)]
    for records in old:
        spool.append(records)
    for name in os.listdir(tmp_path):  # as an older release named them
        os.rename(tmp_path / name, tmp_path / BatchName(BatchName.parse(name).seq).file_name())
    assert sorted(os.listdir(tmp_path)) == [f"{1:020d}.batch", f"{2:020d}.batch"]
    upgraded = BatchSpool(str(tmp_path), max_bytes=1 << 20).open()
    assert upgraded.batches == 2
    new = [record(v7_at(T0))]
    upgraded.append(new)
    assert BatchName.parse(sorted(os.listdir(tmp_path))[-1]) == BatchName(3, T0, T0)
    replayed = []
    while (item := upgraded.oldest()) is not None:
        replayed.append(item.records)
        upgraded.remove(item)
    assert replayed == [*old, new]


# -- which files a lookup reads -----------------------------------------------------------------

def spool_of(tmp_path, spans: list[tuple[int, int]]) -> str:
    """A spool folder with one batch per span, each holding ids at both ends of its span."""
    folder = tmp_path / "batches"
    spool = BatchSpool(str(folder), max_bytes=1 << 30).open()
    for n, (first, last) in enumerate(spans):
        spool.append([record(v7_at(first, n)), record(v7_at(last, n))])
    return str(folder)


def test_a_lookup_reads_only_the_batch_whose_span_holds_the_id(tmp_path, opened):
    folder = spool_of(tmp_path, [(T0 + 100 * n, T0 + 100 * n + 50) for n in range(20)])
    wanted = v7_at(T0 + 1250, 12)
    assert search_files([folder], record_prefix(wanted), id_time_ms(wanted)) == record(wanted)
    assert opened == [BatchName(13, T0 + 1200, T0 + 1250).file_name()]
    opened.clear()
    absent = v7_at(T0 + 1275, 99)  # between two spans
    assert search_files([folder], record_prefix(absent), id_time_ms(absent)) is None
    assert opened == []


def test_a_batch_whose_name_says_another_span_is_not_read_even_if_it_holds_the_record(tmp_path, opened):
    folder = tmp_path / "batches"
    folder.mkdir()
    wanted = v7_at(T0, 1)
    (folder / BatchName(1, T0 + 60_000, T0 + 61_000).file_name()).write_bytes(encode_frames([record(wanted)]))
    assert search_files([str(folder)], record_prefix(wanted), T0) is None
    assert opened == []
    (folder / BatchName(2).file_name()).write_bytes(encode_frames([record(wanted)]))  # an old name: read
    assert search_files([str(folder)], record_prefix(wanted), T0) == record(wanted)
    assert opened == [BatchName(2).file_name()]


def test_an_overflow_file_is_read_only_when_its_mtime_is_near_the_id(tmp_path, opened):
    folder = tmp_path / "overflow"
    folder.mkdir()
    wanted = v7_at(T0, 3)
    near = folder / OverflowName("inst", 0, 1, 10, 1, True).file_name()
    far = folder / OverflowName("inst", 1, 1, 11, 1, False).file_name()
    for path, mtime_ms in ((near, T0 + 300), (far, T0 + 60_000)):
        path.write_bytes(encode_frames([record(wanted)]))
        os.utime(path, ns=(mtime_ms * 1_000_000, mtime_ms * 1_000_000))
    (folder / "unrelated.tmp").write_bytes(encode_frames([record(wanted)]))
    assert files_that_may_hold(str(folder), T0) == [str(near)]
    assert search_files([str(folder)], record_prefix(wanted), T0) == record(wanted)
    assert opened == [near.name]


def test_a_missing_folder_holds_nothing(tmp_path):
    assert files_that_may_hold(str(tmp_path / "absent"), T0) == []
    assert search_files([str(tmp_path / "absent")], record_prefix(new_prediction_id()), T0) is None
