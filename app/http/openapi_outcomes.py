"""POST /v1/outcomes's part of the OpenAPI document (app/http/openapi.py): its operation and schemas."""

from __future__ import annotations

from app.http.openapi_schemas import error_response, json_response, ref
from app.ids import EVENT_ID_MAX, PRODUCT_PATTERN
from app.outcomes import LABELS, SOURCE

ROLES_OUTCOMES = "sira_service, fraud_analyst (or the internal service token)"


def op_post_outcomes() -> dict:
    return {
        "operationId": "postOutcomes", "tags": ["outcomes"], "summary": "What turned out to be fraud",
        "description": f"Roles: {ROLES_OUTCOMES}. Labels of payment events (chargebacks, analysts' reviews), "
                       "each naming its event by prediction_id or by product and event_id. Answered item by "
                       "item: kept, duplicate (the same outcome was kept before), or the item's error with "
                       "its status (400 a wrong item, 404 an event no prediction was logged for); the good "
                       "items are kept whatever the others did. The latest outcome of an event wins.",
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": ref("OutcomesRequest"),
            "examples": {"chargeback": {"value": {"outcomes": [
                {"product": "fraud_score", "event_id": "evt-123", "label": "fraud", "source": "chargeback",
                 "observed_at": "2026-11-30T09:00:00Z"}]}}}}}},
        "responses": {
            "200": json_response("One answer per outcome, in order, and the counts.", ref("OutcomesResponse")),
            "400": error_response("INVALID_REQUEST: not {\"outcomes\": [...]}, none, or more than "
                                  "SIRA_OUTCOMES_BATCH_MAX."),
            "401": error_response("UNAUTHORIZED: no token, or one that is invalid or expired."),
            "403": error_response("FORBIDDEN: the token's role may not post outcomes."),
            "411": error_response("INVALID_REQUEST: no Content-Length."),
            "413": error_response("PAYLOAD_TOO_LARGE: a body too large for SIRA_OUTCOMES_BATCH_MAX outcomes."),
            "415": error_response("UNSUPPORTED_MEDIA_TYPE: the body must be application/json."),
            "429": error_response("RATE_LIMIT_EXCEEDED: over SIRA_RATE_LIMITS; Retry-After says when to retry."),
            "503": error_response("SERVICE_UNAVAILABLE: Postgres cannot be reached."),
        },
    }


def outcomes_schemas(batch_max: int) -> dict:
    product = {"type": "string", "pattern": PRODUCT_PATTERN.pattern.join(("^", "$"))}
    return {
        "OutcomesRequest": {
            "type": "object", "required": ["outcomes"], "additionalProperties": False,
            "properties": {"outcomes": {
                "type": "array", "minItems": 1, "maxItems": batch_max,
                # Not ref("Outcome"): an item is checked on its own, and a wrong one is answered in its
                # entry (400) while the rest are kept, so the request itself is not wrong.
                "items": {"description": "An Outcome (#/components/schemas/Outcome); an item that is not one "
                                         "gets a 400 entry of its own."}}},
        },
        "Outcome": {
            "type": "object", "required": ["label", "source"], "additionalProperties": False,
            "description": "Its event: prediction_id, or product and event_id (a prediction_id with a product "
                           "must be of that product).",
            "properties": {
                "prediction_id": {"type": "string", "format": "uuid"},
                "product": product,
                "event_id": {"type": "string", "minLength": 1, "maxLength": EVENT_ID_MAX},
                "label": {"type": "string", "enum": list(LABELS)},
                "source": {"type": "string", "pattern": SOURCE.pattern.join(("^", "$")),
                           "description": "Where the label comes from, such as chargeback or analyst."},
                "observed_at": {"type": "string", "format": "date-time",
                                "description": "When the outcome was known (not in the future); a correction "
                                               "with a later observed_at wins."},
            },
        },
        "OutcomesResponse": {
            "type": "object", "required": ["results", "kept", "duplicate", "errors"],
            "properties": {
                "results": {"type": "array", "items": {
                    "type": "object", "required": ["index", "status"],
                    "description": "kept or duplicate with the event's product and event_id, or the item's "
                                   "error in the error schema with its HTTP status.",
                    "properties": {"index": {"type": "integer", "minimum": 0},
                                   "status": {"oneOf": [{"type": "string", "enum": ["kept", "duplicate"]},
                                                        {"type": "integer", "enum": [400, 404]}]},
                                   "product": {"type": "string"}, "event_id": {"type": "string"},
                                   "error_code": {"type": "string"}, "message": {"type": "string"}}}},
                "kept": {"type": "integer", "minimum": 0},
                "duplicate": {"type": "integer", "minimum": 0},
                "errors": {"type": "integer", "minimum": 0},
            },
        },
    }
