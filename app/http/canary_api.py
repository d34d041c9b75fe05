"""Canary admin endpoints: POST /v1/canary, GET /v1/canary/{product}, POST /v1/canary/{product}/stop.

They read and write sira_canary_config through the worker's pool (`app.db`) and the SQL of
`app/store/canary_config.py`; every change NOTIFYs the instances through the table's trigger, and
their supervisors route accordingly. Refusals: a malformed body or value is 400 INVALID_REQUEST;
an unknown model id 404 MODEL_NOT_FOUND; a well-formed pair the registry refuses (a model of
another product, an archived or production canary, a production id that is not the product's
current production model, the same model twice) 409 CONFLICT; a product without a config 404
NOT_FOUND. Every change is logged on `sira.canary` with the token's subject, never the token.
Starting a canary draws its routing seed (app/store/canary_config.py); no answer ever includes it.
"""

from __future__ import annotations

import logging

from app.db import Database
from app.errors import Conflict, InvalidRequest, ModelNotFound, NotFound
from app.http.models_api import iso_utc
from app.http.requests import read_json_object
from app.ids import PRODUCT_PATTERN
from app.store import canary_config
from app.store.canary_config import CanaryConfig

log = logging.getLogger("sira.canary")

CANARY_BODY_MAX_BYTES = 4096
RECENT_ROLLBACKS = 5
REQUIRED_FIELDS = ("product", "canary_model_id", "production_model_id", "canary_percent")
BODY_FIELDS = frozenset(REQUIRED_FIELDS + ("mode",))

# app.store.canary_config's refusals -> the API error answered for them.
API_ERROR_FOR = {
    canary_config.InvalidCanaryValue: InvalidRequest,
    canary_config.CanaryModelNotRegistered: ModelNotFound,
    canary_config.CanaryConfigConflict: Conflict,
    canary_config.CanaryNotConfigured: NotFound,
}


def api_error(exc: canary_config.CanaryConfigError) -> Exception:
    return API_ERROR_FOR[type(exc)](str(exc), {"field": exc.field} if exc.field else {})


def checked_product(product: object) -> str:
    if type(product) is not str or PRODUCT_PATTERN.fullmatch(product) is None:
        raise InvalidRequest("product must be a lower-case identifier such as fraud_score", {"field": "product"})
    return product


def subject_of(req) -> str:
    principal = getattr(req.context, "principal", None)
    return getattr(principal, "subject", "?")


def parse_canary_body(body: dict) -> dict:
    """The keyword arguments of set_canary (less subject); InvalidRequest naming the first bad field."""
    unknown = sorted(body.keys() - BODY_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}", {"field": unknown[0], "allowed": sorted(BODY_FIELDS)})
    for name in REQUIRED_FIELDS:
        if name not in body:
            raise InvalidRequest(f"{name} is required", {"field": name})
    try:
        return {
            "product": checked_product(body["product"]),
            "canary_model_id": canary_config.checked_model_id(body["canary_model_id"], "canary_model_id"),
            "production_model_id": canary_config.checked_model_id(body["production_model_id"],
                                                                  "production_model_id"),
            "canary_percent": canary_config.checked_percent(body["canary_percent"]),
            "mode": canary_config.checked_mode(body.get("mode", "canary")),
        }
    except canary_config.CanaryConfigError as exc:
        raise api_error(exc) from None


def rollback_json(entry: dict) -> dict:
    return {**entry, "created_at": iso_utc(entry["created_at"])}


def config_json(config: CanaryConfig, rollbacks: list[dict]) -> dict:
    """The seed's fields first, then mode, who changed it last, and the latest rollbacks.

    Never the routing seed: with it a client could compute which events meet the canary
    (app/scoring/routing.py). Fields are listed one by one so that a new column stays private.
    """
    return {
        "product": config.product,
        "canary_model_id": config.canary_model_id,
        "production_model_id": config.production_model_id,
        "canary_percent": config.canary_percent,
        "started_at": iso_utc(config.started_at),
        "updated_at": iso_utc(config.updated_at),
        "mode": config.mode,
        "updated_by": config.updated_by,
        "recent_rollbacks": [rollback_json(entry) for entry in rollbacks],
    }


class CanaryResource:
    """POST /v1/canary: create or replace a product's canary config; answers it as stored."""

    auth_actions = {"POST": "canary:write"}

    def __init__(self, database: Database):
        self.database = database

    async def on_post(self, req, resp):
        fields = parse_canary_body(await read_json_object(req, CANARY_BODY_MAX_BYTES))
        subject = subject_of(req)
        try:
            async with self.database.connection() as conn:
                config = await canary_config.set_canary(conn, subject=subject, **fields)
                rollbacks = await canary_config.rollback_log(conn, config.product, RECENT_ROLLBACKS)
        except canary_config.CanaryConfigError as exc:
            raise api_error(exc) from None
        log.info("%s set the canary of %s: model %s, %s%% in %s mode, against production %s",
                 subject, config.product, config.canary_model_id, config.canary_percent, config.mode,
                 config.production_model_id)
        resp.media = config_json(config, rollbacks)


class CanaryProductResource:
    """GET /v1/canary/{product}: the product's canary config and its latest rollbacks."""

    auth_actions = {"GET": "canary:read"}

    def __init__(self, database: Database):
        self.database = database

    async def on_get(self, req, resp, product: str):
        product = checked_product(product)
        async with self.database.connection() as conn:
            config = await canary_config.get_canary(conn, product)
            if config is None:
                raise NotFound(f"product {product!r} has no canary config", {"field": "product"})
            rollbacks = await canary_config.rollback_log(conn, product, RECENT_ROLLBACKS)
        resp.media = config_json(config, rollbacks)


class CanaryStopResource:
    """POST /v1/canary/{product}/stop: percent 0, logged as a manual rollback; answers the config after."""

    auth_actions = {"POST": "canary:write"}

    def __init__(self, database: Database):
        self.database = database

    async def on_post(self, req, resp, product: str):
        product = checked_product(product)
        subject = subject_of(req)
        try:
            async with self.database.connection() as conn:
                config = await canary_config.stop_canary(conn, product, subject)
                rollbacks = await canary_config.rollback_log(conn, product, RECENT_ROLLBACKS)
        except canary_config.CanaryConfigError as exc:
            raise api_error(exc) from None
        log.info("%s stopped the canary of %s (model %s)", subject, product, config.canary_model_id)
        resp.media = config_json(config, rollbacks)
