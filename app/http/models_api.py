"""Admin endpoints for ml_ops: GET /v1/models and POST /v1/models/{model_id}/promote.

Both read and write the registry in Postgres through the worker's pool (`app.db`); a promotion
notifies every instance through the registry's trigger, and the supervisors then sync. What a
worker serves right now (the generation, when each model was loaded) comes from a `ServingState`,
which the supervisor's control block provides; until it does, those fields are null.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
from typing import Protocol

from app.db import Database
from app.errors import Conflict, InvalidRequest, ModelNotFound
from app.http.requests import read_json_object
from app.ids import PRODUCT_PATTERN
from app.store import registry
from app.store.registry import RegistryModel
from shm.model_stats import ModelFigures

log = logging.getLogger("sira.admin")

MODEL_ID_PATTERN = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
PROMOTE_BODY_MAX_BYTES = 4096


class ServingState(Protocol):
    """What this instance serves: the control block's generation and each model's load time."""

    def generation(self) -> int | None:
        """The current model generation, or None when unknown."""

    def loaded_at(self, model_id: str) -> str | None:
        """ISO 8601 UTC time the model went live on this instance, or None when it is not loaded."""


class ServingStateNotTracked:
    """The placeholder until the supervisor publishes generations: nothing is known, fields are null."""

    def generation(self) -> int | None:
        return None

    def loaded_at(self, model_id: str) -> str | None:
        return None


def iso_utc(moment: _dt.datetime | None) -> str | None:
    """The API's timestamp format (milliseconds, Z) for a timezone-aware datetime."""
    if moment is None:
        return None
    moment = moment.astimezone(_dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def model_json(model: RegistryModel, serving: ServingState) -> dict:
    """One model as the API shows it: the seed's fields first, then the registry's facts."""
    return {
        "model_id": model.model_id,
        "name": model.name,
        "version": model.version,
        "product": model.product,
        "status": model.status,
        "loaded_at": serving.loaded_at(model.model_id),
        "threshold": model.threshold,
        "sha256": model.sha256,
        "size_bytes": model.size_bytes,
        "storage_key": model.storage_key,
        "created_at": iso_utc(model.created_at),
        "updated_at": iso_utc(model.updated_at),
    }


def checked_model_id(model_id: str) -> str:
    if MODEL_ID_PATTERN.fullmatch(model_id) is None:
        raise InvalidRequest("model_id must be a UUID such as 3f2c1a9e-8b7d-4c6e-9f10-2a3b4c5d6e7f",
                             {"field": "model_id"})
    return model_id.lower()


class ModelsResource:
    """GET /v1/models[?product=P][&status=S]: every registered model, by product, newest first."""

    auth_actions = {"GET": "models:read"}

    def __init__(self, database: Database, serving: ServingState | None = None):
        self.database = database
        self.serving = serving or ServingStateNotTracked()

    async def on_get(self, req, resp):
        product = req.get_param("product")
        if product is not None and PRODUCT_PATTERN.fullmatch(product) is None:
            raise InvalidRequest("product must be a lower-case identifier such as fraud_score",
                                 {"field": "product"})
        status = req.get_param("status")
        if status is not None and status not in registry.STATUSES:
            raise InvalidRequest(f"status must be one of {', '.join(registry.STATUSES)}",
                                 {"field": "status", "allowed": list(registry.STATUSES)})
        async with self.database.connection() as conn:
            models = await registry.list_models(conn, product=product, status=status)
        resp.media = {
            "models": [model_json(model, self.serving) for model in models],
            "total": len(models),
            "generation": self.serving.generation(),
        }


class ModelPromoteResource:
    """POST /v1/models/{model_id}/promote {"target": ...}: answers the model as it is now.

    Promoting to production archives the product's previous production model in the same
    transaction (`archived_model_ids`); promoting to the current status is a no-op.
    """

    auth_actions = {"POST": "models:write"}

    def __init__(self, database: Database, serving: ServingState | None = None):
        self.database = database
        self.serving = serving or ServingStateNotTracked()

    async def on_post(self, req, resp, model_id: str):
        model_id = checked_model_id(model_id)
        body = await read_json_object(req, PROMOTE_BODY_MAX_BYTES)
        target = body.get("target")
        if target not in registry.PROMOTION_TARGETS:
            raise InvalidRequest(f"target must be one of {', '.join(registry.PROMOTION_TARGETS)}",
                                 {"field": "target", "allowed": list(registry.PROMOTION_TARGETS)})
        try:
            async with self.database.connection() as conn:
                promotion = await registry.promote_model(conn, model_id, target)
        except registry.ModelNotRegistered as exc:
            raise ModelNotFound(str(exc), {"model_id": model_id}) from None
        except registry.PromotionRefused as exc:
            raise Conflict(str(exc), {"model_id": model_id, "target": target}) from None
        principal = getattr(req.context, "principal", None)
        log.info("%s promoted model %s (%s %s) from %s to %s; archived %s",
                 getattr(principal, "subject", "?"), model_id, promotion.model.product,
                 promotion.model.version, promotion.previous_status, target,
                 promotion.archived_model_ids or "none")
        resp.media = {
            **model_json(promotion.model, self.serving),
            "previous_status": promotion.previous_status,
            "archived_model_ids": promotion.archived_model_ids,
        }


def stats_json(figures: ModelFigures) -> dict:
    """Counts of one model (one role, or all of them added up) as the API shows them."""
    cache_hits = max(0, figures.requests - figures.errors - figures.scored)
    answered = figures.requests - figures.errors
    return {
        "requests": figures.requests,
        "errors": figures.errors,
        "model_runs": figures.scored,
        "cache_hits": cache_hits,
        "cache_hit_rate": round(cache_hits / answered, 6) if answered else None,
        "p50_ms": rounded(figures.latency_quantile_ms(0.50)),
        "p95_ms": rounded(figures.latency_quantile_ms(0.95)),
    }


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def added_up(parts: list[ModelFigures]) -> ModelFigures:
    total = ModelFigures()
    for part in parts:
        total = total.plus(part)
    return total


class ModelInfoResource:
    """GET /v1/models/{model_id}: the registry's facts plus what this host served with the model.

    The counts come from the model stats segment (every worker of this host, since the server
    started; a restarted worker continues its slot's counts): requests, errors, model runs, cache
    hits and the p50/p95 of the model's own run time per event, in total and by role.
    """

    auth_actions = {"GET": "models:read"}

    def __init__(self, database: Database, serving: ServingState | None = None, model_stats=None):
        self.database = database
        self.serving = serving or ServingStateNotTracked()
        self.model_stats = model_stats

    async def on_get(self, req, resp, model_id: str):
        model_id = checked_model_id(model_id)
        async with self.database.connection() as conn:
            model = await registry.get_model(conn, model_id)
        if model is None:
            raise ModelNotFound(f"no model {model_id} in the registry", {"model_id": model_id})
        by_role = self.model_stats.figures_of(model_id) if self.model_stats is not None else {}
        resp.media = {
            **model_json(model, self.serving),
            "generation": self.serving.generation(),
            "stats": {**stats_json(added_up(list(by_role.values()))),
                      "by_role": {role: stats_json(figures) for role, figures in sorted(by_role.items())}},
        }
