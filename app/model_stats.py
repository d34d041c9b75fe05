"""The worker's handle on the host's model stats block (shm/model_stats.py), or a null one.

Every answered or failed event is counted there under its model and role; the supervisor reads the
block to compare a canary with production (workers/canary_watch.py). An app built without the
block (in-process tests) counts nowhere.
"""

from __future__ import annotations

from shm.counters import CounterBlock
from shm.model_stats import ModelStatsWriter


class NullCounters:
    """Counts nothing."""

    __slots__ = ()

    def answered(self, latency_s: float | None) -> None:
        """Not counted."""

    def failed(self) -> None:
        """Not counted."""


class NullModelStats:
    _counters = NullCounters()

    def counters(self, model_id: str, role: str) -> NullCounters:
        return self._counters


NULL_MODEL_STATS = NullModelStats()


class ModelStats:
    """This worker's region of the stats block.

    A region that is full frees the entries of models the worker no longer serves; if it is still
    full, the event is not counted (counting never fails a request).
    """

    def __init__(self, writer: ModelStatsWriter, models):
        self.writer = writer
        self.models = models  # app.models.ModelTable: what this worker serves now
        self._null = NullCounters()

    def counters(self, model_id: str, role: str):
        found = self.writer.counters(model_id, role)
        if found is None:
            self.writer.retire(served_keys(self.models))
            found = self.writer.counters(model_id, role)
        return self._null if found is None else found


def served_keys(models) -> set[tuple[str, str]]:
    """(model id, role) of every model the worker serves now."""
    keys = {(model.model_id, model.role) for model in models.production.values()}
    for canary in getattr(models, "canaries", {}).values():
        keys.add((canary[0].model_id, canary[0].role))
    return keys


def open_model_stats(segment: str | None, worker_slot: int | None, models):
    """In the worker, after the fork: its region of the master's block (the prediction log's slot)."""
    if segment is None or worker_slot is None:
        return NULL_MODEL_STATS
    return ModelStats(ModelStatsWriter(CounterBlock.attach(segment), worker_slot), models)
