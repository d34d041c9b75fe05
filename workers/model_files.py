"""Local copies of registry models, verified, where the workers open them (used by the supervisor)."""

from __future__ import annotations

import logging
import os

from app.store.buckets import ModelStore, sha256_of, storage_key
from app.store.registry import RegistryModel

log = logging.getLogger("sira.models")


def local_model_path(models_dir: str, sha256: str) -> str:
    """The file named by the sha256; ValueError for anything else, so the name stays inside models_dir.

    The registry's CHECK constraint already holds sha256 to 64 hex digits; this does not rely on it.
    """
    storage_key(sha256)  # raises ValueError unless sha256 is 64 lower-case hex digits
    return os.path.join(models_dir, f"{sha256}.onnx")


def ensure_local_copy(store: ModelStore, model: RegistryModel, models_dir: str) -> str:
    """The model's file under models_dir, fetched and verified when missing or not intact."""
    path = local_model_path(models_dir, model.sha256)
    if os.path.isfile(path) and sha256_of(path) == (model.sha256, model.size_bytes):
        return path
    store.fetch(model.storage_key, path, model.sha256, model.size_bytes)
    log.info("fetched model %s (%s) into %s", model.model_id, model.product, path)
    return path
