"""The shared form of a model (app/store/shared_weights.py): split by protobuf wire format, opened over a map."""

from __future__ import annotations

import json
import os
import pathlib
import struct

import numpy as np
import pytest

from app.scoring.features import FeatureSpec
from app.scoring.runner import ModelLoadError, ModelRunner
from app.store.shared_weights import (
    PAGE,
    WEIGHTS_MAGIC,
    MappedWeights,
    SharedFormError,
    graph_path_for,
    is_shared_form,
    split_model,
    weights_path_for,
)
from tests.fixtures.models import build_dense_model, demo_spec
from workers.bootstrap import demo_files


@pytest.fixture
def spec() -> FeatureSpec:
    return FeatureSpec.from_dict(demo_spec())


@pytest.fixture
def dense(tmp_path) -> str:
    path = str(tmp_path / "dense.onnx")
    build_dense_model(path, hidden=256, layers=2)
    return path


def rows(n: int = 8) -> np.ndarray:
    return np.random.default_rng(3).uniform(0, 50, size=(n, 13)).astype(np.float32)


def test_split_moves_large_weights_out_and_scores_the_same(dense, spec):
    graph = split_model(dense)
    assert graph == graph_path_for(dense) and is_shared_form(graph)
    assert os.path.getsize(graph) < 20_000 < os.path.getsize(dense)
    original, shared = ModelRunner(dense, spec), ModelRunner(graph, spec)
    np.testing.assert_allclose(shared.score_rows(rows()), original.score_rows(rows()), atol=1e-5)
    assert shared.smoke_check() == pytest.approx(original.smoke_check(), abs=1e-5)


def test_weights_file_has_its_magic_and_page_aligned_tensors(dense):
    weights = MappedWeights(weights_path_for(split_model(dense)))
    with open(weights.path, "rb") as handle:
        magic, length = struct.unpack("<8sQ", handle.read(16))
        index = json.loads(handle.read(length))["tensors"]
    assert magic == WEIGHTS_MAGIC
    assert [item["name"] for item in index] == ["W1"]  # W0 (13x256) and W2 (256x2) stay inline
    assert all(item["offset"] % PAGE == 0 for item in index)
    array = weights.arrays["W1"]
    assert array.shape == (256, 256) and array.dtype == np.float32 and not array.flags.writeable


def test_float_data_weights_are_moved_too(tmp_path, spec):
    path = str(tmp_path / "typed.onnx")
    build_dense_model(path, hidden=256, layers=2, float_data=True)
    graph = split_model(path)
    assert graph is not None
    np.testing.assert_allclose(ModelRunner(graph, spec).score_rows(rows()),
                               ModelRunner(path, spec).score_rows(rows()), atol=1e-5)


def test_tree_ensemble_has_no_shared_form(tmp_path):
    demo = str(tmp_path / "demo.onnx")
    with open(demo_files()[0], "rb") as source, open(demo, "wb") as target:
        target.write(source.read())
    assert split_model(demo) is None
    assert not os.path.exists(graph_path_for(demo))


def test_session_maps_the_weights_file_read_only(dense, spec):
    graph = split_model(dense)
    runner = ModelRunner(graph, spec)
    with open("/proc/self/maps", encoding="ascii", errors="replace") as handle:
        mappings = [line for line in handle if line.rstrip().endswith(weights_path_for(graph))]
    assert mappings and all(line.split()[1].startswith("r--s") for line in mappings)
    runner.score_rows(rows())


def test_not_a_model_is_refused(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(SharedFormError):
        split_model(str(path))


@pytest.mark.parametrize("damage", ["magic", "truncate", "index"])
def test_damaged_weights_file_fails_to_load(dense, spec, damage):
    graph = split_model(dense)
    weights = weights_path_for(graph)
    data = bytearray(pathlib.Path(weights).read_bytes())
    if damage == "magic":
        data[:8] = b"NOTWEIGH"
    elif damage == "truncate":
        del data[len(data) // 2:]
    else:
        data[16:20] = b"{{{{"
    with open(weights, "wb") as handle:
        handle.write(data)
    with pytest.raises(ModelLoadError):
        ModelRunner(graph, spec)
