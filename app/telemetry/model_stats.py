"""The worker's handle on the host's model stats block (shm/model_stats.py), or a null one.

Every answered or failed event is counted there under its model and role, a timed run also as
plain or explained (explanations cost extra model rows); the supervisor reads the block to compare
a canary with production, like with like (workers/canary_watch.py). An app built without the
block (in-process tests) counts nowhere.
"""

from __future__ import annotations

from shm.breakers import breaker_states
from shm.counters import CounterBlock
from shm.model_stats import ModelFigures, ModelStatsWriter, read_model_figures


class NullCounters:
    """Counts nothing."""

    __slots__ = ()

    def answered(self, latency_s: float | None, decision: str, explained: bool = False) -> None:
        """Not counted."""

    def failed(self) -> None:
        """Not counted."""


class NullModelStats:
    _counters = NullCounters()

    def counters(self, model_id: str, role: str) -> NullCounters:
        return self._counters

    def figures_of(self, model_id: str) -> dict[str, ModelFigures]:
        return {}


NULL_MODEL_STATS = NullModelStats()


class ModelStats:
    """This worker's region of the stats block.

    A region that is full frees the entries of models the worker no longer serves; if it is still
    full, the event is not counted (counting never fails a request).
    """

    def __init__(self, writer: ModelStatsWriter, models):
        self.writer = writer
        self.models = models  # app.scoring.models.ModelTable: what this worker serves now
        self._null = NullCounters()

    def figures_of(self, model_id: str) -> dict[str, ModelFigures]:
        """role -> what every worker of the host counted for this model (an admin read, not the hot path)."""
        return {role: figures for (found, role), figures in read_model_figures(self.writer.block).items()
                if found == model_id}

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
        keys.add((canary.model.model_id, canary.model.role))
    return keys


def open_model_stats(segment: str | None, worker_slot: int | None, models):
    """In the worker, after the fork: its region of the master's block (the prediction log's slot)."""
    if segment is None or worker_slot is None:
        return NULL_MODEL_STATS
    stats = ModelStats(ModelStatsWriter(CounterBlock.attach(segment), worker_slot), models)
    if hasattr(models, "follow_breakers"):
        models.follow_breakers(stats.writer.block, stats.writer.cells)
    return stats


class BreakerCollector:
    """A prometheus_client collector over the canaries' circuit breakers (registered per scrape)."""

    def __init__(self, block: CounterBlock):
        self.block = block

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        state = GaugeMetricFamily("sira_canary_breaker_state",
                                  "Circuit breaker of a canary model: 0 closed, 1 open (its events go to production), "
                                  "2 half-open.", labels=["model_id"])
        opened = CounterMetricFamily("sira_canary_breaker_opened", "Times a canary's circuit breaker opened.",
                                     labels=["model_id"])
        for model_id, (value, trips) in sorted(breaker_states(self.block).items()):
            state.add_metric([model_id], value)
            opened.add_metric([model_id], trips)
        yield state
        yield opened


def metrics_collectors(model_stats) -> list:
    """The scrape-time collectors of the model stats segment (none without one)."""
    return [BreakerCollector(model_stats.writer.block)] if isinstance(model_stats, ModelStats) else []
