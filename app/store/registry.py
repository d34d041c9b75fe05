"""SQL over siramodel_registry: what is registered, what serves in production, promotions.

The master and the CLI's publish use the sync functions over a `psycopg.Connection`; listing and
promoting are async (`psycopg.AsyncConnection`), shared by the workers' admin API and the CLI,
so a promotion has exactly one implementation. Every change fires the registry's trigger, which
NOTIFYs `sira_config_changed` when the transaction commits.
"""

from __future__ import annotations

import dataclasses
import datetime

import psycopg
from psycopg import errors as pg_errors
from psycopg.types.json import Jsonb

# Registering the demo model and promoting must not race between instances starting at once.
REGISTRY_LOCK_KEY = 0x5152_4547  # "SREG"


@dataclasses.dataclass(frozen=True)
class RegistryModel:
    model_id: str
    name: str
    version: str
    product: str
    status: str
    storage_key: str
    sha256: str
    size_bytes: int
    feature_spec: dict
    threshold: float
    created_at: datetime.datetime | None = None
    updated_at: datetime.datetime | None = None


COLUMNS = ("model_id::text, name, version, product, status, storage_key, sha256, size_bytes, feature_spec, "
           "threshold, created_at, updated_at")

STATUSES = ("candidate", "validated", "canary", "production", "archived")
PUBLISH_STATUSES = ("candidate", "validated")
PROMOTION_TARGETS = ("validated", "canary", "production", "archived")


class RegistryError(Exception):
    """A registry change that cannot be made; the message says why in one line."""


class ModelNotRegistered(RegistryError):
    """No model has this id."""


class DuplicateModelVersion(RegistryError):
    """The product already has a model with this version."""


class PromotionRefused(RegistryError):
    """The promotion would leave the registry in a state that cannot serve."""


@dataclasses.dataclass(frozen=True)
class Promotion:
    """What a promotion did: the model as it is now, its status before, the models it archived."""

    model: RegistryModel
    previous_status: str
    archived_model_ids: list[str]

    @property
    def changed(self) -> bool:
        return self.previous_status != self.model.status


def production_models(conn: psycopg.Connection) -> list[RegistryModel]:
    rows = conn.execute(
        f"SELECT {COLUMNS} FROM siramodel_registry WHERE status = 'production' ORDER BY product").fetchall()
    return [RegistryModel(*row) for row in rows]


def models_by_id(conn: psycopg.Connection, model_ids: list[str]) -> dict[str, RegistryModel]:
    """The registered models among these ids, by id (ids not registered are left out)."""
    if not model_ids:
        return {}
    rows = conn.execute(f"SELECT {COLUMNS} FROM siramodel_registry WHERE model_id = ANY(%s::uuid[])",
                        (list(model_ids),)).fetchall()
    return {row[0]: RegistryModel(*row) for row in rows}


def count_models(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM siramodel_registry").fetchone()[0]


def lock_registry(conn: psycopg.Connection) -> None:
    """Serialise registry writers across processes for the current transaction."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (REGISTRY_LOCK_KEY,))


def version_exists(conn: psycopg.Connection, product: str, version: str) -> bool:
    row = conn.execute("SELECT 1 FROM siramodel_registry WHERE product = %s AND version = %s",
                       (product, version)).fetchone()
    return row is not None


def register_model(conn: psycopg.Connection, *, name: str, version: str, product: str, status: str,
                   storage_key: str, sha256: str, size_bytes: int, feature_spec: dict,
                   threshold: float) -> str:
    """Insert a model; raises DuplicateModelVersion when the product already has this version."""
    try:
        with conn.transaction():
            row = conn.execute(
                """INSERT INTO siramodel_registry
                       (name, version, product, status, storage_key, sha256, size_bytes, feature_spec, threshold)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
                   RETURNING model_id::text""",
                (name, version, product, status, storage_key, sha256, size_bytes, Jsonb(feature_spec), threshold),
            ).fetchone()
    except pg_errors.UniqueViolation as exc:
        if exc.diag.constraint_name != "siramodel_registry_product_version_key":
            raise
        raise DuplicateModelVersion(f"product {product!r} already has a model with version {version!r}") from None
    return row[0]


async def list_models(conn: psycopg.AsyncConnection, product: str | None = None,
                      status: str | None = None) -> list[RegistryModel]:
    """Models by product, newest first; optionally of one product and one status."""
    cursor = await conn.execute(
        f"""SELECT {COLUMNS} FROM siramodel_registry
             WHERE (%(product)s::text IS NULL OR product = %(product)s)
               AND (%(status)s::text IS NULL OR status = %(status)s)
             ORDER BY product, created_at DESC, version DESC""",
        {"product": product, "status": status})
    return [RegistryModel(*row) for row in await cursor.fetchall()]


async def get_model(conn: psycopg.AsyncConnection, model_id: str) -> RegistryModel | None:
    cursor = await conn.execute(f"SELECT {COLUMNS} FROM siramodel_registry WHERE model_id = %s", (model_id,))
    row = await cursor.fetchone()
    return None if row is None else RegistryModel(*row)


async def promote_model(conn: psycopg.AsyncConnection, model_id: str, target: str) -> Promotion:
    """Move a model to target in one transaction under the registry lock.

    Promoting to production archives the product's current production model in the same
    transaction, so there is never zero or two. Demoting the production model itself is refused:
    its product would have nothing to serve; promote its successor instead. Promoting a model to
    the status it has changes nothing and sends no notification.
    """
    if target not in PROMOTION_TARGETS:
        raise ValueError(f"target must be one of {', '.join(PROMOTION_TARGETS)}, got {target!r}")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (REGISTRY_LOCK_KEY,))
        cursor = await conn.execute(
            f"SELECT {COLUMNS} FROM siramodel_registry WHERE model_id = %s FOR UPDATE", (model_id,))
        row = await cursor.fetchone()
        if row is None:
            raise ModelNotRegistered(f"no model {model_id} in the registry")
        model = RegistryModel(*row)
        if model.status == target:
            return Promotion(model, model.status, [])
        if model.status == "production":
            raise PromotionRefused(
                f"model {model_id} is the production model of {model.product!r}: promote another model "
                f"of {model.product!r} to production instead (that archives this one)")
        archived: list[str] = []
        if target == "production":
            cursor = await conn.execute(
                """UPDATE siramodel_registry SET status = 'archived'
                    WHERE product = %s AND status = 'production' RETURNING model_id::text""",
                (model.product,))
            archived = [row[0] for row in await cursor.fetchall()]
        cursor = await conn.execute(
            f"UPDATE siramodel_registry SET status = %s WHERE model_id = %s RETURNING {COLUMNS}",
            (target, model_id))
        updated = RegistryModel(*await cursor.fetchone())
    return Promotion(updated, model.status, archived)
