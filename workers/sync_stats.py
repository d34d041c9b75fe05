"""The model sync's counts and the state of its last sync, in ``$SIRA_DATA_DIR/model-sync.json``.

The counts of ``sira_model_load_errors_total{reason}`` and the state of the last sync are in
``STATS_FILE``, rewritten atomically after every sync (workers/model_sync.py), for ops and tests:
``model_load_errors_total``, ``syncs_total``, ``sync_failures_total``, ``generation``,
``last_sync_at``, ``last_sync_ok``, ``last_error``. A supervisor restarted by the same
`sira serve` (the same control segment) continues the counts it finds.
"""

from __future__ import annotations

import dataclasses
import json

STATS_FILE = "model-sync.json"


@dataclasses.dataclass
class SyncStats:
    """The supervisor's counts and last sync, for ops and tests (STATS_FILE; one writer)."""

    control_segment: str
    generation: int = 0
    syncs_total: int = 0
    sync_failures_total: int = 0
    model_load_errors_total: dict[str, int] = dataclasses.field(default_factory=dict)
    last_sync_at: float | None = None
    last_sync_ok: bool | None = None
    last_error: dict | None = None


def load_stats(path: str, control_segment: str) -> SyncStats:
    """This instance's counters when a previous supervisor of the same `sira serve` left them."""
    try:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
        if saved.get("control_segment") == control_segment:
            return SyncStats(**saved)
    except (OSError, ValueError, TypeError):
        pass
    return SyncStats(control_segment=control_segment)
