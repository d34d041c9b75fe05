"""Outcomes: what turned out to be fraud, told about a payment event long after it was scored.

An outcome names its event by a prediction id or by ``product`` and ``event_id``, and says
``label`` (fraud or legit), ``source`` (chargeback, analyst... a lower-case word) and, optionally,
``observed_at``. It is kept per event (migrations/005: every prediction of the event, production,
canary or shadow, is judged by it), append-only: a correction is a new outcome and the latest
wins. The same outcome twice is kept once.

Every item is answered on its own: ``kept``, ``duplicate``, or an error entry in the error schema
(400 for an item that is wrong, 404 for an event no prediction was logged for), and the good items
are kept whatever the others did. ``POST /v1/outcomes`` (app/http/outcomes_api.py) and
``sira outcomes load`` (workers/outcomes_cli.py) both go through ``record_outcomes``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import uuid
from typing import Any

import psycopg

from app.errors import InvalidRequest, NotFound, error_body
from app.ids import EVENT_ID_MAX, PRODUCT_PATTERN, id_time_window, is_event_id

LABELS = ("fraud", "legit")
SOURCE = re.compile(r"[a-z][a-z0-9_]{0,63}")
CLOCK_SKEW = dt.timedelta(minutes=5)  # an observed_at later than now by more than this is refused
FIELDS = frozenset({"prediction_id", "product", "event_id", "label", "source", "observed_at"})

FIND_PREDICTION_SQL = ("SELECT product, event_id FROM siramodel_predictions WHERE prediction_id = %s "
                       "AND created_at >= %s AND created_at < %s LIMIT 1")
FIND_PREDICTION_ANY_TIME_SQL = "SELECT product, event_id FROM siramodel_predictions WHERE prediction_id = %s LIMIT 1"
FIRST_PREDICTION_SQL = "SELECT min(created_at) FROM siramodel_predictions WHERE product = %s AND event_id = %s"
INSERT_SQL = ("INSERT INTO sira_prediction_outcomes (product, event_id, label, source, observed_at, predicted_at) "
              "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1")


@dataclasses.dataclass(frozen=True)
class OutcomeItem:
    """One item as given: its event named by ``prediction_id``, or by ``product`` and ``event_id``."""

    label: str
    source: str
    observed_at: dt.datetime | None
    prediction_id: str | None = None
    product: str | None = None
    event_id: str | None = None


def parse_item(item: Any, now: dt.datetime) -> OutcomeItem:
    """The item checked; InvalidRequest naming the field it is wrong in."""
    if not isinstance(item, dict):
        raise InvalidRequest("an outcome must be a JSON object", {"field": "outcomes[]"})
    unknown = sorted(set(item) - FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}", {"field": unknown[0]})
    label, source = item.get("label"), item.get("source")
    if label not in LABELS:
        raise InvalidRequest(f"label must be one of {', '.join(LABELS)}, got {label!r}", {"field": "label"})
    if not isinstance(source, str) or SOURCE.fullmatch(source) is None:
        raise InvalidRequest("source must be a lower-case word such as chargeback or analyst", {"field": "source"})
    observed_at = _observed_at(item.get("observed_at"), now)
    prediction_id, product, event_id = item.get("prediction_id"), item.get("product"), item.get("event_id")
    if product is not None and (not isinstance(product, str) or PRODUCT_PATTERN.fullmatch(product) is None):
        raise InvalidRequest("product must match [a-z][a-z0-9_]{0,63}", {"field": "product"})
    if prediction_id is not None:
        if event_id is not None:
            raise InvalidRequest("give prediction_id, or product and event_id, not both", {"field": "event_id"})
        return OutcomeItem(label, source, observed_at, prediction_id=_canonical_uuid(prediction_id), product=product)
    if product is None or not is_event_id(event_id):
        raise InvalidRequest(f"an outcome names its event: prediction_id, or product and event_id (1 to "
                             f"{EVENT_ID_MAX} printable characters)", {"field": "prediction_id"})
    return OutcomeItem(label, source, observed_at, product=product, event_id=event_id)


def _observed_at(value: Any, now: dt.datetime) -> dt.datetime | None:
    if value is None:
        return None
    try:
        when = dt.datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise InvalidRequest("observed_at must be an ISO 8601 time with its offset, such as 2026-12-01T10:00:00Z",
                             {"field": "observed_at"})
    if when > now + CLOCK_SKEW:
        raise InvalidRequest(f"observed_at {value} is in the future", {"field": "observed_at"})
    return when


def _canonical_uuid(value: Any) -> str:
    try:
        if isinstance(value, str) and len(value) == 36:
            return str(uuid.UUID(value))
    except ValueError:
        pass
    raise InvalidRequest("prediction_id must be a UUID", {"field": "prediction_id"})


async def record_outcomes(conn: psycopg.AsyncConnection, items: list[Any], request_id: str | None,
                          now: dt.datetime | None = None) -> list[dict]:
    """Check, resolve and keep each item, each in its own statement; one answer per item, in order."""
    now = now or dt.datetime.now(dt.UTC)
    answers = []
    for index, item in enumerate(items):
        try:
            outcome = parse_item(item, now)
            product, event_id, predicted_at = await _resolve(conn, outcome)
            cursor = await conn.execute(INSERT_SQL, (product, event_id, outcome.label, outcome.source,
                                                     outcome.observed_at, predicted_at))
            kept = await cursor.fetchone() is not None
            answers.append({"index": index, "status": "kept" if kept else "duplicate",
                            "product": product, "event_id": event_id})
        except (InvalidRequest, NotFound) as exc:
            answers.append({"index": index, "status": exc.status,
                            **error_body(exc.code, exc.message, request_id, {**exc.details, "index": index})})
    return answers


async def _resolve(conn: psycopg.AsyncConnection, outcome: OutcomeItem) -> tuple[str, str, dt.datetime]:
    """The event's product, id and first prediction time; NotFound when no prediction of it was logged."""
    if outcome.prediction_id is not None:
        window = id_time_window(outcome.prediction_id)
        if window is None:
            cursor = await conn.execute(FIND_PREDICTION_ANY_TIME_SQL, (outcome.prediction_id,))
        else:
            cursor = await conn.execute(FIND_PREDICTION_SQL, (outcome.prediction_id, *window))
        found = await cursor.fetchone()
        if found is None:
            raise NotFound(f"no prediction {outcome.prediction_id} is logged", {"prediction_id": outcome.prediction_id})
        product, event_id = found
        if outcome.product is not None and outcome.product != product:
            raise InvalidRequest(f"prediction {outcome.prediction_id} is of product {product!r}, not "
                                 f"{outcome.product!r}", {"field": "product"})
    else:
        product, event_id = outcome.product, outcome.event_id
    cursor = await conn.execute(FIRST_PREDICTION_SQL, (product, event_id))
    (predicted_at,) = await cursor.fetchone()
    if predicted_at is None:
        raise NotFound(f"no prediction of event {event_id!r} of {product!r} is logged",
                       {"product": product, "event_id": event_id})
    return product, event_id, predicted_at
