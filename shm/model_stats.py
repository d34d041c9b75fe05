"""Per-model request counts and latency histograms of every worker, in one counter block.

The supervisor compares a canary with production over a sliding window (workers/canary_watch.py)
and needs what every worker of the host saw, without asking them. Each worker writes only the
region of its own slot (the prediction log's slot, so a restarted worker continues the counts of
the one it replaces); the reader adds the regions up. It is a layout over ``shm.counters``'s u64
cells, nothing more::

    region of slot s = cells [s * SLOT_CELLS, (s + 1) * SLOT_CELLS)
    entry e of a region = ENTRY_CELLS cells:
        0 model id, high u64 | 1 model id, low u64 | 2 role + 1 (0: a free entry)
        3 requests | 4 errors | 5 scored (model runs timed) | 6 latency sum, microseconds
        7 allow | 8 review | 9 block        answers by decision
        10 .. 10 + BUCKETS  latency histogram: bucket i counts runs of at most BOUNDS_US[i]
                            (the last bucket: everything slower)
        138 explained runs (of those in cell 5) | 139 their latency sum, microseconds
        140 .. 140 + BUCKETS  latency histogram of the explained runs alone

Every timed run is in cells 5, 6 and the first histogram; a run that also explained (occlusion
rows: one extra row per feature off its baseline, about twice a plain run for the demo trees) is
counted again in the explained cells, so the plain runs are the difference. The rollback watch compares plain runs with
plain runs and explained with explained: a client that asks for explanations only on the canary's
events makes the canary's runs dearer, not its model slower. Totals (the API's figures,
sira_inference_metrics) still cover every run.

The latency buckets grow by 10% from 20 us to about 3.6 s, so a p95 read from them is within a
few percent, fine enough to compare against a 1.3x threshold. A worker that needs an entry and
finds its region full reuses one of a model it no longer serves (``retire``); a reader sees that
entry's counts drop and takes the drop as a restart (``window_delta``).
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Final

from shm.breakers import breaker_cells, model_id_cells, model_id_of
from shm.counters import CounterBlock

ROLES: Final = ("production", "canary", "shadow")
ENTRIES_PER_SLOT: Final = 12
BUCKETS: Final = 128
FIRST_BOUND_US: Final = 20.0
BOUND_RATIO: Final = 1.1
BOUNDS_US: Final = tuple(FIRST_BOUND_US * BOUND_RATIO ** i for i in range(BUCKETS - 1))  # + overflow bucket

DECISIONS: Final = ("allow", "review", "block")
_KEY_HIGH, _KEY_LOW, _ROLE, _REQUESTS, _ERRORS, _SCORED, _LATENCY_SUM, _ALLOW, _REVIEW, _BLOCK, _HISTOGRAM = range(11)
_DECISION_CELL: Final = {"allow": _ALLOW, "review": _REVIEW, "block": _BLOCK}
_EXPLAINED_SCORED: Final = _HISTOGRAM + BUCKETS
_EXPLAINED_LATENCY_SUM: Final = _EXPLAINED_SCORED + 1
_EXPLAINED_HISTOGRAM: Final = _EXPLAINED_LATENCY_SUM + 1
ENTRY_CELLS: Final = _EXPLAINED_HISTOGRAM + BUCKETS
SLOT_CELLS: Final = ENTRIES_PER_SLOT * ENTRY_CELLS


def stats_cells(slots: int) -> int:
    """Size of the counter block for ``slots`` worker slots, the canary breakers (shm/breakers.py) at its end."""
    return slots * SLOT_CELLS + breaker_cells()


def stats_slots(block: CounterBlock) -> int:
    return (block.cells - breaker_cells()) // SLOT_CELLS


class ModelCounters:
    """One (model, role) entry of this worker's region: the request path's writer. Not thread safe.

    Writes go through a ``memoryview`` of the block cast to u64 cells: one aligned 8-byte store per
    cell, half the cost of a struct pack (``python -m bench.bench_canary``).
    """

    __slots__ = ("_cells", "_base", "_histogram")

    def __init__(self, cells: memoryview, first_cell: int):
        self._cells = cells
        self._base = first_cell
        self._histogram = first_cell + _HISTOGRAM

    def answered(self, latency_s: float | None, decision: str, explained: bool = False) -> None:
        """One event answered by this model with ``decision``; ``latency_s`` when the model ran
        (None: a cache hit); ``explained`` when that run computed explanations too."""
        cells, base = self._cells, self._base
        cells[base + _REQUESTS] += 1
        cells[base + _DECISION_CELL[decision]] += 1
        if latency_s is not None:
            micros = latency_s * 1e6
            bucket = bisect.bisect_left(BOUNDS_US, micros)
            cells[base + _SCORED] += 1
            cells[base + _LATENCY_SUM] += int(micros)
            cells[self._histogram + bucket] += 1
            if explained:
                cells[base + _EXPLAINED_SCORED] += 1
                cells[base + _EXPLAINED_LATENCY_SUM] += int(micros)
                cells[base + _EXPLAINED_HISTOGRAM + bucket] += 1

    def failed(self) -> None:
        """One request this model could not answer (it raised, or scored nonsense)."""
        cells, base = self._cells, self._base
        cells[base + _REQUESTS] += 1
        cells[base + _ERRORS] += 1


class ModelStatsWriter:
    """A worker's view of its own region: entries found or claimed by (model id, role)."""

    def __init__(self, block: CounterBlock, slot: int):
        if not 0 <= slot < stats_slots(block):
            raise ValueError(f"slot {slot} outside the stats block's {stats_slots(block)} slots")
        self.block = block
        self.first_cell = slot * SLOT_CELLS
        self._entries: dict[tuple[str, str], ModelCounters] = {}
        self._cells = block.cells_view()

    @property
    def cells(self) -> memoryview:
        """The block's u64 view (the canaries' breakers are read through it)."""
        return self._cells

    def close(self) -> None:
        """Release the view of the block (the block cannot be unmapped while a view exists)."""
        self._entries.clear()
        self._cells.release()

    def counters(self, model_id: str, role: str) -> ModelCounters | None:
        """The entry of (model, role), claimed if new; None when the region is full (not counted)."""
        key = (model_id, role)
        found = self._entries.get(key)
        if found is None:
            cell = self._find_or_claim(model_id, role)
            if cell is None:
                return None
            found = self._entries[key] = ModelCounters(self._cells, cell)
        return found

    def retire(self, live: set[tuple[str, str]]) -> None:
        """Free the entries of models this worker no longer serves (their counts are dropped)."""
        for entry in range(ENTRIES_PER_SLOT):
            cell = self.first_cell + entry * ENTRY_CELLS
            key = self._key_at(cell)
            if key is not None and key not in live:
                for offset in range(ENTRY_CELLS):
                    self.block.set(cell + offset, 0)
                self._entries.pop(key, None)

    def _key_at(self, cell: int) -> tuple[str, str] | None:
        role = self.block.get(cell + _ROLE)
        if not 0 < role <= len(ROLES):
            return None
        return model_id_of(self.block.get(cell + _KEY_HIGH), self.block.get(cell + _KEY_LOW)), ROLES[role - 1]

    def _find_or_claim(self, model_id: str, role: str) -> int | None:
        free = None
        for entry in range(ENTRIES_PER_SLOT):
            cell = self.first_cell + entry * ENTRY_CELLS
            key = self._key_at(cell)
            if key == (model_id, role):
                return cell  # the counts of this slot's previous worker go on
            if key is None and free is None:
                free = cell
        if free is not None:
            high, low = model_id_cells(model_id)
            self.block.set(free + _KEY_HIGH, high)
            self.block.set(free + _KEY_LOW, low)
            self.block.set(free + _ROLE, ROLES.index(role) + 1)  # last: the entry is complete
        return free


@dataclasses.dataclass
class ModelFigures:
    """Counts of one (model, role), summed over workers, or the difference of two such sums."""

    requests: int = 0
    errors: int = 0
    scored: int = 0
    latency_sum_us: int = 0
    histogram: list[int] = dataclasses.field(default_factory=lambda: [0] * BUCKETS)
    decisions: list[int] = dataclasses.field(default_factory=lambda: [0] * len(DECISIONS))  # allow, review, block
    # The subset of the timed runs that explained (see the module docstring).
    explained_scored: int = 0
    explained_latency_sum_us: int = 0
    explained_histogram: list[int] = dataclasses.field(default_factory=lambda: [0] * BUCKETS)

    def add(self, cells: list[int]) -> None:
        self.requests += cells[_REQUESTS]
        self.errors += cells[_ERRORS]
        self.scored += cells[_SCORED]
        self.latency_sum_us += cells[_LATENCY_SUM]
        self.explained_scored += cells[_EXPLAINED_SCORED]
        self.explained_latency_sum_us += cells[_EXPLAINED_LATENCY_SUM]
        for i in range(len(DECISIONS)):
            self.decisions[i] += cells[_ALLOW + i]
        for i, count in enumerate(cells[_HISTOGRAM:_HISTOGRAM + BUCKETS]):
            self.histogram[i] += count
        for i, count in enumerate(cells[_EXPLAINED_HISTOGRAM:_EXPLAINED_HISTOGRAM + BUCKETS]):
            self.explained_histogram[i] += count

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def latency_quantile_ms(self, quantile: float) -> float | None:
        """The quantile of the timed runs, interpolated inside its bucket; None without runs."""
        return histogram_quantile_ms(self.histogram, quantile)

    def runs(self, explained: bool) -> ModelFigures:
        """These figures with the timed runs narrowed to the explained ones, or to the plain ones
        (requests, errors and decisions unchanged): what the rollback watch compares."""
        if explained:
            scored, latency_sum, histogram = (self.explained_scored, self.explained_latency_sum_us,
                                              list(self.explained_histogram))
        else:
            scored = max(0, self.scored - self.explained_scored)
            latency_sum = max(0, self.latency_sum_us - self.explained_latency_sum_us)
            histogram = [max(0, a - b) for a, b in zip(self.histogram, self.explained_histogram)]
        return ModelFigures(self.requests, self.errors, scored, latency_sum, histogram, list(self.decisions))

    def minus(self, earlier: ModelFigures) -> ModelFigures:
        """What happened since ``earlier``; a count that went down (an entry reused) counts from 0."""
        if self.requests < earlier.requests or self.scored < earlier.scored \
                or self.explained_scored < earlier.explained_scored:
            return dataclasses.replace(self, histogram=list(self.histogram), decisions=list(self.decisions),
                                       explained_histogram=list(self.explained_histogram))
        return self._combined(earlier, lambda a, b: max(0, a - b))

    def plus(self, other: ModelFigures) -> ModelFigures:
        return self._combined(other, lambda a, b: a + b)

    def _combined(self, other: ModelFigures, op) -> ModelFigures:
        """Every count of self and other combined by ``op``, field by field."""
        return ModelFigures(
            op(self.requests, other.requests), op(self.errors, other.errors), op(self.scored, other.scored),
            op(self.latency_sum_us, other.latency_sum_us),
            [op(a, b) for a, b in zip(self.histogram, other.histogram)],
            [op(a, b) for a, b in zip(self.decisions, other.decisions)],
            op(self.explained_scored, other.explained_scored),
            op(self.explained_latency_sum_us, other.explained_latency_sum_us),
            [op(a, b) for a, b in zip(self.explained_histogram, other.explained_histogram)])


def histogram_quantile_ms(histogram: list[int], quantile: float) -> float | None:
    """The quantile of a latency histogram, interpolated inside its bucket; None when it is empty."""
    total = sum(histogram)
    if not total:
        return None
    rank = quantile * total
    seen = 0
    for i, count in enumerate(histogram):
        if count and seen + count >= rank:
            low = BOUNDS_US[i - 1] if i > 0 else 0.0
            high = BOUNDS_US[i] if i < len(BOUNDS_US) else BOUNDS_US[-1] * BOUND_RATIO
            return (low + (high - low) * (rank - seen) / count) / 1000.0
        seen += count
    return BOUNDS_US[-1] / 1000.0


def read_model_figures(block: CounterBlock) -> dict[tuple[str, str], ModelFigures]:
    """(model id, role) -> counts summed over every worker's region (the supervisor's reader)."""
    cells = block.snapshot()
    figures: dict[tuple[str, str], ModelFigures] = {}
    for first in range(0, stats_slots(block) * SLOT_CELLS, ENTRY_CELLS):
        role = cells[first + _ROLE]
        if not 0 < role <= len(ROLES):
            continue
        model_id = model_id_of(cells[first + _KEY_HIGH], cells[first + _KEY_LOW])
        figures.setdefault((model_id, ROLES[role - 1]), ModelFigures()).add(cells[first:first + ENTRY_CELLS])
    return figures
