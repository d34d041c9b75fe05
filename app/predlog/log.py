"""The prediction log, worker side: every prediction goes to this worker's ring, or to disk, never nowhere.

Each HTTP worker owns one slot of the master's queue rings (``shm.ring``) and appends one record
per prediction it answers, before the answer leaves. The writer process (``workers/writer.py``)
drains the rings into Postgres. A record is the JSON object of one ``siramodel_predictions`` row,
``prediction_id`` first (``RECORD_PREFIX``), so the writer hands it to Postgres as is and a reader
finds a record by the bytes it starts with.

Rule when the ring is full (the writer is dead, restarting or behind): the record is *spilled*, not
dropped and not waited for. The worker appends it to its own overflow file under
``<spool>/overflow`` (one ``write`` per record), counts it (the ``overflow`` cell of its slot in
the counter block, ``sira_prediction_queue_overflow_total``) and answers at once. An overflow file
is sealed (renamed ``.sealed``) after ``OVERFLOW_FILE_RECORDS`` records, after
``OVERFLOW_FILE_MAX_AGE_S``, as soon as the ring takes records again, and when the worker stops;
the writer replays sealed files, and the files of a worker that died, into Postgres. Only if the
disk refuses the spill too does the request fail (503): a prediction the log cannot keep is never
given out.

Read-your-writes (``GET /v1/infer/{id}``): a prediction lives in exactly one of these places at
any time and moves only forwards, each move writing the next place before leaving the previous
one: ring -> (Postgres | writer spool), overflow file -> Postgres, writer spool -> Postgres. So
``PredictionLog.find_unwritten`` looks in every ring, then the overflow files and the spool, and
the caller then in Postgres: a prediction made a moment ago by any worker is found. On disk it reads
only the files whose time span can hold the id (ids are UUIDv7, app/ids.py; app/predlog/files.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import enum
import logging
import os
import time

import orjson

from app.errors import ServiceUnavailable
from app.ids import id_time_ms
from app.predlog.disk import DiskReason, DiskTrouble, LogFull
from app.predlog.files import OVERFLOW_FILE_MAX_AGE_S, OverflowSpill, search_files
from shm.counters import CounterBlock
from shm.ring import QueueRings
from shm.ring_search import find_record

log = logging.getLogger("sira.predlog")

RECORD_PREFIX = b'{"prediction_id":"'
SPOOL_DIR = "spool"  # under the data dir
OVERFLOW_DIR = "overflow"
BATCHES_DIR = "batches"
REJECTED_DIR = "rejected"
CORRUPT_DIR = "corrupt"
FILE_SEARCH_ATTEMPTS = 3

_dumps = orjson.dumps
_loads = orjson.loads
_time = time.time


class Stat(enum.IntEnum):
    """Cells of the prediction log's counter block; the writer writes all but the overflow cells."""

    ROWS_WRITTEN = 0          # rows committed to Postgres (replays included)
    BATCHES_WRITTEN = 1
    LAST_BATCH_ROWS = 2
    LAST_FLUSH_US = 3         # COPY + INSERT + COMMIT of the last batch
    FLUSH_US_TOTAL = 4
    ROWS_SPOOLED = 5          # rows written to the writer's spool while Postgres was away
    ROWS_REPLAYED = 6         # rows moved from the spool or overflow files into Postgres
    ROWS_REJECTED = 7         # rows Postgres refused as data; kept under <spool>/rejected
    SPOOL_BYTES = 8
    SPOOL_BATCHES = 9
    OVERFLOW_FILES = 10       # overflow files waiting for the writer
    OLDEST_UNWRITTEN_MS = 11  # age of the oldest record still in a ring
    DATABASE_UP = 12          # 1 while the writer reaches Postgres
    WRITER_PID = 13
    WRITER_HEARTBEAT_MS = 14  # unix ms of the writer's last loop
    SPOOL_FULL = 15           # 1 while the spool is at SIRA_SPOOL_MAX_BYTES
    WRITER_DISK_ERRORS = 16   # + DiskReason: the writer's failed disk operations
    RING_DAMAGE = 20          # damaged ring records or slots the writer set aside under <spool>/corrupt
    ADOPTED_RECORDS = 21      # records still waiting in rings a dead instance of the data dir left
    OVERFLOW_BYTES = 22       # bytes of the workers' overflow files waiting for the writer
    FILE_DAMAGE = 23          # overflow files with a record that failed its checksum (kept under corrupt/)
    SLOT_BASE = 32            # + slot * SLOT_CELLS + SlotStat: each slot's own cells (one writer per cell)


class SlotStat(enum.IntEnum):
    """The cells of one worker slot, written by the worker that holds the slot."""

    OVERFLOW = 0              # records spilled to an overflow file
    REFUSED = 1               # predictions refused (503) because nothing could keep them
    DISK_ERRORS = 2           # + DiskReason: failed overflow writes


SLOT_CELLS = SlotStat.DISK_ERRORS + len(DiskReason)


def slot_cell(slot: int, which: int) -> int:
    """The counter block cell of one of a slot's figures (``which``: a SlotStat, plus a DiskReason)."""
    return Stat.SLOT_BASE + slot * SLOT_CELLS + which


def stat_cells(slots: int) -> int:
    """Size of the counter block for ``slots`` worker slots."""
    return Stat.SLOT_BASE + slots * SLOT_CELLS


@dataclasses.dataclass(frozen=True)
class PredictionLogConfig:
    """Where one ``sira serve``'s prediction log lives; the master builds it, workers and the writer read it."""

    instance_id: str
    rings_segment: str
    stats_segment: str
    slots: int
    ring_bytes: int
    spool_dir: str
    database_url: str | None
    spool_max_bytes: int
    batch_rows: int
    linger_s: float = 0.0  # a batch that is not full waits this long after the last one started
    adopted_rings: tuple[str, ...] = ()  # rings segments of dead instances of the data dir, to drain
    handoff_bucket: str | None = None    # MODEL_BUCKET: the spool goes there when the writer stops with
    handoff_endpoint: str | None = None  # Postgres away (app/predlog/handoff.py); None: no handoff
    handoff_prefix: str = ""

    @property
    def overflow_dir(self) -> str:
        return os.path.join(self.spool_dir, OVERFLOW_DIR)

    @property
    def batches_dir(self) -> str:
        return os.path.join(self.spool_dir, BATCHES_DIR)

    @property
    def rejected_dir(self) -> str:
        return os.path.join(self.spool_dir, REJECTED_DIR)

    @property
    def corrupt_dir(self) -> str:
        """Damaged files and ring bytes, set aside for a person to look at (never deleted)."""
        return os.path.join(self.spool_dir, CORRUPT_DIR)


# -- records ------------------------------------------------------------------------------------

def encode_record(body: dict, event_id: str, product: str, request_id: str | None,
                  created_at: float, trace_id: str | None = None) -> bytes:
    """One prediction as the JSON of its ``siramodel_predictions`` row, prediction_id first.

    ``trace_id`` (32 hex, app/telemetry/tracing.py) is written only when there is one: off, the record is as before.
    """
    record = {
        "prediction_id": body["prediction_id"],
        "event_id": event_id,
        "product": product,
        "model_id": body["model_id"],
        "model_role": body["model_role"],
        "score": body["score"],
        "decision": body["decision"],
        "explanation": body["explain_summary"],
        "latency_ms": body["latency_ms"],
        "cached": body["cached"],
        "request_id": request_id,
        "created_at": created_at,
    }
    if trace_id is not None:
        record["trace_id"] = trace_id
    return _dumps(record)


def record_prefix(prediction_id: str) -> bytes:
    """The bytes the record of ``prediction_id`` (canonical lower-case uuid) starts with."""
    return RECORD_PREFIX + prediction_id.encode("ascii") + b'"'


# -- the worker's handle ------------------------------------------------------------------------

class PredictionLog:
    """A worker's prediction log: append to its ring slot (or spill), and find any recent prediction.

    Also a Falcon middleware for the lifespan only: on shutdown it seals the overflow file. Open it
    in the worker, after the fork. Not thread safe.
    """

    def __init__(self, config: PredictionLogConfig, slot: int, rings: QueueRings,
                 stats: CounterBlock) -> None:
        self.config = config
        self.slot = slot
        self.rings = rings
        self.stats = stats
        self._ring_writer = rings.writer(slot)
        self._append_to_ring = self._ring_writer.append
        self.spill = OverflowSpill(config.overflow_dir, config.instance_id, slot,
                                   self._ring_writer.epoch, (config.overflow_dir, config.batches_dir),
                                   config.spool_max_bytes)
        self._spilling = False
        self._overflow_cell = slot_cell(slot, SlotStat.OVERFLOW)
        self._refused_cell = slot_cell(slot, SlotStat.REFUSED)
        self.disk = DiskTrouble(lambda reason: stats.add(slot_cell(slot, SlotStat.DISK_ERRORS + reason)),
                                log, f"prediction log of worker slot {slot}")
        self._full_logged = False
        self.appended = 0
        self.overflowed = 0

    @classmethod
    def open(cls, config: PredictionLogConfig, slot: int) -> PredictionLog:
        """Attach to the master's rings and counters and take over ``slot``."""
        if not 0 <= slot < config.slots:
            raise ValueError(f"worker slot {slot} outside [0, {config.slots})")
        rings = QueueRings.attach(config.rings_segment)
        try:
            stats = CounterBlock.attach(config.stats_segment)
        except BaseException:
            rings.close()
            raise
        return cls(config, slot, rings, stats)

    # appending, on the request path

    def append(self, body: dict, event_id: str, product: str, request_id: str | None,
               trace_id: str | None = None) -> None:
        """Log one prediction (its response ``body``) before the response leaves."""
        record = encode_record(body, event_id, product, request_id, _time(), trace_id)
        if self._append_to_ring(record):
            self.appended += 1
            if self._spilling:
                self._end_spill()
            return
        self._spill(record)

    def _spill(self, record: bytes) -> None:
        """The ring is full: the record goes to this worker's overflow file (see module doc)."""
        try:
            self.spill.write(record)
        except OSError as exc:
            self.disk.failed("the overflow file", exc, "predictions are refused until it works again")
            raise self._refused() from None
        except LogFull as exc:
            if not self._full_logged:
                log.error("prediction log: ring %d is full and %s: predictions are refused (503) until "
                          "the writer catches up", self.slot, exc)
                self._full_logged = True
            raise self._refused() from None
        self.disk.ok()
        self._full_logged = False
        if not self._spilling:
            log.warning("prediction log: ring %d is full; spilling to %s", self.slot,
                        self.spill.directory)
            self._spilling = True
            self._seal_later()
        self.overflowed += 1
        self.stats.add(self._overflow_cell)

    def _refused(self) -> ServiceUnavailable:
        self.stats.add(self._refused_cell)
        return ServiceUnavailable("the prediction log cannot keep this prediction now",
                                  {"retry_after_s": 1}, {"Retry-After": "1"})

    def _seal_later(self) -> None:
        """Seal an overflow file that stops growing (no more requests) once it is old enough."""
        with contextlib.suppress(RuntimeError):  # no running loop (a test calling append directly)
            asyncio.get_running_loop().call_later(OVERFLOW_FILE_MAX_AGE_S, self._seal_if_stale)

    def _seal_if_stale(self) -> None:
        if not self._spilling:
            return
        if self.spill.age() < OVERFLOW_FILE_MAX_AGE_S:
            self._seal_later()
            return
        self._end_spill()

    def _end_spill(self) -> None:
        """The ring takes records again: hand the overflow file to the writer now."""
        self._spilling = False
        try:
            self.spill.seal()
        except OSError as exc:  # the records stay in the open file; the writer takes it once we exit
            self.disk.failed("sealing the overflow file", exc, "its records wait in it")

    # finding, for GET /v1/infer/{prediction_id}

    async def find_unwritten(self, prediction_id: str) -> dict | None:
        """The record of ``prediction_id`` if it has not reached Postgres yet (rings, then disk).

        Look in Postgres only after this said None: that order never misses a record that is
        moving (module doc). The disk is searched only for a UUIDv7 id, in the files its time
        can be in (app/predlog/files.py); an id of another version (made before ids were v7) is
        looked for in the rings only, then in Postgres.
        """
        prefix = record_prefix(prediction_id)
        for slot in range(self.rings.slots):
            record = find_record(self.rings, slot, prefix)
            if record is not None:
                return _loads(record)
        id_ms = id_time_ms(prediction_id)
        if id_ms is not None and self.has_files_on_disk():
            record = await asyncio.to_thread(self.find_on_disk, prefix, id_ms)
            if record is not None:
                return _loads(record)
        return None

    def has_files_on_disk(self) -> bool:
        """Whether any overflow or spool file exists (usually none: then no thread is needed)."""
        for directory in (self.config.overflow_dir, self.config.batches_dir):
            try:
                with os.scandir(directory) as entries:
                    if any(True for _ in entries):
                        return True
            except FileNotFoundError:
                continue
            except OSError:
                return True  # cannot tell: the search says why (find_on_disk)
        return False

    def find_on_disk(self, prefix: bytes, id_ms: int) -> bytes | None:
        """Search the overflow files, then the writer's spool, that can hold an id made at ``id_ms``
        (blocking: run it in a thread)."""
        for _attempt in range(FILE_SEARCH_ATTEMPTS):
            try:
                return search_files([self.config.overflow_dir, self.config.batches_dir], prefix, id_ms)
            except FileNotFoundError:
                continue  # sealed (renamed) or replayed while we looked: list again
            except OSError as exc:  # EIO, EMFILE...: the prediction may be there; say so, not "not found"
                self.disk.failed("searching the spool", exc, "lookups of unwritten predictions answer 503")
                raise ServiceUnavailable("the prediction log's files cannot be searched now",
                                         {"retry_after_s": 1}, {"Retry-After": "1"}) from None
        return None

    # lifecycle

    async def process_shutdown(self, scope: dict, event: dict) -> None:
        """Falcon lifespan hook: the worker is leaving."""
        self.close()

    def close(self) -> None:
        """Seal the overflow file and unmap (idempotent); the ring keeps what was appended."""
        try:
            self.spill.seal(durable=True)
        except OSError as exc:  # an unsealed file of a gone worker is replayed all the same
            self.disk.failed("sealing the overflow file at exit", exc, "the writer replays it unsealed")
        finally:
            self.stats.close()
            self.rings.close()


class NullPredictionLog:
    """No prediction log (an app built without one, in-process tests): appends go nowhere."""

    appended = overflowed = 0

    def append(self, body: dict, event_id: str, product: str, request_id: str | None,
               trace_id: str | None = None) -> None:
        """Nothing to log to."""

    async def find_unwritten(self, prediction_id: str) -> dict | None:
        return None

    async def process_shutdown(self, scope: dict, event: dict) -> None:
        """Falcon lifespan hook: nothing to close."""

    def close(self) -> None:
        """Nothing to close."""


NULL_PREDICTION_LOG = NullPredictionLog()


def open_prediction_log(config: PredictionLogConfig | None,
                        slot: int | None) -> PredictionLog | NullPredictionLog:
    """The worker's log; without a config a null one (with a config, a slot is required)."""
    if config is None:
        return NULL_PREDICTION_LOG
    if slot is None:
        raise ValueError("the prediction log needs this worker's slot (set by the master's pre_fork hook)")
    return PredictionLog.open(config, slot)


def created_at_text(value: float | dt.datetime) -> str:
    """ISO 8601 UTC with milliseconds and a Z, like every timestamp of the API."""
    if not isinstance(value, dt.datetime):
        value = dt.datetime.fromtimestamp(value, dt.UTC)
    value = value.astimezone(dt.UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
