"""The writer's side of the bucket: the spool outlives the pod.

With Postgres still away at stop, the writer uploads its spool batches and the workers' overflow
files to the bucket (``app/predlog/handoff.py`` names and reads the objects). Any writer of any
instance replays such objects once Postgres answers: each under an advisory-lock claim, so two
pods never insert one object twice, and deleted only after its rows are committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from app.predlog.disk import DiskTrouble
from app.predlog.handoff import BATCHES, OVERFLOW, HandoffError, SpoolHandoff
from app.predlog.log import Stat
from app.predlog.sink import DatabaseAway, PostgresSink
from app.predlog.spool import BatchSpool, OverflowFiles, SpoolCorrupt
from shm.counters import CounterBlock

log = logging.getLogger("sira.writer")

HANDOFF_POLL_S = 30.0  # how often the bucket's handoff prefix is listed while nothing is queued


class BucketSpool:
    """Hands the disk to the bucket at stop; replays what any instance handed off, one object a call."""

    def __init__(self, handoff: SpoolHandoff, stats: CounterBlock, sink: PostgresSink,
                 database_away: Callable[[Exception], None]) -> None:
        self.handoff = handoff
        self.stats = stats
        self.sink = sink
        self._database_away = database_away  # the writer's: spool from now on, probe with backoff
        self._keys: list[str] = []
        self._check_at = 0.0
        self._failing = False

    async def hand_off_disk(self, instance_id: str, spool: BatchSpool, overflow: OverflowFiles,
                            disk: DiskTrouble, deadline: float) -> None:
        """Postgres is still away at stop: upload every spool batch and overflow file to the bucket."""
        try:
            files = [(BATCHES, path) for path in spool.paths()] + [(OVERFLOW, path) for path in overflow.ready()]
        except OSError as exc:
            disk.failed("listing the spool for the bucket", exc, "it stays on disk")
            return
        handed = 0
        for kind, path in files:
            if time.monotonic() >= deadline:
                log.error("prediction writer: out of time handing the spool to %s; %d files stay on disk",
                          self.handoff.describe(), len(files) - handed)
                return
            try:
                await asyncio.to_thread(self.handoff.hand_off, instance_id, kind, path)
            except (HandoffError, OSError) as exc:
                log.error("prediction writer: handing %s to the bucket failed (%s); %d files stay on disk",
                          path, exc, len(files) - handed)
                return
            handed += 1
        if handed:
            log.warning("Postgres is away at stop: %d spool and overflow files handed to %s; any instance "
                        "replays them once Postgres answers", handed, self.handoff.describe())

    async def replay_one(self) -> bool:
        """Replay one object the bucket holds (any instance's); True if one was done."""
        if not await self._has_keys():
            return False
        key = self._keys.pop(0)
        try:
            item = await asyncio.to_thread(self.handoff.read, key)
        except (HandoffError, SpoolCorrupt) as exc:
            self._trouble(exc)  # a damaged object stays in the bucket for a person to see
            return False
        if item is None:
            return True  # another writer replayed it meanwhile
        try:
            claimed = await self.sink.write_claimed(key, item.records)
        except DatabaseAway as exc:
            self._keys.insert(0, key)
            self._database_away(exc)
            return False
        if claimed:
            self.stats.add(Stat.ROWS_WRITTEN, len(item.records))
            self.stats.add(Stat.ROWS_REPLAYED, len(item.records))
            try:
                if item.damaged:
                    kept = await asyncio.to_thread(self.handoff.keep_damaged, key, item.damaged)
                    self.stats.add(Stat.FILE_DAMAGE)
                    log.error("handed-off %s: a record failed its checksum; the rest is kept at %s", key, kept)
                await asyncio.to_thread(self.handoff.delete, key)
            except HandoffError as exc:  # replayed again later: the insert is idempotent
                self._trouble(exc)
        return True

    async def _has_keys(self) -> bool:
        """List the bucket's handoff prefix at most every HANDOFF_POLL_S, when nothing is queued."""
        if self._keys:
            return True
        if time.monotonic() < self._check_at:
            return False
        self._check_at = time.monotonic() + HANDOFF_POLL_S
        try:
            self._keys = await asyncio.to_thread(self.handoff.keys)
        except HandoffError as exc:
            self._trouble(exc)
            return False
        if self._failing:
            log.info("the bucket answers again: %s", self.handoff.describe())
            self._failing = False
        if self._keys:
            log.warning("replaying %d spool objects other instances handed to %s", len(self._keys),
                        self.handoff.describe())
        return bool(self._keys)

    def _trouble(self, exc: Exception) -> None:
        if not self._failing:
            log.error("prediction writer: the handed-off spool cannot be replayed now: %s", exc)
            self._failing = True
