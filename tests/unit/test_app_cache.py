"""app/scoring/cache.py on the demo model: canonical keys, value round trip, the explanation rule, lifecycle."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from app.config import ModelFile
from app.scoring.cache import VALUE_SIZE, PredictionCache, cache_segment_name, shared_cache
from app.scoring.models import ServingModel
from shm.cache import ShmCache
from shm.segment import SegmentError

DEMO = Path(__file__).resolve().parents[2] / "workers" / "demo"
SPEC = json.loads((DEMO / "fraud_score.spec.json").read_text())
MODEL_FILE = ModelFile(model_id="11111111-1111-1111-1111-111111111111", name="fraud_score",
                       version="1.0.0", product="fraud_score", path=str(DEMO / "fraud_score.onnx"),
                       spec=copy.deepcopy(SPEC), threshold=SPEC["threshold"])


def payload(**changes) -> dict:
    """A typical payment; keys of `changes` found at the top level replace it, others go in features."""
    body = {"amount": 150.5, "currency": "USD", "country": "US", "payment_method": "card",
            "features": {"hour_of_day": 14, "account_age_days": 700, "txn_count_24h": 2}}
    for key, value in changes.items():
        if key in body:
            body[key] = value
        else:
            body["features"][key] = value
    return body


@pytest.fixture(scope="module")
def model() -> ServingModel:
    return ServingModel(MODEL_FILE)


@pytest.fixture
def cache(tmp_path):
    """A PredictionCache over a private segment (tmp_path stands in for /dev/shm)."""
    shm = ShmCache.create("sira-test-appcache", 256, 60_000, value_size=VALUE_SIZE,
                          directory=str(tmp_path))
    try:
        yield PredictionCache(shm)
    finally:
        shm.close()
        shm.unlink()


def row_of(model: ServingModel, body: dict) -> np.ndarray:
    row = np.empty(len(model.spec), dtype=np.float32)
    model.spec.build_row(body, row)
    return row


def variant(model: ServingModel, **changes) -> ServingModel:
    """The same ONNX file registered under another identity."""
    return ServingModel(dataclasses.replace(MODEL_FILE, **changes))


def test_key_is_sixteen_bytes_and_stable(cache, model):
    row = row_of(model, payload())
    key = cache.key(model, row)
    assert len(key) == 16
    assert cache.key(model, row.copy()) == key
    assert PredictionCache(cache.shm).key(model, row) == key, "another worker computes the same key"


@pytest.mark.parametrize("first, second", [
    (payload(currency="USD"), payload(currency="usd")),
    (payload(payment_method="CARD"), payload(payment_method="card")),
    (payload(), {**payload(), "features": {**payload()["features"], "is_weekend": 0}}),
    (payload(), {**payload(), "unused_field": "ignored by the spec"}),
    (payload(amount=150.5), payload(amount=150.50000000001)),  # one float32
    (payload(currency="XYZ"), payload(currency="ABC")),  # both the default bucket
])
def test_payloads_building_the_same_row_share_a_key(cache, model, first, second):
    assert cache.key(model, row_of(model, first)) == cache.key(model, row_of(model, second))


@pytest.mark.parametrize("change", [
    {"amount": 150.75}, {"currency": "EUR"}, {"hour_of_day": 3}, {"is_new_device": 1},
])
def test_a_different_feature_gives_a_different_key(cache, model, change):
    assert cache.key(model, row_of(model, payload())) != cache.key(model, row_of(model, payload(**change)))


@pytest.mark.parametrize("identity", [
    {"model_id": "22222222-2222-2222-2222-222222222222"},
    {"role": "canary"},
    {"version": "1.0.1"},
])
def test_another_model_identity_gives_another_key(cache, model, identity):
    row = row_of(model, payload())
    assert cache.key(variant(model, **identity), row) != cache.key(model, row)


def test_another_product_gives_another_key(cache, model):
    other_spec = dict(copy.deepcopy(SPEC), product="chargeback_risk")
    other = variant(model, product="chargeback_risk", spec=other_spec)
    row = row_of(model, payload())
    assert cache.key(other, row) != cache.key(model, row)


def test_a_role_change_of_one_model_id_is_seen(cache, model):
    """The prefix memo holds several identities: a promoted canary gets its own keys."""
    row = row_of(model, payload())
    canary = variant(model, role="canary")
    assert cache.key(canary, row) != cache.key(model, row)
    assert cache.key(model, row) != cache.key(canary, row)


def test_score_and_explanation_round_trip_exactly(cache, model):
    row = row_of(model, payload(amount=4800.0, payment_method="crypto", account_age_days=1))
    score, explanation = model.runner.explain_row(row)
    key = cache.key(model, row)
    assert cache.get(key, True) is None
    assert cache.put(key, score, explanation, True)
    assert cache.get(key, True) == (score, explanation)
    assert cache.get(key, False) == (score, []), "a full entry also answers without explanation"
    assert (cache.hits, cache.misses, cache.stored) == (2, 1, 1)


def test_an_entry_without_explanation_misses_a_request_that_wants_one(cache, model):
    row = row_of(model, payload())
    key = cache.key(model, row)
    score = model.runner.score_row(row)
    cache.put(key, score, [], False)
    assert cache.get(key, False) == (score, [])
    assert cache.get(key, True) is None
    score, explanation = model.runner.explain_row(row)
    cache.put(key, score, explanation, True)
    assert cache.get(key, True) == (score, explanation)
    assert (cache.hits, cache.misses) == (2, 1)


def test_an_answer_larger_than_a_slot_is_not_stored(cache, model):
    key = cache.key(model, row_of(model, payload()))
    huge = [{"feature": "f" * 200, "importance": 0.5}] * 3
    assert not cache.put(key, 0.5, huge, True)
    assert cache.get(key, True) is None
    assert cache.too_large == 1


def test_segment_name_is_none_when_the_cache_is_off():
    assert cache_segment_name("123_ab", 0) is None
    assert cache_segment_name("123_ab", 10) == "sira-123_ab-cache"


def test_shared_cache_is_created_attached_and_unlinked():
    name = cache_segment_name(f"t{uuid.uuid4().hex[:12]}", 100)
    path = os.path.join("/dev/shm", name)
    with shared_cache(name, 100, 5_000) as shm:
        assert os.path.exists(path) and shm.ttl_ms == 5_000 and shm.capacity >= 100
        worker = PredictionCache.attach(name)
        try:
            worker.shm.put(b"k" * 16, b"v")
            assert shm.get(b"k" * 16) == b"v"
        finally:
            worker.close()
    assert not os.path.exists(path)
    with pytest.raises(SegmentError):
        PredictionCache.attach(name)


def test_shared_cache_off_creates_nothing():
    with shared_cache(None, 0, 5_000) as shm:
        assert shm is None


def test_a_forked_child_leaving_shared_cache_does_not_unlink():
    """gunicorn workers unwind the master's stack on exit: only the master may remove the file."""
    name = cache_segment_name(f"t{uuid.uuid4().hex[:12]}", 100)
    path = os.path.join("/dev/shm", name)
    pid = None
    try:
        with shared_cache(name, 100, 5_000):
            pid = os.fork()
            if pid == 0:
                raise SystemExit(0)  # the child unwinds through the with block, as a worker does
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, "the child saw the segment vanish"
            assert os.path.exists(path)
    except SystemExit:
        if pid == 0:
            os._exit(0 if os.path.exists(path) else 1)
        raise
    finally:
        if pid == 0:
            os._exit(2)  # the child never returns into pytest
    assert not os.path.exists(path)
