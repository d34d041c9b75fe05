"""The supervisor's SQL: the registry's serving state, read in one snapshot, and a canary's rollback.

Each call opens its own autocommit connection (app/db.py) and runs in a thread of the
supervisor's loop; a failure is a ``psycopg.Error`` for the caller to count and retry.
"""

from __future__ import annotations

import dataclasses

from app.db import connect
from app.store import canary_config, registry
from workers.canary_watch import RollbackVerdict


def roll_back_canary(dsn: str, verdict: RollbackVerdict) -> bool:
    with connect(dsn, "supervisor") as conn:
        return canary_config.roll_back(conn, verdict.product, verdict.canary_model_id, verdict.reason,
                                       verdict.figures)


@dataclasses.dataclass(frozen=True)
class CanaryToServe:
    """A product's canary config in force and its registered model."""

    config: canary_config.CanaryConfig
    model: registry.RegistryModel


def read_serving_state(dsn: str) -> tuple[list[registry.RegistryModel], dict[str, CanaryToServe]]:
    """The production models (one per product) and the canaries in force, in one snapshot.

    A config whose canary model is archived (or gone) is not in force: production serves alone.
    """
    with connect(dsn, "supervisor") as conn, \
            conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        models = registry.production_models(conn)
        configs = canary_config.active_canaries(conn)
        registered = registry.models_by_id(conn, [config.canary_model_id for config in configs])
    canaries = {}
    for config in configs:
        model = registered.get(config.canary_model_id)
        if model is not None and model.status != "archived" and model.product == config.product:
            canaries[config.product] = CanaryToServe(config, model)
    return models, canaries
