"""The committed demo model, its spec, and the training script that produces both."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest

from app.scoring.features import load_spec
from app.scoring.runner import ModelRunner
from workers.demo import train

MODEL = train.DEMO_DIR / train.MODEL_FILE
SPEC = train.DEMO_DIR / train.SPEC_FILE

needs_training_stack = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("sklearn", "skl2onnx", "threadpoolctl")),
    reason="training needs the 'train' extra (scikit-learn, skl2onnx)",
)


def test_spec_and_model_agree():
    spec = load_spec(SPEC)
    runner = ModelRunner(str(MODEL), spec)
    assert 0.0 <= runner.smoke_check() < spec.threshold
    assert list(spec.names) == train.NAMES


def test_model_has_one_float_input_and_a_probability_tensor():
    model = onnx.load(str(MODEL))
    onnx.checker.check_model(model)
    (graph_input,) = model.graph.input
    assert graph_input.name == "features"
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph_input.type.tensor_type.shape.dim[1].dim_value == len(train.NAMES)
    outputs = {o.name: o for o in model.graph.output}
    probabilities = outputs[json.loads(SPEC.read_text())["output_name"]]
    assert probabilities.type.HasField("tensor_type")  # not a ZipMap sequence of maps


def test_spec_vocabularies_are_the_training_encoding():
    spec = json.loads(SPEC.read_text())
    for entry in spec["features"]:
        if entry["type"] == "categorical":
            assert entry["vocabulary"] == train.VOCABULARIES[entry["name"]]
            assert entry["vocabulary"][-1] == entry["default_bucket"]


def test_build_row_reproduces_the_training_rows():
    """A payload written from a training row encodes back to that row."""
    spec = load_spec(SPEC)
    X, _ = train.generate_transactions(300, seed=3)
    out = np.empty(len(spec), dtype=np.float32)
    for row in X:
        spec.build_row(payload_of(row, spec.raw), out)
        assert out.tolist() == row.tolist()


def payload_of(row: np.ndarray, spec: dict) -> dict:
    payload: dict = {"features": {}}
    for value, entry in zip(row.tolist(), spec["features"]):
        if entry["type"] == "categorical":
            value = entry["vocabulary"][int(value)]
        elif entry.get("integer"):
            value = int(value)
        *parents, key = entry["source"].split(".")
        (payload["features"] if parents else payload)[key] = value
    return payload


def test_generated_data_has_a_plausible_fraud_rate():
    _, y = train.generate_transactions(20_000)
    assert 0.02 <= y.mean() <= 0.05


@needs_training_stack
def test_retraining_is_deterministic(tmp_path):
    first = train.train(tmp_path / "a", n_rows=20_000)
    second = train.train(tmp_path / "b", n_rows=20_000)
    assert first.model_path.read_bytes() == second.model_path.read_bytes()
    assert first.spec_path.read_bytes() == second.spec_path.read_bytes()
    assert first.auc > 0.85
    assert first.onnx_gap < 1e-4
    spec = load_spec(first.spec_path)
    assert ModelRunner(str(first.model_path), spec).smoke_check() < spec.threshold


@needs_training_stack
def test_committed_files_are_what_train_produces(tmp_path):
    import skl2onnx

    if onnx.load(str(MODEL)).producer_version != skl2onnx.__version__:
        pytest.skip("the committed model was exported by another skl2onnx version")
    report = train.train(tmp_path)
    assert report.model_path.read_bytes() == MODEL.read_bytes()
    assert report.spec_path.read_bytes() == SPEC.read_bytes()
