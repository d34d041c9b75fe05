"""Local copies of the registry's production models, verified, as the workers open them."""

from __future__ import annotations

import logging
import os

from app.config import ModelFile
from workers.modelstore import LocalModelStore, sha256_of
from workers.registry import RegistryModel

log = logging.getLogger("sira.models")


def local_model_path(models_dir: str, sha256: str) -> str:
    return os.path.join(models_dir, f"{sha256}.onnx")


def ensure_local_copy(store: LocalModelStore, model: RegistryModel, models_dir: str) -> str:
    """The model's file under models_dir, fetched and verified when missing or not intact."""
    path = local_model_path(models_dir, model.sha256)
    if os.path.isfile(path) and sha256_of(path) == (model.sha256, model.size_bytes):
        return path
    store.fetch(model.storage_key, path, model.sha256, model.size_bytes)
    log.info("fetched model %s (%s) into %s", model.model_id, model.product, path)
    return path


def sync_production_files(store: LocalModelStore, models: list[RegistryModel], models_dir: str) -> list[ModelFile]:
    """A ModelFile per production model whose file could be made ready; failures are logged and skipped."""
    ready = []
    for model in models:
        try:
            path = ensure_local_copy(store, model, models_dir)
        except Exception as exc:  # one bad model must not stop the others from serving
            log.error("model %s (%s) is not available: %s", model.model_id, model.product, exc)
            continue
        ready.append(ModelFile(model_id=model.model_id, name=model.name, version=model.version,
                               product=model.product, path=path, spec=model.feature_spec,
                               threshold=model.threshold))
    return ready
