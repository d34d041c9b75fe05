"""GET /v1/infer/{prediction_id}: one prediction of the log, even one made a moment ago.

A prediction that has not reached Postgres yet is found where it waits (this or another worker's
ring, an overflow file, the writer's spool: ``PredictionLog.find_unwritten``); only then is
Postgres asked, through the worker's pool. A UUIDv7 id names the moment it was made, and its row's
created_at follows within the request: the query bounds created_at to ``CREATED_AT_WINDOW`` around it, so
Postgres reads one day partition (two within minutes of midnight). An id of a day archived to the
bucket answers 410 PREDICTION_ARCHIVED naming the day and the object. A malformed id is 400, an
unknown one 404 NOT_FOUND, Postgres unreachable 503.
"""

from __future__ import annotations

import uuid

from app.db import Database
from app.errors import InvalidRequest, NotFound, PredictionArchived
from app.ids import id_time_window
from app.predlog.log import created_at_text

COLUMNS = ("prediction_id::text, model_id::text, event_id, product, score, decision, explanation, "
           "latency_ms, model_role, cached, request_id, created_at, trace_id")
SELECT_PREDICTION = (f"SELECT {COLUMNS} FROM siramodel_predictions "
                     "WHERE prediction_id = %s AND created_at >= %s AND created_at < %s")
SELECT_PREDICTION_ANY_TIME = f"SELECT {COLUMNS} FROM siramodel_predictions WHERE prediction_id = %s"  # uuid4 ids
# (day, store, object key) of the given days that went to the bucket (app/predlog/archive.py) and stayed
ARCHIVED_DAYS_SQL = ("SELECT day, store, object_key FROM sira_prediction_archives "
                     "WHERE day = ANY(%s) AND restored_at IS NULL ORDER BY day, part")


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
            await self.refuse_archived(prediction_id)
            raise NotFound(f"no prediction {prediction_id}", {"prediction_id": prediction_id})
        resp.media = prediction_json(row)

    async def find_in_database(self, prediction_id: str) -> dict | None:
        window = id_time_window(prediction_id)
        async with self.database.connection() as conn:
            if window is None:
                cursor = await conn.execute(SELECT_PREDICTION_ANY_TIME, (prediction_id,))
            else:
                cursor = await conn.execute(SELECT_PREDICTION, (prediction_id, *window))
            row = await cursor.fetchone()
        if row is None:
            return None
        columns = ("prediction_id", "model_id", "event_id", "product", "score", "decision",
                   "explanation", "latency_ms", "model_role", "cached", "request_id", "created_at", "trace_id")
        return dict(zip(columns, row))

    async def refuse_archived(self, prediction_id: str) -> None:
        """PredictionArchived when the id's day was archived (and not restored); else nothing."""
        window = id_time_window(prediction_id)
        if window is None:
            return
        days = sorted({window[0].date(), window[1].date()})
        async with self.database.connection() as conn:
            cursor = await conn.execute(ARCHIVED_DAYS_SQL, (days,))
            archived = await cursor.fetchall()
        if archived:
            day = archived[0][0]
            objects = [f"{store}/{object_key}" for found_day, store, object_key in archived if found_day == day]
            raise PredictionArchived(
                f"prediction {prediction_id} was archived with its day {day} to {objects[0]}"
                + (f" and {len(objects) - 1} later part(s)" if len(objects) > 1 else "")
                + f"; `sira predictions restore {day}` brings the day back",
                {"prediction_id": prediction_id, "day": day.isoformat(), "object": objects[0], "objects": objects})
