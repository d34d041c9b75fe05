"""SQL over sira_canary_config and sira_canary_rollback_log: who gets a canary, how much, and its stops.

The canary config table is the source of truth for canaries: setting one does not change the
registry status of either model (a canary may stay `candidate` or `validated`); archived models
are refused. Every change fires the table's triggers, which write a sira_canary_config_history row
and NOTIFY `sira_config_changed` when the transaction commits.

Active and stopped: a config is active while it has a canary model and either a share of traffic
(`canary_percent > 0`) or `mode = 'shadow'` (a shadow canary scores a copy of the traffic; its
percent is not used for routing). Stopping, by hand or automatically, sets `canary_percent = 0`
and `mode = 'canary'` and keeps both model ids, so a stopped config is plainly inactive whatever
its mode was, and GET still shows what ran.

Routing seed: every config holds `routing_seed`, 16 random bytes (`secrets`) drawn whenever a
canary starts (exactly when `started_at` restarts: a new config, a new canary model, or a stopped
config made active again) and kept by every other change, so raising the percent keeps each
event's bucket. The supervisors mirror it into the control block; the admin API never answers it
(app/scoring/routing.py says why).

The supervisor uses the sync functions (`active_canaries`, `roll_back`) over a `psycopg.Connection`;
the admin API the async ones over a `psycopg.AsyncConnection`.
"""

from __future__ import annotations

import dataclasses
import decimal
import re
import secrets
from datetime import datetime

import psycopg
from psycopg.types.json import Jsonb

MODES = ("canary", "shadow")
MODEL_ID_PATTERN = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
PERCENT_MAX = 100
PERCENT_DECIMALS = 2
# A JSON number such as 0.35 may reach us as 0.35000000000000003; within this of a multiple of
# 0.01 (in hundredths) it is that multiple; 10.123 is 0.3 hundredths away, far outside it.
PERCENT_TOLERANCE = 1e-6
AUTO_ROLLBACK_SUBJECT = "auto-rollback"
MANUAL_STOP_REASON = "manual stop"

COLUMNS = ("product, canary_model_id::text, production_model_id::text, canary_percent, mode, started_at, "
           "updated_at, updated_by, encode(routing_seed, 'hex')")
SEED_BYTES = 16
ACTIVE = "canary_model_id IS NOT NULL AND (canary_percent > 0 OR mode = 'shadow')"
# In set_canary's upsert (c: the stored row): the change starts a canary, so it gets a new
# started_at and a new routing seed.
STARTS = """(c.started_at IS NULL
             OR c.canary_model_id IS DISTINCT FROM EXCLUDED.canary_model_id
             OR (NOT (c.canary_percent > 0 OR c.mode = 'shadow')
                 AND (EXCLUDED.canary_percent > 0 OR EXCLUDED.mode = 'shadow')))"""


@dataclasses.dataclass(frozen=True)
class CanaryConfig:
    product: str
    canary_model_id: str | None
    production_model_id: str | None
    canary_percent: float  # 0..100, two decimals
    mode: str  # "canary" or "shadow"
    started_at: datetime | None
    updated_at: datetime | None
    updated_by: str | None
    # The routing seed as 32 hex digits (text, so that the registry snapshot's JSON holds it); ""
    # in a snapshot written before seeds existed. Out of repr: logs never show it.
    routing_seed: str = dataclasses.field(default="", repr=False)

    @property
    def seed_bytes(self) -> bytes:
        """The routing seed as the control block holds it (16 zero bytes when there is none)."""
        seed = bytes.fromhex(self.routing_seed) if self.routing_seed else b""
        return seed if len(seed) == SEED_BYTES else bytes(SEED_BYTES)

    @property
    def basis_points(self) -> int:
        """The share in hundredths of a percent (0..10000), exact for a two-decimal percent."""
        return round(self.canary_percent * 100)

    @property
    def active(self) -> bool:
        return self.canary_model_id is not None and (self.canary_percent > 0 or self.mode == "shadow")


def config_from_row(row: tuple) -> CanaryConfig:
    product, canary, production, percent, mode, started_at, updated_at, updated_by, seed = row
    return CanaryConfig(product, canary, production, float(percent), mode, started_at, updated_at, updated_by,
                        seed)


class CanaryConfigError(Exception):
    """A canary change that cannot be made; the message says why in one line, `field` names the culprit."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class InvalidCanaryValue(CanaryConfigError):
    """A value out of its domain (percent, mode): a bad request whatever the database holds."""


class CanaryModelNotRegistered(CanaryConfigError):
    """The canary or the production model id is not in the registry."""


class CanaryConfigConflict(CanaryConfigError):
    """Both models exist but the registry refuses the pair: another product, archived, not current."""


class CanaryNotConfigured(CanaryConfigError):
    """The product has no canary config."""


def checked_percent(value: object) -> decimal.Decimal:
    """A JSON number 0..100 with at most two decimals, as the Decimal the numeric(5, 2) column stores."""
    if type(value) not in (int, float, decimal.Decimal):
        raise InvalidCanaryValue("canary_percent must be a number from 0 to 100", "canary_percent")
    if not 0 <= value <= PERCENT_MAX:  # also refuses nan and infinities
        raise InvalidCanaryValue("canary_percent must be a number from 0 to 100", "canary_percent")
    hundredths = round(value * 100)
    if abs(value * 100 - hundredths) > PERCENT_TOLERANCE:
        raise InvalidCanaryValue("canary_percent must have at most two decimals, such as 12.5 or 0.25",
                                 "canary_percent")
    return decimal.Decimal(hundredths).scaleb(-PERCENT_DECIMALS)


def checked_model_id(model_id: object, field: str) -> str:
    """A model id as the registry writes it (a lower-case UUID)."""
    if type(model_id) is not str or MODEL_ID_PATTERN.fullmatch(model_id) is None:
        raise InvalidCanaryValue(f"{field} must be a UUID such as 3f2c1a9e-8b7d-4c6e-9f10-2a3b4c5d6e7f", field)
    return model_id.lower()


def checked_mode(mode: object) -> str:
    if mode not in MODES:
        raise InvalidCanaryValue(f"mode must be one of {', '.join(MODES)}", "mode")
    return mode


# -- sync: the supervisor -------------------------------------------------------------------------------

def active_canaries(conn: psycopg.Connection) -> list[CanaryConfig]:
    """Every active config (see the module docstring), by product."""
    rows = conn.execute(f"SELECT {COLUMNS} FROM sira_canary_config WHERE {ACTIVE} ORDER BY product").fetchall()
    return [config_from_row(row) for row in rows]


def roll_back(conn: psycopg.Connection, product: str, canary_model_id: str, reason: str, figures: dict) -> bool:
    """Stop this canary and log why, in one transaction; False when it was not active (already stopped,
    another canary since, or another instance rolled it back first)."""
    with conn.transaction():
        row = conn.execute(
            f"""UPDATE sira_canary_config
                   SET canary_percent = 0, mode = 'canary', updated_by = %s
                 WHERE product = %s AND canary_model_id = %s AND {ACTIVE}
             RETURNING production_model_id::text""",
            (AUTO_ROLLBACK_SUBJECT, product, canary_model_id)).fetchone()
        if row is None:
            return False
        conn.execute(
            """INSERT INTO sira_canary_rollback_log
                   (product, canary_model_id, production_model_id, reason, metrics, triggered_by)
               VALUES (%s, %s, %s, %s, %s, 'auto')""",
            (product, canary_model_id, row[0], reason, Jsonb(figures)))
    return True


# -- async: the admin API -------------------------------------------------------------------------------

async def get_canary(conn: psycopg.AsyncConnection, product: str) -> CanaryConfig | None:
    cursor = await conn.execute(f"SELECT {COLUMNS} FROM sira_canary_config WHERE product = %s", (product,))
    row = await cursor.fetchone()
    return None if row is None else config_from_row(row)


async def set_canary(conn: psycopg.AsyncConnection, *, product: str, canary_model_id: str,
                     production_model_id: str, canary_percent: float, mode: str = "canary",
                     subject: str) -> CanaryConfig:
    """Create or replace the product's canary config after checking both models in the same transaction.

    The registry rows are locked FOR SHARE, so a promotion cannot change them before the commit.
    `started_at` becomes now() for a new config, a new canary model, or a config that goes from
    stopped to active (percent from 0 to more, or to shadow mode); otherwise it is kept. The routing
    seed follows it: a fresh one from `secrets` when the canary starts, kept otherwise.
    """
    canary_model_id = checked_model_id(canary_model_id, "canary_model_id")
    production_model_id = checked_model_id(production_model_id, "production_model_id")
    percent = checked_percent(canary_percent)
    mode = checked_mode(mode)
    async with conn.transaction():
        await check_models(conn, product, canary_model_id, production_model_id)
        cursor = await conn.execute(
            f"""INSERT INTO sira_canary_config AS c
                       (product, canary_model_id, production_model_id, canary_percent, mode, started_at, updated_by,
                        routing_seed)
                VALUES (%(product)s, %(canary)s, %(production)s, %(percent)s, %(mode)s, now(), %(subject)s,
                        %(seed)s)
                ON CONFLICT (product) DO UPDATE SET
                       canary_model_id = EXCLUDED.canary_model_id,
                       production_model_id = EXCLUDED.production_model_id,
                       canary_percent = EXCLUDED.canary_percent,
                       mode = EXCLUDED.mode,
                       updated_by = EXCLUDED.updated_by,
                       started_at = CASE WHEN {STARTS} THEN now() ELSE c.started_at END,
                       routing_seed = CASE WHEN {STARTS} THEN EXCLUDED.routing_seed ELSE c.routing_seed END
                RETURNING {COLUMNS}""",
            {"product": product, "canary": canary_model_id, "production": production_model_id,
             "percent": percent, "mode": mode, "subject": subject, "seed": secrets.token_bytes(SEED_BYTES)})
        return config_from_row(await cursor.fetchone())


async def check_models(conn: psycopg.AsyncConnection, product: str, canary_model_id: str,
                       production_model_id: str) -> None:
    """Both models exist; the canary is the product's, not archived, not production; the production
    model is the product's current one. Locks both registry rows FOR SHARE until the commit."""
    cursor = await conn.execute(
        """SELECT model_id::text, product, status FROM siramodel_registry
            WHERE model_id = ANY(%s::uuid[]) ORDER BY model_id FOR SHARE""",
        ([canary_model_id, production_model_id],))
    models = {model_id: (owner, status) for model_id, owner, status in await cursor.fetchall()}
    for field, model_id in (("canary_model_id", canary_model_id), ("production_model_id", production_model_id)):
        if model_id not in models:
            raise CanaryModelNotRegistered(f"no model {model_id} in the registry", field)
    if canary_model_id == production_model_id:
        raise CanaryConfigConflict("canary_model_id and production_model_id are the same model", "canary_model_id")
    canary_product, canary_status = models[canary_model_id]
    if canary_product != product:
        raise CanaryConfigConflict(f"model {canary_model_id} is a model of {canary_product!r}, not {product!r}",
                                   "canary_model_id")
    if canary_status in ("archived", "production"):
        raise CanaryConfigConflict(f"model {canary_model_id} is {canary_status}: it cannot be a canary",
                                   "canary_model_id")
    production_product, production_status = models[production_model_id]
    if production_product != product or production_status != "production":
        raise CanaryConfigConflict(
            f"model {production_model_id} is not the current production model of {product!r} "
            f"(it is {production_status}, of {production_product!r})", "production_model_id")


async def stop_canary(conn: psycopg.AsyncConnection, product: str, subject: str) -> CanaryConfig:
    """Stop the product's canary (percent 0, mode canary) and log a manual rollback by subject.

    Stopping a config that is not active changes nothing and logs nothing: no rollback happened.
    """
    async with conn.transaction():
        cursor = await conn.execute(
            f"SELECT {COLUMNS} FROM sira_canary_config WHERE product = %s FOR UPDATE", (product,))
        row = await cursor.fetchone()
        if row is None:
            raise CanaryNotConfigured(f"product {product!r} has no canary config", "product")
        before = config_from_row(row)
        if not before.active:
            return before
        cursor = await conn.execute(
            f"""UPDATE sira_canary_config SET canary_percent = 0, mode = 'canary', updated_by = %s
                 WHERE product = %s RETURNING {COLUMNS}""", (subject, product))
        after = config_from_row(await cursor.fetchone())
        await conn.execute(
            """INSERT INTO sira_canary_rollback_log
                   (product, canary_model_id, production_model_id, reason, metrics, triggered_by)
               VALUES (%s, %s, %s, %s, %s, %s)""",
            (product, before.canary_model_id, before.production_model_id, MANUAL_STOP_REASON,
             Jsonb({"canary_percent": before.canary_percent, "mode": before.mode}), f"manual:{subject}"))
    return after


async def rollback_log(conn: psycopg.AsyncConnection, product: str, limit: int = 20) -> list[dict]:
    """The product's rollbacks, newest first: id, canary and production model ids, reason, metrics,
    triggered_by ('auto' or 'manual:<subject>'), created_at (a datetime)."""
    cursor = await conn.execute(
        """SELECT id, canary_model_id::text, production_model_id::text, reason, metrics, triggered_by, created_at
             FROM sira_canary_rollback_log WHERE product = %s
            ORDER BY created_at DESC, id DESC LIMIT %s""", (product, limit))
    names = ("id", "canary_model_id", "production_model_id", "reason", "metrics", "triggered_by", "created_at")
    return [dict(zip(names, row)) for row in await cursor.fetchall()]
