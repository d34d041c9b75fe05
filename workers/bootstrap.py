"""First start: an empty registry gets the demo model as the production model of fraud_score."""

from __future__ import annotations

import importlib.resources
import json
import logging

import psycopg

from workers import registry
from workers.modelstore import ModelStore

log = logging.getLogger("sira.bootstrap")

DEMO_VERSION = "demo-1"


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
