"""The writer's spool and its view of the workers' overflow files (app/predlog/spool.py), one process."""

from __future__ import annotations

import logging
import os

import pytest

from app.predlog.files import OverflowName, encode_frames
from app.predlog.spool import (
    BATCH_SUFFIX,
    CORRUPT_DIR,
    BatchSpool,
    OverflowFiles,
    SpoolCorrupt,
    read_batch,
)


def batch(tag: str, count: int = 3) -> list[bytes]:
    return [f'{{"prediction_id":"{tag}-{i}"}}'.encode() for i in range(count)]


def test_batches_come_back_oldest_first_and_go_once_removed(tmp_path):
    spool = BatchSpool(str(tmp_path), max_bytes=1 << 20).open()
    for tag in ("a", "b", "c"):
        spool.append(batch(tag))
    assert spool.batches == 3 and spool.bytes_used == sum(f.stat().st_size for f in tmp_path.iterdir())
    replayed = []
    while (item := spool.oldest()) is not None:
        replayed.append(item.records)
        spool.remove(item)
    assert replayed == [batch("a"), batch("b"), batch("c")]
    assert spool.batches == 0 and spool.bytes_used == 0 and os.listdir(tmp_path) == []


def test_reopening_counts_what_waits_drops_unfinished_writes_and_keeps_the_order(tmp_path):
    first = BatchSpool(str(tmp_path), max_bytes=1 << 20).open()
    first.append(batch("a"))
    first.append(batch("b"))
    (tmp_path / f"{3:020d}{BATCH_SUFFIX}.tmp").write_bytes(b"half a batch")  # killed mid-write
    second = BatchSpool(str(tmp_path), max_bytes=1 << 20).open()
    assert second.batches == 2 and second.bytes_used == first.bytes_used
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    second.append(batch("c"))
    order = []
    while (item := second.oldest()) is not None:
        order.append(item.records[0])
        second.remove(item)
    assert order == [batch("a")[0], batch("b")[0], batch("c")[0]]


def test_a_damaged_batch_is_set_aside_never_deleted(tmp_path):
    folder = tmp_path / "batches"
    spool = BatchSpool(str(folder), max_bytes=1 << 20).open()
    spool.append(batch("a"))
    spool.append(batch("b"))
    damaged = sorted(folder.iterdir())[0]
    data = bytearray(damaged.read_bytes())
    data[-2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(SpoolCorrupt):
        read_batch(str(damaged))
    assert spool.oldest().records == batch("b")
    assert os.listdir(tmp_path / CORRUPT_DIR) == [damaged.name]
    assert spool.batches == 1


def test_the_size_limit_is_logged_as_the_spool_fills_and_refuses_unless_forced(tmp_path, caplog):
    spool = BatchSpool(str(tmp_path), max_bytes=1000).open()
    records = [b"x" * 96]  # 124 bytes with the header and the frame
    with caplog.at_level(logging.WARNING, logger="sira.spool"):
        while spool.has_room():
            spool.append(records)
    # 124, 248, ... bytes: marks 50, 75, 90 and 100 % are passed at 62, 86, 99 and 111 %
    percents = [record.getMessage().split("%")[0].rsplit(" ", 1)[1] for record in caplog.records]
    assert percents == ["62", "86", "99", "111"]
    assert [record.levelno for record in caplog.records] == [logging.WARNING] * 3 + [logging.ERROR]
    with pytest.raises(ValueError):
        spool.append(records)
    spool.append(records, force=True)  # at shutdown nothing is refused
    assert spool.batches == 10


def overflow_file(folder, name: OverflowName, records: list[bytes], tail: bytes = b"") -> str:
    folder.mkdir(exist_ok=True)
    path = folder / name.file_name()
    path.write_bytes(encode_frames(records) + tail)
    return str(path)


def test_overflow_files_are_ready_when_sealed_or_when_their_worker_is_gone(tmp_path):
    folder = tmp_path / "overflow"
    alive = {111}
    epochs = {0: 5, 1: 2}
    files = OverflowFiles(str(folder), "inst", producer_epoch=epochs.__getitem__, pid_alive=alive.__contains__)
    ready = [
        overflow_file(folder, OverflowName("inst", 0, 5, 111, 1, True), batch("sealed")),
        overflow_file(folder, OverflowName("older", 0, 5, 111, 1, False), batch("other instance")),
        overflow_file(folder, OverflowName("inst", 1, 1, 111, 1, False), batch("slot taken over")),
        overflow_file(folder, OverflowName("inst", 1, 2, 222, 1, False), batch("pid dead")),
    ]
    overflow_file(folder, OverflowName("inst", 0, 5, 111, 2, False), batch("still written"))
    (folder / "unrelated.txt").write_text("not ours")
    assert sorted(files.ready()) == sorted(ready)
    assert files.waiting() == 5


def test_an_overflow_file_with_a_torn_tail_gives_its_complete_records(tmp_path, caplog):
    folder = tmp_path / "overflow"
    files = OverflowFiles(str(folder), "inst", producer_epoch=lambda slot: 1, pid_alive=lambda pid: True)
    path = overflow_file(folder, OverflowName("inst", 0, 1, 1, 1, True), batch("a", 4), tail=b"\x40\x00\x00\x00{")
    with caplog.at_level(logging.WARNING, logger="sira.spool"):
        item = files.read(path)
    assert item.records == batch("a", 4)
    assert "torn record" in caplog.text
    files.remove(item)
    assert files.waiting() == 0
