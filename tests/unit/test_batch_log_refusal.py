"""A prediction log that refuses some appends, in process: each refused event is a 503 of its own.

The real infer resources on the demo model, through Falcon, with a log that raises the 503 that
``PredictionLog._spill`` raises when neither the ring nor the overflow file can keep a record, and
a dict standing in for the shared cache. The answer may hold a score only for what the log kept.
"""

from __future__ import annotations

import uuid

import falcon.asgi
import falcon.testing
import pytest

from app.errors import ServiceUnavailable
from app.http.infer_batch import shadows_of_kept_events
from app.http.requests import parse_infer_request
from app.scoring.models import ModelTable
from tests.fixtures.infer_app import demo_models, infer_client

ERROR_FIELDS = {"error_code", "message", "request_id", "timestamp", "details"}


class RefusingLog:
    """Keeps every prediction except those of the event ids in ``refused`` (503, as a failed spill)."""

    def __init__(self) -> None:
        self.refused: set[str] = set()
        self.kept: dict[str, str] = {}  # prediction_id -> event_id

    def append(self, body: dict, event_id: str, product: str, request_id: str | None,
               trace_id: str | None = None) -> None:
        if event_id in self.refused:
            raise ServiceUnavailable("the prediction log cannot keep this prediction now",
                                     {"retry_after_s": 1}, {"Retry-After": "1"})
        self.kept[body["prediction_id"]] = event_id


class DictCache:
    """The PredictionCache calls the infer resources make, on a dict."""

    def __init__(self) -> None:
        self.entries: dict[bytes, tuple[float, list]] = {}

    def key(self, model, row) -> bytes:
        return model.model_id.encode() + row.tobytes()

    def get(self, key: bytes, need_explanation: bool):
        return self.entries.get(key)

    def put(self, key: bytes, score: float, explanation: list, explained: bool) -> bool:
        self.entries[key] = (score, explanation)
        return True


@pytest.fixture(scope="module")
def models() -> ModelTable:
    return demo_models()


@pytest.fixture
def log() -> RefusingLog:
    return RefusingLog()


@pytest.fixture
def cache() -> DictCache:
    return DictCache()


@pytest.fixture
def client(models, log, cache) -> falcon.testing.TestClient:
    """Both infer routes with the app's media handlers and error renderer, on ``log`` and ``cache``."""
    return infer_client(models, 64, cache, log)


def event(amount: float) -> dict:
    """A payment whose amount sets its cache key apart from the others'."""
    return {"event_id": str(uuid.uuid4()), "product": "fraud_score",
            "payload": {"amount": amount, "currency": "USD", "country": "US", "payment_method": "card"}}


def assert_refused_entry(entry: dict, index: int) -> None:
    assert set(entry) == ERROR_FIELDS, entry
    assert entry["error_code"] == "SERVICE_UNAVAILABLE"
    assert entry["details"] == {"retry_after_s": 1, "index": index}


@pytest.mark.parametrize("refused", [{1, 4, 7}, {0}, {7}, {0, 1, 2, 3, 4, 5, 6, 7}, set()])
def test_each_refused_event_gets_its_own_503_and_the_others_their_logged_scores(client, log, refused):
    events = [event(10.0 + i) for i in range(8)]
    log.refused = {events[i]["event_id"] for i in refused}
    response = client.simulate_post("/v1/infer/batch", json={"events": events})
    assert response.status_code == 200, response.text
    results = response.json["results"]
    for index, entry in enumerate(results):
        if index in refused:
            assert_refused_entry(entry, index)
            assert "score" not in entry and "prediction_id" not in entry
        else:
            assert log.kept[entry["prediction_id"]] == events[index]["event_id"]
    assert len(log.kept) == len(events) - len(refused)


def test_a_refused_events_score_is_not_cached_for_a_later_request(client, log, cache):
    events = [event(20.0 + i) for i in range(4)]
    log.refused = {events[2]["event_id"]}
    first = client.simulate_post("/v1/infer/batch", json={"events": events}).json["results"]
    assert len(cache.entries) == 3
    log.refused = set()
    again = client.simulate_post("/v1/infer/batch", json={"events": events}).json["results"]
    assert [entry["cached"] for entry in again] == [True, True, False, True]
    assert "prediction_id" not in first[2]
    assert {entry["prediction_id"] for entry in first + again if "prediction_id" in entry} == set(log.kept)


def test_a_single_event_the_log_refuses_is_a_503_in_the_error_schema(client, log):
    request = event(30.0)
    log.refused = {request["event_id"]}
    response = client.simulate_post("/v1/infer", json=request)
    assert response.status_code == 503, response.text
    assert set(response.json) == ERROR_FIELDS and response.json["error_code"] == "SERVICE_UNAVAILABLE"
    assert response.headers["Retry-After"] == "1"
    assert not log.kept


def test_the_shadows_of_refused_events_are_dropped():
    events = [event(40.0 + i) for i in range(3)]
    shadows = [("shadow", parse_infer_request(item)) for item in events]
    kept = shadows_of_kept_events(shadows, events, [1])
    assert [request.event_id for _, request in kept] == [events[0]["event_id"], events[2]["event_id"]]
