"""workers/registry_snapshot.py: written whole, read back equal; a missing or corrupt one is ignored,
with a log line."""

from __future__ import annotations

import datetime
import json
import logging

import pytest

from app.store.canary_config import CanaryConfig
from app.store.registry import RegistryModel
from workers.registry_queries import CanaryToServe
from workers.registry_snapshot import RegistrySnapshot, read_snapshot, snapshot_of, write_snapshot

NOW = datetime.datetime(2026, 11, 25, 14, 30, tzinfo=datetime.UTC)


def model(product: str = "fraud_score", status: str = "production", model_id: str = "m-1") -> RegistryModel:
    return RegistryModel(model_id=model_id, name="demo", version="v1", product=product, status=status,
                         storage_key="models/" + "a" * 64 + ".onnx", sha256="a" * 64, size_bytes=1234,
                         feature_spec={"product": product, "features": [{"name": "amount"}]}, threshold=0.42,
                         created_at=NOW, updated_at=None)


def canary() -> CanaryToServe:
    config = CanaryConfig(product="fraud_score", canary_model_id="m-2", production_model_id="m-1",
                          canary_percent=12.5, mode="canary", started_at=NOW, updated_at=NOW, updated_by="ops")
    return CanaryToServe(config, model(status="canary", model_id="m-2"))


def test_a_snapshot_reads_back_as_written(tmp_path):
    path = str(tmp_path / "registry-snapshot.json")
    written = snapshot_of(7, [model(), model("chargeback", model_id="m-3")], {"fraud_score": canary()})
    write_snapshot(path, written)
    read = read_snapshot(path)
    assert read == written
    assert read.canaries[0][0].basis_points == 1250
    assert not list(tmp_path.glob("*.tmp-*"))


def test_rewriting_replaces_the_whole_snapshot(tmp_path):
    path = str(tmp_path / "registry-snapshot.json")
    write_snapshot(path, snapshot_of(1, [model(), model("chargeback", model_id="m-3")], {"fraud_score": canary()}))
    write_snapshot(path, snapshot_of(2, [model()], {}))
    read = read_snapshot(path)
    assert (read.generation, [m.model_id for m in read.models], read.canaries) == (2, ["m-1"], [])


def test_a_missing_snapshot_is_none_with_a_log_line(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, "sira.snapshot"):
        assert read_snapshot(str(tmp_path / "none.json")) is None
    assert "no registry snapshot" in caplog.text


@pytest.mark.parametrize("content", [
    b"{not json",
    b"\xff\xfe",
    b"[]",
    json.dumps({"format": 99, "generation": 1, "written_at": 0, "models": [], "canaries": []}).encode(),
    json.dumps({"format": 1, "generation": 1, "written_at": 0, "models": [{"model_id": "x"}], "canaries": []}).encode(),
    json.dumps({"format": 1, "generation": "x", "written_at": 0, "models": [], "canaries": []}).encode(),
    json.dumps({"format": 1, "generation": 1, "written_at": 0, "models": ["x"], "canaries": []}).encode(),
    json.dumps({"format": 1, "generation": 1, "written_at": 0, "models": [], "canaries": [{"config": {}}]}).encode(),
])
def test_a_corrupt_snapshot_is_ignored_with_a_log_line(tmp_path, caplog, content):
    path = tmp_path / "registry-snapshot.json"
    path.write_bytes(content)
    with caplog.at_level(logging.ERROR, "sira.snapshot"):
        assert read_snapshot(str(path)) is None
    assert "ignoring the registry snapshot" in caplog.text


def test_a_truncated_snapshot_is_ignored(tmp_path):
    path = tmp_path / "registry-snapshot.json"
    write_snapshot(str(path), RegistrySnapshot(3, 0.0, [model()], []))
    path.write_bytes(path.read_bytes()[:-20])
    assert read_snapshot(str(path)) is None
