"""The registry snapshot: what the last successful model sync served, so `sira serve` can start without Postgres.

After every sync that read the registry and put every model live, the supervisor writes
``$SIRA_DATA_DIR/registry-snapshot.json`` (``SNAPSHOT_FILE``; temporary file, fsync, rename): the
production models and the canaries in force, with every registry field the sync needs (storage key,
sha256, size, feature spec, threshold), and the generation it published. A sync that finds no model
table yet (the master's first, before the fork) and cannot reach Postgres serves this snapshot
instead: its model files are already in ``$SIRA_DATA_DIR/models`` and are checked against their
sha256 before use (``workers/model_files.py``), then load-checked as usual.

A missing snapshot, or one that cannot be read (corrupt, another format), is ignored with one log
line: the server then waits for Postgres, not ready.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import time

from app.store.canary_config import CanaryConfig
from app.store.registry import RegistryModel
from conf.datadir import write_atomically

log = logging.getLogger("sira.snapshot")

SNAPSHOT_FILE = "registry-snapshot.json"
FORMAT = 1
_DATETIME_FIELDS = ("created_at", "updated_at", "started_at")


@dataclasses.dataclass(frozen=True)
class RegistrySnapshot:
    """The serving state of one successful sync: production models, canaries (config, model), generation."""

    generation: int
    written_at: float
    models: list[RegistryModel]
    canaries: list[tuple[CanaryConfig, RegistryModel]]


def write_snapshot(path: str, snapshot: RegistrySnapshot) -> None:
    """Atomically replace the snapshot (readers see the old or the new file, whole)."""
    body = {
        "format": FORMAT,
        "generation": snapshot.generation,
        "written_at": snapshot.written_at,
        "models": [dataclasses.asdict(model) for model in snapshot.models],
        "canaries": [{"config": dataclasses.asdict(config), "model": dataclasses.asdict(model)}
                     for config, model in snapshot.canaries],
    }
    write_atomically(path, json.dumps(body, sort_keys=True, default=_json_value))


def read_snapshot(path: str) -> RegistrySnapshot | None:
    """The snapshot in path, or None (logged) when there is none or it cannot be used."""
    try:
        with open(path, encoding="utf-8") as handle:
            body = json.load(handle)
    except FileNotFoundError:
        log.warning("no registry snapshot at %s: nothing to serve until Postgres answers", path)
        return None
    except (OSError, ValueError) as exc:
        log.error("ignoring the registry snapshot %s: %s", path, exc)
        return None
    try:
        return decode_snapshot(body)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        log.error("ignoring the registry snapshot %s: not a format %d snapshot (%s: %s)", path, FORMAT,
                  type(exc).__name__, exc)
        return None


def decode_snapshot(body: dict) -> RegistrySnapshot:
    """A RegistrySnapshot from its JSON; TypeError, ValueError or KeyError when it is not one."""
    if body.get("format") != FORMAT:
        raise ValueError(f"format {body.get('format')!r}")
    return RegistrySnapshot(
        generation=int(body["generation"]),
        written_at=float(body["written_at"]),
        models=[_model(item) for item in body["models"]],
        canaries=[(_config(item["config"]), _model(item["model"])) for item in body["canaries"]],
    )


def snapshot_of(generation: int, models: list[RegistryModel], canaries) -> RegistrySnapshot:
    """A snapshot from a sync's state; canaries are the sync's {product: CanaryToServe} (config, model)."""
    return RegistrySnapshot(generation=generation, written_at=time.time(), models=list(models),
                            canaries=[(canary.config, canary.model) for canary in canaries.values()])


def describe(snapshot: RegistrySnapshot) -> str:
    written = datetime.datetime.fromtimestamp(snapshot.written_at, datetime.UTC)
    return (f"generation {snapshot.generation} of {written:%Y-%m-%dT%H:%M:%SZ} "
            f"({', '.join(f'{m.product}={m.model_id}' for m in snapshot.models) or 'no model'})")


def _model(fields: dict) -> RegistryModel:
    model = RegistryModel(**_with_datetimes(fields))
    if not isinstance(model.feature_spec, dict) or not isinstance(model.size_bytes, int):
        raise TypeError(f"model {model.model_id!r}: a feature spec object and an integer size are required")
    return dataclasses.replace(model, threshold=float(model.threshold))


def _config(fields: dict) -> CanaryConfig:
    config = CanaryConfig(**_with_datetimes(fields))
    return dataclasses.replace(config, canary_percent=float(config.canary_percent))


def _with_datetimes(fields: dict) -> dict:
    if not isinstance(fields, dict):
        raise TypeError(f"an object is required, got {type(fields).__name__}")
    return {key: datetime.datetime.fromisoformat(value) if key in _DATETIME_FIELDS and value is not None else value
            for key, value in fields.items()}


def _json_value(value):
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")
