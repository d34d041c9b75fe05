"""The worker side of a generation swap (app/store/swap.py) over a real control block and real models."""

from __future__ import annotations

import os
import shutil
import uuid

import numpy as np
import pytest

from app.scoring.features import FeatureSpec
from app.store.shared_weights import split_model
from app.store.swap import LiveModelTable
from shm.control import ControlBlock, ModelSlot, ProductEntry
from tests.fixtures.models import build_dense_model, demo_spec, write_spec
from workers.bootstrap import demo_files

PRODUCT = "fraud_score"


@pytest.fixture
def control(tmp_path):
    """The supervisor's handle: creates the block, publishes; unlinked afterwards."""
    block = ControlBlock.create("control", directory=str(tmp_path), max_products=4)
    try:
        yield block
    finally:
        block.close()
        block.unlink()


@pytest.fixture
def reader(control):
    """A worker's read-only handle on the same block."""
    block = ControlBlock.attach(control.segment.name, os.path.dirname(control.segment.path),
                                readonly=True)
    try:
        yield block
    finally:
        block.close()


@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    """A tree model, a dense model, a dense model's shared form, garbage, and their spec."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "in-use").mkdir()
    paths = {"tree": str(folder / "tree.onnx"), "dense": str(folder / "dense.onnx"),
             "garbage": str(folder / "garbage.onnx")}
    shutil.copyfile(demo_files()[0], paths["tree"])
    build_dense_model(paths["dense"], hidden=256)
    shared = str(folder / "shared.onnx")
    build_dense_model(shared, hidden=256, seed=7)
    paths["shared"] = split_model(shared)
    with open(paths["garbage"], "wb") as handle:
        handle.write(os.urandom(1000))
    paths["spec"] = write_spec(str(folder), demo_spec())
    paths["in_use"] = str(folder / "in-use")
    return paths


def slot(path: str, spec_path: str, model_id: str | None = None, threshold: float = 0.5,
         version: str = "v1") -> ModelSlot:
    return ModelSlot(model_id=model_id or str(uuid.uuid4()), version=version, path=path,
                     spec_path=spec_path, threshold=threshold, loaded_at=1_790_000_000.5)


def publish(control: ControlBlock, **slots: ModelSlot | None) -> int:
    return control.publish({product: ProductEntry(product, production)
                            for product, production in slots.items()})


def row() -> np.ndarray:
    return FeatureSpec.from_dict(demo_spec()).baseline_row()


def recorded(files: dict[str, str]) -> set[str]:
    with open(os.path.join(files["in_use"], str(os.getpid())), encoding="utf-8") as handle:
        return {line.strip() for line in handle}


def test_before_the_first_generation_nothing_serves(reader):
    live = LiveModelTable(reader)
    assert live.get(PRODUCT) is None
    assert live.generation() is None and live.waiting_reason()


def test_next_request_after_a_publish_serves_the_new_model(control, reader, files):
    first = slot(files["tree"], files["spec"])
    publish(control, fraud_score=first)
    live = LiveModelTable(reader, files["in_use"])
    in_flight = live.get(PRODUCT)
    assert in_flight.model_id == first.model_id and live.generation() == 1
    second = slot(files["dense"], files["spec"])
    publish(control, fraud_score=second)
    assert live.get(PRODUCT).model_id == second.model_id and live.generation() == 2
    # The request that held the old model finishes on it: its session still scores.
    assert 0.0 <= in_flight.runner.score_row(row()) <= 1.0


def test_an_unchanged_model_keeps_its_session_across_generations(control, reader, files):
    tree = slot(files["tree"], files["spec"])
    publish(control, fraud_score=tree)
    live = LiveModelTable(reader)
    before = live.get(PRODUCT)
    publish(control, fraud_score=tree, chargeback=slot(files["dense"], files["spec"]))
    assert live.get(PRODUCT) is before
    assert live.get("chargeback") is not None


def test_a_new_threshold_keeps_the_session_and_leaves_the_old_object_alone(control, reader, files):
    tree = slot(files["tree"], files["spec"], threshold=0.5)
    publish(control, fraud_score=tree)
    live = LiveModelTable(reader)
    before = live.get(PRODUCT)
    publish(control, fraud_score=slot(tree.path, tree.spec_path, tree.model_id, threshold=0.9))
    after = live.get(PRODUCT)
    assert after is not before and after.runner is before.runner
    assert (before.threshold, after.threshold) == (0.5, 0.9)


def test_a_model_that_fails_in_the_worker_leaves_the_previous_one_serving(control, reader, files):
    good = slot(files["tree"], files["spec"])
    publish(control, fraud_score=good)
    live = LiveModelTable(reader)
    publish(control, fraud_score=slot(files["garbage"], files["spec"]))
    assert live.get(PRODUCT).model_id == good.model_id
    assert PRODUCT in live.load_errors
    assert live.generation() == 2 and live.missing_products() == []  # not retried per request


def test_a_product_without_a_live_model_is_missing(control, reader, files):
    publish(control, fraud_score=slot(files["tree"], files["spec"]), chargeback=None)
    live = LiveModelTable(reader)
    assert live.expected_products == ["chargeback", PRODUCT]
    assert live.missing_products() == ["chargeback"]


def test_shared_form_is_served_from_the_mapped_weights(control, reader, files):
    publish(control, fraud_score=slot(files["shared"], files["spec"]))
    live = LiveModelTable(reader)
    assert 0.0 <= live.get(PRODUCT).runner.score_row(row()) <= 1.0
    with open("/proc/self/maps", encoding="ascii", errors="replace") as handle:
        assert "shared.weights" in handle.read()


def test_the_in_use_list_names_the_files_held(control, reader, files):
    publish(control, fraud_score=slot(files["tree"], files["spec"]))
    live = LiveModelTable(reader, files["in_use"])
    assert recorded(files) == {"tree.onnx", "model.spec.json"}
    publish(control, fraud_score=slot(files["shared"], files["spec"]))
    live.get(PRODUCT)
    assert recorded(files) == {"shared.graph.onnx", "model.spec.json"}


def test_a_publish_while_the_worker_reads_the_table_makes_it_read_again(control, reader, files):
    """The worker lists the files, then re-reads the generation: a publish in between is not missed."""
    tree, dense = slot(files["tree"], files["spec"]), slot(files["dense"], files["spec"])
    publish(control, fraud_score=tree)
    real_read_table = reader.read_table
    reads = []

    def read_then_supervisor_publishes():
        result = real_read_table()
        reads.append(result[0])
        if len(reads) == 1:
            publish(control, fraud_score=dense)  # lands after the read, before the re-check
        return result

    reader.read_table = read_then_supervisor_publishes
    live = LiveModelTable(reader, files["in_use"])
    assert reads == [1, 2]
    assert live.generation() == 2 and live.get(PRODUCT).model_id == dense.model_id
    assert recorded(files) == {"dense.onnx", "model.spec.json"}


def test_loaded_at_is_when_the_supervisor_put_the_model_live(control, reader, files):
    tree = slot(files["tree"], files["spec"])
    publish(control, fraud_score=tree)
    live = LiveModelTable(reader)
    assert live.loaded_at(tree.model_id) == "2026-09-21T14:13:20.500Z"
    assert live.loaded_at(str(uuid.uuid4())) is None
