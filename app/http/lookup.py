"""GET /v1/infer/{prediction_id}: one prediction of the log, even one made a moment ago.

A prediction that has not reached Postgres yet is found where it waits (this or another worker's
ring, an overflow file, the writer's spool: ``PredictionLog.find_unwritten``); only then is
Postgres asked, through the worker's pool. A malformed id is 400, an unknown one 404 NOT_FOUND,
Postgres unreachable 503.
"""

from __future__ import annotations

import uuid

from app.db import Database
from app.errors import InvalidRequest, NotFound
from app.predlog.log import created_at_text

SELECT_PREDICTION = (
    "SELECT prediction_id::text, model_id::text, event_id, product, score, decision, explanation, "
    "latency_ms, model_role, cached, request_id, created_at, trace_id "
    "FROM siramodel_predictions WHERE prediction_id = %s")


def canonical_prediction_id(value: str) -> str:
    """The id as the server writes it (lower-case uuid with hyphens); InvalidRequest otherwise."""
    try:
        if len(value) == 36:
            return str(uuid.UUID(value))
    except ValueError:
        pass
    raise InvalidRequest("prediction_id must be a UUID such as 987f6543-e21c-34d5-b678-537625285111",
                         {"field": "prediction_id"})


def prediction_json(row: dict) -> dict:
    """The seed's shape of one logged prediction, plus its cached flag, request id and trace id."""
    return {
        "prediction_id": row["prediction_id"],
        "model_id": row["model_id"],
        "event_id": row["event_id"],
        "product": row["product"],
        "score": row["score"],
        "decision": row["decision"],
        "explain": row["explanation"],
        "latency_ms": row["latency_ms"],
        "model_role": row["model_role"],
        "cached": row["cached"],
        "request_id": row["request_id"],
        "created_at": created_at_text(row["created_at"]),
        "trace_id": row.get("trace_id"),  # OpenTelemetry (app/telemetry/tracing.py); null when not traced
    }


class PredictionResource:
    """Reads one prediction: the worker's log first (read your writes), then Postgres."""

    auth_actions = {"GET": "predictions:read"}

    def __init__(self, prediction_log, database: Database):
        self.prediction_log = prediction_log
        self.database = database

    async def on_get(self, req, resp, prediction_id: str):
        prediction_id = canonical_prediction_id(prediction_id)
        row = await self.prediction_log.find_unwritten(prediction_id)
        if row is None:
            row = await self.find_in_database(prediction_id)
        if row is None:
            raise NotFound(f"no prediction {prediction_id}", {"prediction_id": prediction_id})
        resp.media = prediction_json(row)

    async def find_in_database(self, prediction_id: str) -> dict | None:
        async with self.database.connection() as conn:
            cursor = await conn.execute(SELECT_PREDICTION, (prediction_id,))
            row = await cursor.fetchone()
        if row is None:
            return None
        columns = ("prediction_id", "model_id", "event_id", "product", "score", "decision",
                   "explanation", "latency_ms", "model_role", "cached", "request_id", "created_at", "trace_id")
        return dict(zip(columns, row))
