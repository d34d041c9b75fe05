"""The rings the writer drains: its own instance's, and those a dead predecessor left; damage set aside.

``RingSet`` takes batches from every slot in turn (``take``) and isolates each slot from the others:

- a record whose checksum fails (shm/ring_reader.py) is set aside, its bytes kept under the spool's
  ``corrupt/`` with a log line and ``sira_prediction_damage_total``, and the slot flows on. A
  record that fails its check while its producer runs is given ``DAMAGE_GRACE_S`` first: on a weakly
  ordered CPU (arm64) the bytes of a record may become visible after its published position;
- a slot whose positions are impossible (its header was damaged) is reset after its bytes are kept;
- a slot whose evidence cannot be kept now (a full disk) stays as it is and is tried again: nothing
  is consumed that is not durable somewhere.

Rings a dead instance left (``adopted``) are drained like our own and removed from /dev/shm once
empty: their producers are gone, so an empty ring stays empty.
"""
from __future__ import annotations

import contextlib
import logging
import time

import orjson

from app.predlog.disk import DiskTrouble
from app.predlog.log import Stat
from app.predlog.spool import keep_aside
from shm.counters import CounterBlock
from shm.ring import QueueRings, RingCorrupt, RingReader
from shm.segment import remove_segment

log = logging.getLogger("sira.writer")

RING_BATCH_BYTES = 16 * 1024 * 1024
DAMAGE_GRACE_S = 1.0


class RingSet:
    """Every ring slot the writer consumes, in turn; see the module doc."""

    def __init__(self, rings: QueueRings, adopted: list[QueueRings], stats: CounterBlock,
                 corrupt_dir: str, disk: DiskTrouble) -> None:
        self.stats = stats
        self.corrupt_dir = corrupt_dir
        self.disk = disk
        self.own = [rings.reader(slot) for slot in range(rings.slots)]  # index = slot
        self.adopted = [(other, [other.reader(slot) for slot in range(other.slots)]) for other in adopted]
        self.labels = {reader: f"{rings.segment.name}-s{reader.slot}" for reader in self.own}
        for other, readers in self.adopted:
            self.labels.update({reader: f"{other.segment.name}-s{reader.slot}" for reader in readers})
        self.readers: list[RingReader] = self.own + [r for _other, readers in self.adopted for r in readers]
        self._next = 0
        self._damage_seen: dict[RingReader, tuple[int, float]] = {}
        self.damage_set_aside = 0  # records and slots set aside by this writer

    # -- batches ------------------------------------------------------------------------------------

    def take(self, max_records: int, force: bool = False) -> tuple[list[bytes], list[tuple[RingReader, int]]]:
        """Up to ``max_records`` records, each slot in turn; with the positions to commit.

        ``force`` (the drain at stop: no producer runs) sets damage aside without the grace.
        """
        records: list[bytes] = []
        ends: list[tuple[RingReader, int]] = []
        count = len(self.readers)
        for i in range(count):
            reader = self.readers[(self._next + i) % count]
            room = max_records - len(records)
            if room <= 0:
                break
            try:
                part, end = reader.peek_batch(room, RING_BATCH_BYTES)
            except RingCorrupt as exc:
                self._reset_slot(reader, exc)
                continue
            if part:
                records.extend(part)
                ends.append((reader, end))
            elif reader.damaged_at is not None:
                self._skip_damaged(reader, force)
        self._next = (self._next + 1) % max(count, 1)
        return records, ends

    def _skip_damaged(self, reader: RingReader, force: bool) -> None:
        """A record at the head of the slot fails its check: keep its bytes, then move past it."""
        position = reader.damaged_at
        first_seen = self._damage_seen.get(reader)
        now = time.monotonic()
        if first_seen is None or first_seen[0] != position:
            self._damage_seen[reader] = (position, now)
            if not force:
                return
        elif not force and now - first_seen[1] < DAMAGE_GRACE_S:
            return
        try:
            evidence = reader.skip_damaged(lambda raw: self._keep(reader, "record", raw))
        except OSError as exc:  # not consumed: tried again next time
            self.disk.failed("keeping damaged ring bytes", exc, "the damaged record waits in its ring")
            return
        self._damage_seen.pop(reader, None)
        if evidence:  # else it became whole: a record still being published
            log.error("prediction ring %s: a record at %d failed its checksum; its %d bytes are kept in %s",
                      self.labels[reader], position, len(evidence), self.corrupt_dir)

    def _reset_slot(self, reader: RingReader, exc: RingCorrupt) -> None:
        """The slot's positions are impossible: keep its whole data area, then start it afresh."""
        try:
            evidence = reader.reset_damaged_slot(lambda raw: self._keep(reader, "slot", raw))
        except OSError as exc:  # not reset: the slot waits (its worker spills) and is tried again
            self.disk.failed("keeping a damaged ring slot", exc, "the slot waits as it is")
            return
        log.error("prediction ring %s is damaged (%s): its %d bytes are kept in %s and the slot starts "
                  "afresh", self.labels[reader], exc, len(evidence), self.corrupt_dir)

    def _keep(self, reader: RingReader, what: str, evidence: bytes) -> None:
        """Durably, before the ring lets go of the bytes (OSError propagates: nothing is consumed)."""
        keep_aside(self.corrupt_dir, f"ring-{self.labels[reader]}-{what}", evidence)
        self.stats.add(Stat.RING_DAMAGE)
        self.damage_set_aside += 1

    # -- what waits ---------------------------------------------------------------------------------

    def waiting_records(self) -> int:
        return sum(reader.depth_records() for reader in self.readers)

    def adopted_records(self) -> int:
        return sum(reader.depth_records() for _other, readers in self.adopted for reader in readers)

    def release_drained_adopted(self) -> None:
        """Remove the rings of a dead instance once every record in them is in Postgres or the spool."""
        for other, readers in list(self.adopted):
            if any(reader.depth_bytes() for reader in readers):
                continue
            self.readers = [reader for reader in self.readers if reader not in readers]
            self.adopted.remove((other, readers))
            other.close()
            remove_segment(other.segment.name)
            log.info("the rings %s of a stopped instance are drained and removed", other.segment.name)

    def oldest_unwritten_s(self) -> float:
        """Age of the oldest record still waiting in any ring (0 when they are empty)."""
        oldest = None
        for reader in self.readers:
            with contextlib.suppress(RingCorrupt):
                record = reader.oldest()
                if record is None:
                    continue
                with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                    created = orjson.loads(record)["created_at"]
                    oldest = created if oldest is None else min(oldest, created)
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)

    def close(self) -> None:
        for other, _readers in self.adopted:
            other.close()
