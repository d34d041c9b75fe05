"""The prediction log's disk budget and disk errors: a worker refuses (503) what nothing can keep, counts
it, and says so once per change of state; the overflow files count toward SIRA_SPOOL_MAX_BYTES."""

from __future__ import annotations

import errno
import logging
import os
import zlib

import pytest

from app.errors import ServiceUnavailable
from app.predlog.disk import OVERFLOW_FILE_MAX_BYTES, DiskReason, DiskTrouble, LogFull, bytes_under, reason_of
from app.predlog.files import OVERFLOW_MAGIC, OverflowRecords, OverflowSpill, decode_overflow, find_framed_record
from app.predlog.handoff import HandoffError, decode_object
from app.predlog.log import PredictionLog, PredictionLogConfig, SlotStat, slot_cell
from app.predlog.spool import BatchSpool
from tests.unit.test_predlog import body, segments  # noqa: F401 (a fixture)


def test_reasons_of_the_errors_that_matter():
    assert reason_of(OSError(errno.ENOSPC, "full")) is DiskReason.ENOSPC
    assert reason_of(OSError(errno.EDQUOT, "quota")) is DiskReason.ENOSPC
    assert reason_of(OSError(errno.EIO, "io")) is DiskReason.EIO
    assert reason_of(OSError(errno.EMFILE, "fds")) is DiskReason.EMFILE
    assert reason_of(OSError(errno.EROFS, "read-only")) is DiskReason.OTHER


def test_disk_trouble_counts_every_failure_and_logs_each_change_once(caplog):
    counted = []
    trouble = DiskTrouble(counted.append, logging.getLogger("test.disk"), "the writer")
    with caplog.at_level(logging.WARNING, "test.disk"):
        for _ in range(3):
            trouble.failed("spooling", OSError(errno.ENOSPC, "No space left on device"), "they wait")
        trouble.failed("spooling", OSError(errno.EIO, "Input/output error"), "they wait")
        trouble.ok()
        trouble.ok()
        trouble.failed("spooling", OSError(errno.ENOSPC, "No space left on device"), "they wait")
    assert counted == [DiskReason.ENOSPC] * 3 + [DiskReason.EIO, DiskReason.ENOSPC]
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "the writer: spooling failed (ENOSPC: No space left on device); they wait",
        "the writer: spooling failed (EIO: Input/output error); they wait",
        "the writer: the disk works again (after EIO)",
        "the writer: spooling failed (ENOSPC: No space left on device); they wait",
    ]


def test_an_overflow_file_opens_only_if_a_whole_one_fits_the_budget(tmp_path):
    overflow, batches = tmp_path / "overflow", tmp_path / "batches"
    batches.mkdir()
    budget = 4 * OVERFLOW_FILE_MAX_BYTES
    spill = OverflowSpill(str(overflow), "inst", 0, 1, (str(overflow), str(batches)), budget)
    spill.write(b"x" * 100)  # an empty folder: room
    (batches / "big.batch").write_bytes(b"\0" * (budget - OVERFLOW_FILE_MAX_BYTES))
    spill.write(b"x" * 100)  # the open file goes on growing: the budget is checked per file, not per record
    spill.seal()
    with pytest.raises(LogFull, match="SIRA_SPOOL_MAX_BYTES"):
        spill.write(b"x" * 100)
    os.unlink(batches / "big.batch")  # the writer replayed its spool
    spill.write(b"x" * 100)
    assert bytes_under([str(overflow), str(batches)]) <= budget


def test_an_overflow_file_is_rotated_at_its_byte_size(tmp_path):
    spill = OverflowSpill(str(tmp_path), "inst", 0, 1)
    record = b"r" * (OVERFLOW_FILE_MAX_BYTES // 3)
    for _ in range(4):
        spill.write(record)
    assert spill.files_sealed == 1  # three fit in the first file, the fourth opened a second
    assert all(os.path.getsize(tmp_path / name) <= OVERFLOW_FILE_MAX_BYTES for name in os.listdir(tmp_path))


def full_log(tmp_path, rings, stats, budget_bytes: int) -> PredictionLog:
    config = PredictionLogConfig(instance_id="inst", rings_segment="unused", stats_segment="unused",
                                 slots=rings.slots, ring_bytes=rings.ring_bytes, spool_dir=str(tmp_path / "spool"),
                                 database_url=None, spool_max_bytes=budget_bytes, batch_rows=100)
    return PredictionLog(config, 0, rings, stats)


def test_a_prediction_nothing_can_keep_is_refused_counted_and_logged_once(tmp_path, segments, caplog):  # noqa: F811
    rings, stats = segments(slots=1, ring_bytes=4096)
    log = full_log(tmp_path, rings, stats, budget_bytes=OVERFLOW_FILE_MAX_BYTES - 1)  # no overflow file fits
    kept = 0
    with caplog.at_level(logging.ERROR, "sira.predlog"):
        refused = 0
        for _ in range(40):
            try:
                log.append(body(), "evt", "fraud_score", None)
                kept += 1
            except ServiceUnavailable as exc:
                assert exc.headers == {"Retry-After": "1"}
                refused += 1
    assert kept == log.appended and kept > 0 and refused == 40 - kept
    assert stats.get(slot_cell(0, SlotStat.REFUSED)) == refused
    assert sum("predictions are refused" in r.getMessage() for r in caplog.records) == 1


def test_a_failing_overflow_folder_is_a_counted_disk_error(tmp_path, segments):  # noqa: F811
    rings, stats = segments(slots=1, ring_bytes=4096)
    log = full_log(tmp_path, rings, stats, budget_bytes=1 << 30)
    os.makedirs(tmp_path / "spool")
    (tmp_path / "spool" / "overflow").write_text("a file where the folder should be")
    with pytest.raises(ServiceUnavailable):
        for _ in range(40):
            log.append(body(), "evt", "fraud_score", None)
    assert stats.get(slot_cell(0, SlotStat.DISK_ERRORS + DiskReason.OTHER)) == 1
    assert log.disk.failing is DiskReason.OTHER


def test_handed_off_objects_decode_by_their_kind(tmp_path):
    records = [b'{"prediction_id":"a"}', b'{"prediction_id":"b"}']
    spool = BatchSpool(str(tmp_path), 1 << 20).open()
    spool.append(records)
    (path,) = spool.paths()
    with open(path, "rb") as handle:
        decoded = decode_object(f"prediction-spool/inst/batches/{os.path.basename(path)}", handle.read())
    assert decoded.records == records
    frames = b"".join(len(r).to_bytes(4, "little") + r for r in records)
    found = decode_object("prediction-spool/inst/overflow/x.sealed", frames + b"\x09\0\0\0torn")
    assert found.records == records and found.damaged == b""  # a torn tail was never answered
    checked = OVERFLOW_MAGIC + b"".join(len(r).to_bytes(4, "little") + zlib.crc32(r).to_bytes(4, "little") + r
                                        for r in records)
    damaged = checked[:-1] + b"X"
    found = decode_object("prediction-spool/inst/overflow/y.sealed", damaged)
    assert found.records == records[:1] and found.damaged == damaged[len(OVERFLOW_MAGIC) + 8 + len(records[0]):]
    with pytest.raises(HandoffError):
        decode_object("prediction-spool/inst/other/x", frames)


def spilled_file(directory, records: list[bytes]) -> str:
    spill = OverflowSpill(str(directory), "inst", 0, 1)
    for record in records:
        spill.write(record)
    spill.seal()
    (name,) = os.listdir(directory)
    return os.path.join(directory, name)


def test_overflow_records_carry_a_checksum_and_a_damaged_one_ends_the_trusted_part(tmp_path):
    records = [b'{"prediction_id":"%d","x":"...."}' % i for i in range(3)]
    path = spilled_file(tmp_path, records)
    data = bytearray(open(path, "rb").read())
    assert data.startswith(OVERFLOW_MAGIC)
    assert decode_overflow(bytes(data)) == OverflowRecords(records, b"", False)
    second = data.index(records[1])
    data[second + 5] ^= 0x01  # one bit of the second record
    found = decode_overflow(bytes(data))
    assert found.records == records[:1] and not found.torn
    assert found.rest == bytes(data[second - 8:])  # from the bad frame's header on: nothing after it is trusted
    assert find_framed_record(bytes(data), records[0][:20]) == records[0]
    assert find_framed_record(bytes(data), b'{"prediction_id":"1"') is None  # a record that fails its crc is no match


def test_a_torn_last_overflow_record_is_told_apart_from_damage(tmp_path):
    records = [b'{"prediction_id":"a"}', b'{"prediction_id":"b"}']
    data = open(spilled_file(tmp_path, records), "rb").read()
    found = decode_overflow(data[:-3])  # its worker was killed writing the last one
    assert found.records == records[:1] and found.torn and found.rest == data[len(data) - 3 - 8 - 18:-3]


def test_overflow_files_written_before_checksums_still_read(tmp_path):
    records = [b'{"prediction_id":"a"}', b'{"prediction_id":"b"}']
    legacy = b"".join(len(r).to_bytes(4, "little") + r for r in records)
    assert decode_overflow(legacy) == OverflowRecords(records, b"", False)
    assert find_framed_record(legacy, b'{"prediction_id":"b"') == records[1]


def test_an_overflow_file_whose_magic_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    spill = OverflowSpill(str(tmp_path), "inst", 0, 1)
    real_write = os.write

    def full_disk(fd, data):
        if data == OVERFLOW_MAGIC:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError):
        spill.write(b'{"prediction_id":"a"}')
    assert os.listdir(tmp_path) == [] and not spill.is_open
    monkeypatch.setattr(os, "write", real_write)  # space returns
    spill.write(b'{"prediction_id":"b"}')
    spill.seal()
    (name,) = os.listdir(tmp_path)
    assert decode_overflow((tmp_path / name).read_bytes()).records == [b'{"prediction_id":"b"}']
