"""A registry row can never make the supervisor read or write a file outside the model store and models folder.

Anyone who can write to Postgres can write a registry row. Each row here names a real model file
outside the store, with its true sha256 and size, so a store that followed the key would fetch
it, verify it and serve it: the supervisor must refuse the row instead (reason download_failed),
publish nothing for it, and copy nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import psycopg
import pytest
from psycopg.types.json import Jsonb

from app.store.buckets import LocalModelStore, sha256_of
from app.store.registry import RegistryModel
from shm.control import ControlBlock
from tests.fixtures.models import demo_spec
from workers.bootstrap import demo_files
from workers.model_files import ensure_local_copy
from workers.supervisor import ModelSupervisor
from workers.sync_stats import STATS_FILE


@pytest.fixture
def conn(migrated_db):
    with psycopg.connect(migrated_db, autocommit=True) as connection:
        yield connection


@pytest.fixture
def control(tmp_path):
    block = ControlBlock.create("control", directory=str(tmp_path))
    try:
        yield block
    finally:
        block.close()
        block.unlink()


@pytest.fixture
def outside_model(tmp_path) -> tuple[str, str, int]:
    """The demo model copied outside the store: (path, sha256, size)."""
    path = str(tmp_path / "outside.onnx")
    shutil.copyfile(demo_files()[0], path)
    return (path, *sha256_of(path))


def insert_production_row(conn, storage_key: str, sha256: str, size: int) -> str:
    return conn.execute(
        """INSERT INTO siramodel_registry (name, version, product, status, storage_key, sha256, size_bytes,
                                           feature_spec, threshold)
           VALUES ('hostile', 'v1', 'fraud_score', 'production', %s, %s, %s, %s, 0.5) RETURNING model_id::text""",
        (storage_key, sha256, size, Jsonb(demo_spec()))).fetchone()[0]


@pytest.mark.parametrize("key", ["../outside.onnx", "models/../../outside.onnx", "{outside}", "store/../outside.onnx",
                                 "./../outside.onnx", "..\\outside.onnx"])
def test_registry_row_whose_key_leaves_the_store_is_refused(conn, control, migrated_db, tmp_path, outside_model,
                                                            key):
    path, sha256, size = outside_model
    store = LocalModelStore(str(tmp_path / "store"))
    models_dir = tmp_path / "models"
    (models_dir / "in-use").mkdir(parents=True)
    insert_production_row(conn, key.format(outside=path), sha256, size)
    supervisor = ModelSupervisor(control, store, migrated_db, str(models_dir), str(tmp_path / STATS_FILE),
                                 poll_interval_s=300)
    assert asyncio.run(supervisor.sync()) is False
    with open(tmp_path / STATS_FILE, encoding="utf-8") as handle:
        stats = json.load(handle)
    assert stats["model_load_errors_total"] == {"download_failed": 1}
    entry = control.read_table()[1].get("fraud_score")
    assert entry is None or entry.production is None, "nothing may serve a row that points outside the store"
    assert not [name for name in os.listdir(models_dir) if name.endswith(".onnx")]


def test_registry_refuses_a_sha256_that_is_not_hex(conn, outside_model):
    """The sha256 names the local copy (<models>/<sha256>.onnx): Postgres refuses anything but 64 hex digits."""
    _, _, size = outside_model
    with pytest.raises(psycopg.errors.CheckViolation):
        insert_production_row(conn, "models/x.onnx", "../../etc/passwd" + "0" * 48, size)


def test_local_copy_refuses_a_sha256_that_is_a_path_even_without_the_database(tmp_path, outside_model):
    path, _, size = outside_model
    store = LocalModelStore(str(tmp_path / "store"))
    key, _, _ = store.put_file(path)
    model = RegistryModel(model_id="00000000-0000-0000-0000-000000000000", name="x", version="v", product="p",
                          status="production", storage_key=key, sha256="../../escaped", size_bytes=size,
                          feature_spec={}, threshold=0.5)
    models_dir = tmp_path / "deep" / "models"
    models_dir.mkdir(parents=True)
    with pytest.raises(ValueError):
        ensure_local_copy(store, model, str(models_dir))
    assert not (tmp_path / "escaped.onnx").exists() and not list(models_dir.iterdir())
