"""Removing the model files of old generations once nothing uses them.

Each worker lists the files it holds in ``models/in-use/<pid>`` (one base name per line, written by
app/store/swap.py before it opens them). After each sync (workers/model_sync.py) the model files
that neither the new table, nor the registry's production models, nor a live worker's list names
are removed; the lists of dead workers go with them.
"""

from __future__ import annotations

import logging
import os

from app.store import registry
from shm.control import ProductEntry
from workers.processes import process_exists

log = logging.getLogger("sira.supervisor")

IN_USE_DIR = "in-use"
MODEL_FILE_SUFFIXES = (".onnx", ".weights", ".spec.json")


def remove_unused_files(models_dir: str, in_use_dir: str, table: dict[str, ProductEntry],
                        models: list[registry.RegistryModel]) -> None:
    """Remove model files no one needs: not in the table, the registry, nor a worker's list."""
    keep = {model.sha256 for model in models} | {model.model_id for model in models}
    for entry in table.values():
        for slot in (entry.production, entry.canary):
            if slot is not None:
                keep |= {file_stem(slot.path), file_stem(slot.spec_path)}
    keep |= {file_stem(name) for name in files_in_use(in_use_dir)}
    for name in os.listdir(models_dir):
        if name.endswith(MODEL_FILE_SUFFIXES) and not name.startswith(".") \
                and file_stem(name) not in keep:
            try:
                os.unlink(os.path.join(models_dir, name))
                log.info("removed %s: no generation or worker uses it", name)
            except FileNotFoundError:
                pass


def files_in_use(in_use_dir: str) -> set[str]:
    """Base names listed by live workers; the lists of dead workers are removed."""
    names: set[str] = set()
    for record in os.listdir(in_use_dir):
        path = os.path.join(in_use_dir, record)
        if not record.isdigit():
            continue
        if not process_exists(int(record)):
            remove_quietly(path)
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                names.update(line.strip() for line in handle if line.strip())
        except FileNotFoundError:
            continue  # removed meanwhile: its worker is gone
    return names


def file_stem(path: str) -> str:
    """What a model file is named by: the sha256 or model id before the first dot."""
    return os.path.basename(path).split(".", 1)[0]


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
