"""SQL over siramodel_registry: what is registered, what serves in production."""

from __future__ import annotations

import dataclasses

import psycopg
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


COLUMNS = "model_id::text, name, version, product, status, storage_key, sha256, size_bytes, feature_spec, threshold"


def production_models(conn: psycopg.Connection) -> list[RegistryModel]:
    rows = conn.execute(
        f"SELECT {COLUMNS} FROM siramodel_registry WHERE status = 'production' ORDER BY product").fetchall()
    return [RegistryModel(*row) for row in rows]


def registered_products(conn: psycopg.Connection) -> list[str]:
    """Products that have any model not archived: each must have a production model to be ready."""
    rows = conn.execute(
        "SELECT DISTINCT product FROM siramodel_registry WHERE status <> 'archived' ORDER BY product").fetchall()
    return [row[0] for row in rows]


def count_models(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM siramodel_registry").fetchone()[0]


def lock_registry(conn: psycopg.Connection) -> None:
    """Serialise registry writers across processes for the current transaction."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (REGISTRY_LOCK_KEY,))


def register_model(conn: psycopg.Connection, *, name: str, version: str, product: str, status: str,
                   storage_key: str, sha256: str, size_bytes: int, feature_spec: dict,
                   threshold: float) -> str:
    row = conn.execute(
        """INSERT INTO siramodel_registry
               (name, version, product, status, storage_key, sha256, size_bytes, feature_spec, threshold)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
           RETURNING model_id::text""",
        (name, version, product, status, storage_key, sha256, size_bytes, Jsonb(feature_spec), threshold),
    ).fetchone()
    return row[0]
