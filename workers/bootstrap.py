"""First start: migrations, and an empty registry gets the demo model as the production model of fraud_score.

With DATABASE_URL (a Postgres sira does not start itself) that does not answer at start, or a
model store that does not, the master does not wait: it tries for START_PATIENCE_S, then serves
(from the registry snapshot, workers/registry_snapshot.py) and leaves both steps to the supervisor,
which runs `prepare_database` before its next sync until it succeeds.
"""

from __future__ import annotations

import importlib.resources
import json
import logging

import psycopg

from app.db import connect
from app.predlog.partitions import ensure_partitions
from app.store import registry
from app.store.buckets import ModelStore, ModelStoreUnavailable
from workers.migrate import apply_migrations
from workers.retry import Backoff, call_with_retries

log = logging.getLogger("sira.bootstrap")

DEMO_VERSION = "demo-1"
START_PATIENCE_S = 5.0  # how long the master tries an external Postgres before it serves without it
# What "not reachable now" looks like; anything else (a bad migration, a refused password...) stops the start.
UNREACHABLE = (psycopg.OperationalError, ModelStoreUnavailable)


def prepare_database(dsn: str, store: ModelStore) -> None:
    """Apply the pending migrations, make the prediction log's coming day partitions, then register
    the demo model if the registry is empty."""
    apply_migrations(dsn)
    with connect(dsn, "bootstrap") as conn:
        ensure_partitions(conn)
        ensure_demo_model(conn, store)


def prepare_database_at_start(dsn: str, store: ModelStore, external: bool) -> bool:
    """In the master: `prepare_database`, retried for START_PATIENCE_S; True when done.

    False when an external Postgres (or the model store) still does not answer: serve anyway, the
    supervisor finishes the job. The embedded Postgres was just started by us: its errors stop the start.
    """
    unreachable = UNREACHABLE if external else (ModelStoreUnavailable,)
    try:
        call_with_retries(lambda: prepare_database(dsn, store), Backoff(0.25, 2.0), unreachable,
                          START_PATIENCE_S, "preparing the database")
    except unreachable as exc:
        log.error("cannot prepare the database at start (%s: %s); serving without it: the supervisor applies "
                  "the migrations and registers the demo model once it answers",
                  type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        return False
    return True


def demo_files() -> tuple[str, dict]:
    """Path of the committed demo ONNX model and its feature spec."""
    folder = importlib.resources.files("workers.demo")
    spec = json.loads((folder / "fraud_score.spec.json").read_text())
    return str(folder / "fraud_score.onnx"), spec


def ensure_demo_model(conn: psycopg.Connection, store: ModelStore) -> str | None:
    """Register the demo model when the registry is empty; returns its model id, or None.

    The demo object is put in the store on every start (content-addressed, so idempotent): another
    instance on the same database may have registered it from its own local store.
    """
    model_path, spec = demo_files()
    key, sha256, size = store.put_file(model_path)
    with conn.transaction():
        registry.lock_registry(conn)
        if registry.count_models(conn):
            return None
        model_id = registry.register_model(
            conn, name=spec["name"], version=DEMO_VERSION, product=spec["product"], status="production",
            storage_key=key, sha256=sha256, size_bytes=size, feature_spec=spec, threshold=spec["threshold"])
    log.info("registry was empty: registered the demo model %s as production for %s", model_id, spec["product"])
    return model_id
