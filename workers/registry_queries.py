"""The supervisor's SQL: the registry's serving state, read in one snapshot, and a canary's rollback.

Each call opens its own autocommit connection (``CONNECT_TIMEOUT_S``) and runs in a thread of the
supervisor's loop; a failure is a ``psycopg.Error`` for the caller to count and retry.
"""

from __future__ import annotations

import dataclasses

import psycopg

from app.store import canary_config, registry
from workers.canary_watch import RollbackVerdict

CONNECT_TIMEOUT_S = 5


def roll_back_canary(dsn: str, verdict: RollbackVerdict) -> bool:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
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
    with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn, \
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
