"""The prediction log's metrics, read at scrape time from its shared counter block and rings.

The writer and the workers already keep these figures in shared memory (``app.predlog.log.Stat``: one
writer per cell), so /metrics reads them when it is scraped instead of copying them into
prometheus_client's files on every batch or append. The block belongs to the master, so its
counters survive the restart of a worker or of the writer, and they are the same numbers whichever
worker answers the scrape. They restart at 0 with the server, like every counter of a process.

Families (``deploy/metrics.txt`` lists them; ``docs/operations.md`` explains them):

- ``sira_prediction_queue_depth``: records waiting in every worker's ring;
- ``sira_prediction_queue_overflow_total``: records a worker spilled to its overflow file;
- ``sira_prediction_rows_written_total``, ``..._spooled_total``, ``..._replayed_total``,
  ``..._rejected_total``: rows by where they went;
- ``sira_prediction_batch_rows`` (summary: rows per committed batch) and
  ``sira_prediction_flush_seconds`` (summary: COPY + INSERT + COMMIT of a batch);
- ``sira_prediction_spool_bytes``, ``..._spool_batches``, ``..._spool_full``,
  ``..._overflow_files``: what waits on disk;
- ``sira_prediction_overflow_bytes``: what the overflow files hold (they share the spool's budget);
- ``sira_prediction_refused_total``: predictions refused (503) because nothing could keep them;
- ``sira_prediction_disk_errors_total{process, reason}``: failed disk operations (ENOSPC, EIO, EMFILE, OTHER);
- ``sira_prediction_damage_total{source}``: damaged ring records or slots, and overflow files, set aside;
- ``sira_prediction_adopted_records``: records still in the rings a dead predecessor left;
- ``sira_prediction_oldest_unwritten_seconds``: age of the oldest record still in a ring;
- ``sira_prediction_writer_database_up`` and ``sira_prediction_writer_heartbeat_age_seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from app.predlog.disk import DiskReason
from app.predlog.log import PredictionLog, SlotStat, Stat, slot_cell

_ROW_COUNTERS = (
    ("sira_prediction_rows_written", "Prediction rows committed to Postgres (replays included).", Stat.ROWS_WRITTEN),
    ("sira_prediction_rows_spooled", "Prediction rows the writer spooled to disk while Postgres was away.",
     Stat.ROWS_SPOOLED),
    ("sira_prediction_rows_replayed", "Prediction rows replayed from the spool or overflow files into Postgres.",
     Stat.ROWS_REPLAYED),
    ("sira_prediction_rows_rejected", "Prediction rows Postgres refused as data (kept under the spool's rejected/).",
     Stat.ROWS_REJECTED),
)

_DISK_GAUGES = (
    ("sira_prediction_spool_bytes", "Bytes in the writer's spool (limit SIRA_SPOOL_MAX_BYTES).", Stat.SPOOL_BYTES),
    ("sira_prediction_spool_batches", "Batches in the writer's spool waiting for Postgres.", Stat.SPOOL_BATCHES),
    ("sira_prediction_spool_full", "1 while the spool is at SIRA_SPOOL_MAX_BYTES.", Stat.SPOOL_FULL),
    ("sira_prediction_overflow_files", "Overflow files of the workers waiting for the writer.", Stat.OVERFLOW_FILES),
    ("sira_prediction_overflow_bytes", "Bytes of the workers' overflow files (they count toward SIRA_SPOOL_MAX_BYTES).",
     Stat.OVERFLOW_BYTES),
    ("sira_prediction_writer_database_up", "1 while the prediction writer reaches Postgres.", Stat.DATABASE_UP),
)


class PredictionLogCollector:
    """A prometheus_client collector over one server's prediction log (registered per scrape)."""

    def __init__(self, prediction_log: PredictionLog, clock=time.time):
        self.log = prediction_log
        self.clock = clock

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

        stats = self.log.stats
        yield GaugeMetricFamily("sira_prediction_queue_depth", "Predictions waiting in the queue rings for the writer.",
                                value=self.queue_depth())
        yield CounterMetricFamily("sira_prediction_queue_overflow",
                                  "Predictions spilled to an overflow file because a worker's queue ring was full.",
                                  value=self.overflowed())
        for name, documentation, cell in _ROW_COUNTERS:
            yield CounterMetricFamily(name, documentation, value=stats.get(cell))
        batches = stats.get(Stat.BATCHES_WRITTEN)
        yield SummaryMetricFamily("sira_prediction_batch_rows", "Rows per batch committed to Postgres.",
                                  count_value=batches, sum_value=stats.get(Stat.ROWS_WRITTEN))
        yield SummaryMetricFamily("sira_prediction_flush_seconds",
                                  "Time to COPY, insert and commit one batch of prediction rows.",
                                  count_value=batches, sum_value=stats.get(Stat.FLUSH_US_TOTAL) / 1e6)
        for name, documentation, cell in _DISK_GAUGES:
            yield GaugeMetricFamily(name, documentation, value=stats.get(cell))
        yield CounterMetricFamily("sira_prediction_refused",
                                  "Predictions refused (503) because neither the ring nor the disk could keep them.",
                                  value=self.slot_total(SlotStat.REFUSED))
        yield self.disk_errors()
        damage = CounterMetricFamily("sira_prediction_damage",
                                     "Damaged records the writer set aside under the spool's corrupt/: ring records "
                                     "or slots, overflow files with a record that failed its checksum.",
                                     labels=("source",))
        damage.add_metric(("ring",), stats.get(Stat.RING_DAMAGE))
        damage.add_metric(("overflow",), stats.get(Stat.FILE_DAMAGE))
        yield damage
        yield GaugeMetricFamily("sira_prediction_adopted_records",
                                "Predictions still waiting in queue rings a stopped instance of this data dir left.",
                                value=stats.get(Stat.ADOPTED_RECORDS))
        yield GaugeMetricFamily("sira_prediction_oldest_unwritten_seconds",
                                "Age of the oldest prediction still waiting in a queue ring (0 when they are empty).",
                                value=stats.get(Stat.OLDEST_UNWRITTEN_MS) / 1000)
        yield GaugeMetricFamily("sira_prediction_writer_heartbeat_age_seconds",
                                "Seconds since the prediction writer's last loop (large: the writer is stuck or down).",
                                value=self.heartbeat_age_s())

    def disk_errors(self):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily("sira_prediction_disk_errors",
                                     "Failed disk operations of the prediction log, by process and reason.",
                                     labels=("process", "reason"))
        stats = self.log.stats
        for reason in DiskReason:
            family.add_metric(("writer", reason.name), stats.get(Stat.WRITER_DISK_ERRORS + reason))
            family.add_metric(("worker", reason.name), self.slot_total(SlotStat.DISK_ERRORS + reason))
        return family

    def queue_depth(self) -> int:
        rings = self.log.rings
        return sum(rings.reader(slot).depth_records() for slot in range(rings.slots))

    def overflowed(self) -> int:
        return self.slot_total(SlotStat.OVERFLOW)

    def slot_total(self, which: int) -> int:
        stats = self.log.stats
        return sum(stats.get(slot_cell(slot, which)) for slot in range(self.log.config.slots))

    def heartbeat_age_s(self) -> float:
        beat_ms = self.log.stats.get(Stat.WRITER_HEARTBEAT_MS)
        return 0.0 if not beat_ms else max(0.0, self.clock() - beat_ms / 1000)
