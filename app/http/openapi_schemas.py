"""The schemas of the OpenAPI document (app/http/openapi.py): requests, responses, and each served product's payload.

A product's payload schema is generated from its model's feature spec (``payload_schema``), the
same rules ``app.scoring.features.FeatureSpec.build_row`` applies; ``tests/unit/test_openapi.py`` checks
that the two accept exactly the same payloads. Those schemas, and the examples that name the
demo model's fields, are only in the document that shows feature specs (``specs`` not None): a
fraud model's inputs are what a fraudster wants to learn, so the public document has a generic
payload (app/http/openapi.py decides who gets which).
"""

from __future__ import annotations

from typing import Any

from app.errors import ApiError
from app.http.requests import TIMEOUT_MS_MAX
from app.ids import EVENT_ID_MAX, PRODUCT_PATTERN
from app.scoring.features import MAX_CATEGORY_LENGTH
from app.store.canary_config import MODES, PERCENT_MAX
from app.store.registry import STATUSES

# The part of "printable" a pattern can state portably; the `printable` format names the whole rule.
NO_CONTROL_CHARACTERS = "^[^\\x00-\\x1f\\x7f-\\x9f]+$"

# Building blocks of the operations (app/http/openapi.py, app/http/openapi_ops.py).
JSON = "application/json"
ERROR_REF = {"$ref": "#/components/schemas/Error"}
REQUEST_ID_HEADER = {"X-Request-ID": {"$ref": "#/components/headers/RequestId"}}
PUBLIC: list = []  # an operation's `security` when it needs no token

# Events of the demo model's product (workers/demo/fraud_score.spec.json): shown with the feature specs only.
EXAMPLE_PAYLOAD = {"amount": 150.5, "currency": "USD", "country": "US", "payment_method": "card",
                   "features": {"hour_of_day": 14, "is_weekend": 0}}
EXAMPLE_EVENT = {"event_id": "evt-123", "product": "fraud_score", "payload": EXAMPLE_PAYLOAD}
EXAMPLE_BATCH_EVENT = {"event_id": "evt-1", "product": "fraud_score",
                       "payload": {"amount": 12.5, "currency": "EUR", "country": "FR", "payment_method": "wallet"}}
PAYLOAD_RULE = ("The event's fields, checked against the product model's feature spec (400 "
                "FEATURE_VALIDATION_FAILED naming the field otherwise). Unknown fields are ignored.")
FEATURES_HIDDEN = (" Each served product's fields are documented to a caller with a token (any role), or to "
                   "everyone with SIRA_OPENAPI_FEATURE_SPECS=on.")
FEATURES_SHOWN = (" fraud_score needs amount, currency, country, payment_method; optional numbers go in "
                  "`features`. Each served product's schema is Payload_<product>.")


def error_response(description: str) -> dict:
    return {"description": description, "headers": REQUEST_ID_HEADER, "content": {JSON: {"schema": ERROR_REF}}}


def json_response(description: str, schema: dict) -> dict:
    return {"description": description, "headers": REQUEST_ID_HEADER, "content": {JSON: {"schema": schema}}}


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def error_codes() -> list[str]:
    """Every error_code the server can answer (app.errors and its subclasses elsewhere)."""
    codes, todo = set(), list(ApiError.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        codes.add(cls.code)
    return sorted(codes)


# -- components ----------------------------------------------------------------------------------------

def schemas(batch_max: int, specs: dict[str, Any] | None) -> dict:
    """The components; `specs` maps each served product to its model's FeatureSpec, None hides them all."""
    shown = specs is not None
    specs = specs or {}
    explanation_item = {
        "type": "object",
        "required": ["feature", "importance"],
        "additionalProperties": False,
        "properties": {
            "feature": {"type": "string"},
            "importance": {"type": "number",
                           "description": "Signed attribution in log-odds: positive pushes toward fraud."},
        },
    }
    infer_request = {
        "type": "object",
        "required": ["event_id", "product", "payload"],
        "description": "One payment event. Unknown top-level fields are ignored.",
        "properties": {
            "event_id": {"type": "string", "minLength": 1, "maxLength": EVENT_ID_MAX, "format": "printable",
                         "pattern": NO_CONTROL_CHARACTERS,
                         "description": f"The client's id of the event: 1 to {EVENT_ID_MAX} printable characters "
                                        "(Python's str.isprintable: no control, format, private-use or unassigned "
                                        "character, no separator but the space; the pattern states the control "
                                        "characters). It also picks the canary bucket, so an event always meets "
                                        "the same model."},
            "product": {"type": "string", "pattern": PRODUCT_PATTERN.pattern.join(("^", "$")),
                        "description": "Which model scores the event, e.g. fraud_score (404 MODEL_NOT_FOUND when "
                                       "no model serves it)."},
            "payload": {"type": "object", "description": PAYLOAD_RULE + (FEATURES_SHOWN if shown else FEATURES_HIDDEN),
                        **({"examples": [EXAMPLE_PAYLOAD]} if shown else {})},
            "options": {
                "type": ["object", "null"],
                "additionalProperties": False,
                "properties": {
                    "include_explanation": {"type": "boolean", "default": True},
                    "enable_cache": {"type": "boolean", "default": True,
                                     "description": "false: neither read nor fill the shared prediction cache."},
                    "timeout_ms": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": TIMEOUT_MS_MAX,
                                   "description": "A request that took longer gets 504 INFERENCE_TIMEOUT."},
                },
            },
        },
    }
    prediction = {
        "type": "object",
        "required": ["prediction_id", "model_id", "model_role", "score", "decision", "explain_summary",
                     "latency_ms", "cached"],
        "additionalProperties": False,
        "properties": {
            "prediction_id": {"type": "string", "format": "uuid"},
            "model_id": {"type": "string"},
            "model_role": {"type": "string", "enum": ["production", "canary"]},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "decision": {"$ref": "#/components/schemas/Decision"},
            "explain_summary": {"type": "array", "items": explanation_item, "maxItems": 5,
                                "description": "Top features by attribution; empty when include_explanation is false."},
            "latency_ms": {"type": "number", "minimum": 0, "description": "Server-side time to answer."},
            "cached": {"type": "boolean", "description": "Answered from the shared prediction cache."},
            "fallback": {"type": "boolean", "const": True,
                         "description": "Present only when the event's canary model failed and production answered."},
        },
    }
    logged_prediction = {
        "type": "object",
        "required": ["prediction_id", "model_id", "event_id", "product", "score", "decision", "explain",
                     "latency_ms", "model_role", "cached", "request_id", "created_at"],
        "additionalProperties": False,
        "properties": {
            "prediction_id": {"type": "string", "format": "uuid"},
            "model_id": {"type": "string"},
            "event_id": {"type": "string"},
            "product": {"type": "string"},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "decision": {"$ref": "#/components/schemas/Decision"},
            "explain": {"type": ["array", "null"], "items": explanation_item},
            "latency_ms": {"type": "number", "minimum": 0},
            "model_role": {"type": "string", "enum": ["production", "canary", "shadow"]},
            "cached": {"type": "boolean"},
            "request_id": {"type": ["string", "null"]},
            "created_at": {"type": "string", "format": "date-time"},
            "trace_id": {"type": ["string", "null"], "pattern": "^[0-9a-f]{32}$",
                         "description": "W3C trace id of the request when it was traced (OpenTelemetry)."},
        },
    }
    model = {
        "type": "object",
        "required": ["model_id", "name", "version", "product", "status", "loaded_at", "threshold", "sha256",
                     "size_bytes", "storage_key", "created_at", "updated_at"],
        "additionalProperties": False,
        "properties": {
            "model_id": {"type": "string", "format": "uuid"},
            "name": {"type": "string"},
            "version": {"type": "string"},
            "product": {"type": "string"},
            "status": {"type": "string", "enum": list(STATUSES)},
            "loaded_at": {"type": ["string", "null"], "format": "date-time",
                          "description": "When this instance started serving it; null when it does not."},
            "threshold": {"type": "number"},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "size_bytes": {"type": "integer", "minimum": 0},
            "storage_key": {"type": "string"},
            "created_at": {"type": ["string", "null"], "format": "date-time"},
            "updated_at": {"type": ["string", "null"], "format": "date-time"},
        },
    }
    promoted_properties = {
        "previous_status": {"type": "string", "enum": list(STATUSES)},
        "archived_model_ids": {"type": "array", "items": {"type": "string", "format": "uuid"},
                               "description": "Production models of the product archived by this promotion."},
    }
    promoted_model = dict(model, required=model["required"] + list(promoted_properties),
                          properties=dict(model["properties"], **promoted_properties))
    number_or_null = {"type": ["number", "null"], "minimum": 0}
    stats = {
        "type": "object",
        "required": ["requests", "errors", "model_runs", "cache_hits", "cache_hit_rate", "p50_ms", "p95_ms"],
        "properties": {
            "requests": {"type": "integer", "minimum": 0,
                         "description": "Events this host answered (or failed) with the model."},
            "errors": {"type": "integer", "minimum": 0,
                       "description": "Events the model failed (a canary's are answered by production)."},
            "model_runs": {"type": "integer", "minimum": 0},
            "cache_hits": {"type": "integer", "minimum": 0},
            "cache_hit_rate": {**number_or_null, "maximum": 1},
            "p50_ms": {**number_or_null, "description": "Median of the model's own run time per event."},
            "p95_ms": number_or_null,
        },
    }
    model_stats = dict(stats, properties=dict(stats["properties"], by_role={
        "type": "object", "additionalProperties": stats,
        "description": "The same counts by role: production, canary, shadow."}))
    model_info = dict(model, required=model["required"] + ["generation", "stats"],
                      properties=dict(model["properties"], generation={"type": ["integer", "null"]},
                                      stats=model_stats))
    if shown:
        infer_request["examples"] = [EXAMPLE_EVENT]
    if specs:
        infer_request["oneOf"] = [product_variant(product) for product in sorted(specs)] + [
            {"properties": {"product": {"not": {"enum": sorted(specs)}}}}]
    payloads = {payload_schema_name(product): payload_schema(spec) for product, spec in sorted(specs.items())}
    return {
        **payloads,
        "Decision": {"type": "string", "enum": ["allow", "review", "block"],
                     "description": "score >= threshold: block; score >= 0.7 * threshold: review; else allow."},
        "Error": {
            "type": "object",
            "required": ["error_code", "message", "request_id", "timestamp", "details"],
            "additionalProperties": False,
            "properties": {
                "error_code": {"type": "string", "enum": error_codes()},
                "message": {"type": "string"},
                "request_id": {"type": ["string", "null"]},
                "timestamp": {"type": "string", "format": "date-time"},
                "details": {"type": "object", "description": "e.g. the offending field."},
            },
        },
        "InferRequest": infer_request,
        "Prediction": prediction,
        "BatchRequest": {
            "type": "object",
            "required": ["events"],
            "properties": {
                "events": {
                    "type": "array", "minItems": 1, "maxItems": batch_max,
                    "description": f"1 to {batch_max} InferRequest objects (SIRA_BATCH_MAX). An invalid item does "
                                   "not fail the batch: it gets its own error entry in `results`.",
                    "items": {"description": "An InferRequest; anything else gets an error entry.",
                              **({"examples": [EXAMPLE_BATCH_EVENT]} if shown else {})},
                },
            },
        },
        "BatchResponse": {
            "type": "object",
            "required": ["results"],
            "additionalProperties": False,
            "properties": {
                "results": {"type": "array", "description": "One entry per event, in request order.",
                            "items": {"oneOf": [{"$ref": "#/components/schemas/Prediction"},
                                                {"$ref": "#/components/schemas/Error"}]}},
            },
        },
        "LoggedPrediction": logged_prediction,
        "Model": model,
        "PromotedModel": promoted_model,
        "ModelInfo": model_info,
        **canary_schemas(),
        "ModelList": {
            "type": "object",
            "required": ["models", "total", "generation"],
            "additionalProperties": False,
            "properties": {
                "models": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
                "total": {"type": "integer", "minimum": 0},
                "generation": {"type": ["integer", "null"],
                               "description": "The model generation this worker serves; null before the first."},
            },
        },
    }


def canary_schemas() -> dict:
    """POST /v1/canary's body and the config every canary endpoint answers."""
    uuid = {"type": "string", "format": "uuid"}
    nullable_uuid = {"type": ["string", "null"], "format": "uuid"}
    rollback = {
        "type": "object",
        "required": ["id", "canary_model_id", "production_model_id", "reason", "metrics", "triggered_by",
                     "created_at"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "integer"},
            "canary_model_id": nullable_uuid,
            "production_model_id": nullable_uuid,
            "reason": {"type": "string"},
            "metrics": {"description": "The figures that decided an automatic rollback; the state before a "
                                       "manual stop."},
            "triggered_by": {"type": "string", "description": "auto, or manual:<the token's subject>."},
            "created_at": {"type": "string", "format": "date-time"},
        },
    }
    return {
        "CanaryRequest": {
            "type": "object",
            "required": ["product", "canary_model_id", "production_model_id", "canary_percent"],
            "additionalProperties": False,
            "description": "Unknown fields are refused (400).",
            "properties": {
                "product": {"type": "string", "pattern": PRODUCT_PATTERN.pattern.join(("^", "$"))},
                "canary_model_id": dict(uuid, description="A model of the product, neither archived nor production."),
                "production_model_id": dict(uuid, description="The product's current production model."),
                "canary_percent": {"type": "number", "minimum": 0, "maximum": PERCENT_MAX, "multipleOf": 0.01,
                                   "description": "Share of the product's traffic for the canary, at most two "
                                                  "decimals; ignored for routing in shadow mode."},
                "mode": {"type": "string", "enum": list(MODES), "default": "canary",
                         "description": "canary: the canary answers its share; shadow: it scores a copy."},
            },
        },
        "CanaryConfig": {
            "type": "object",
            "required": ["product", "canary_model_id", "production_model_id", "canary_percent", "started_at",
                         "updated_at", "mode", "updated_by", "recent_rollbacks"],
            "additionalProperties": False,
            "properties": {
                "product": {"type": "string"},
                "canary_model_id": nullable_uuid,
                "production_model_id": nullable_uuid,
                "canary_percent": {"type": "number", "minimum": 0, "maximum": PERCENT_MAX},
                "started_at": {"type": ["string", "null"], "format": "date-time",
                               "description": "When this canary model started getting traffic."},
                "updated_at": {"type": ["string", "null"], "format": "date-time"},
                "mode": {"type": "string", "enum": list(MODES)},
                "updated_by": {"type": ["string", "null"],
                               "description": "The subject of the last change, or auto-rollback."},
                "recent_rollbacks": {"type": "array", "items": rollback, "description": "Newest first."},
            },
        },
    }


def payload_schema_name(product: str) -> str:
    return f"Payload_{product}"


def product_variant(product: str) -> dict:
    """A served product's request: its payload follows that product's model."""
    return {"properties": {"product": {"const": product},
                           "payload": {"$ref": f"#/components/schemas/{payload_schema_name(product)}"}}}


def payload_schema(spec: Any) -> dict:
    """What app.scoring.features.FeatureSpec.build_row accepts, as JSON Schema.

    `source` is a dotted path into the payload; a nested object may be absent or null, and must be
    present when it holds a required feature. Numbers are JSON numbers within [min, max] (integral
    where `integer`), categories strings of at most MAX_CATEGORY_LENGTH; a null or absent optional
    value takes its default. Fields the spec does not name are ignored.
    """
    root = {"type": "object", "description": f"The payload of {spec.product} ({spec.name}).",
            "properties": {}, "required": []}
    for feature in spec.features:
        *containers, key = feature.source.split(".")
        node = root
        for name in containers:
            node = node["properties"].setdefault(name, {"type": ["object", "null"], "properties": {}, "required": []})
            if feature.required:
                node["type"] = "object"
        node["properties"][key] = feature_schema(feature)
        if feature.required:
            node["required"].append(key)
    required_containers(root)
    return root


def feature_schema(feature: Any) -> dict:
    if feature.vocabulary:  # categorical
        schema = {"type": "string", "maxLength": MAX_CATEGORY_LENGTH,
                  "description": "Known values: " + ", ".join(feature.vocabulary[:-1]) + "; any other counts as "
                                 + feature.vocabulary[-1] + "."}
    else:
        schema = {"type": "integer" if feature.integer else "number", "minimum": feature.lo,
                  "maximum": feature.hi}
    if not feature.required:
        schema["type"] = [schema["type"], "null"]
        schema["default"] = feature_default(feature)
    return schema


def feature_default(feature: Any) -> Any:
    if feature.vocabulary:
        return feature.vocabulary[int(feature.default)]
    return int(feature.default) if feature.integer else feature.default


def required_containers(node: dict) -> None:
    """A nested object that holds a required feature is required itself; empty `required` lists go."""
    for name, child in node["properties"].items():
        if "properties" in child:
            required_containers(child)
            if child["type"] == "object" and name not in node["required"]:
                node["required"].append(name)
    if not node["required"]:
        del node["required"]
