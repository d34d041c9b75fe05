"""The ops endpoints' part of the OpenAPI document (app/http/openapi.py).

/healthz, /readyz, /metrics, /openapi.json and /docs.

Each is public (no token needed), and each says what a caller without a token is shown, which is
less than what a token (or METRICS_BIND's port, or a setting) shows: /readyz keeps its
dependency errors for ml_ops (app/http/health.py), /openapi.json its feature specs for a token of any
role (app/http/openapi.py), and /metrics may be off on SIRA_BIND (app/telemetry/metrics.py).
"""

from __future__ import annotations

from app.http.openapi_schemas import PUBLIC, REQUEST_ID_HEADER, error_response, json_response, ref

TOKEN_SHOWS = "A bad token, or one without the role, gets the public answer: a token never changes the status code."


def op_healthz() -> dict:
    return {
        "operationId": "healthz", "tags": ["ops"], "summary": "Liveness", "security": PUBLIC,
        "responses": {"200": json_response("The worker's event loop answers.", ref("Health"))},
    }


def op_readyz() -> dict:
    return {
        "operationId": "readyz", "tags": ["ops"], "summary": "Readiness", "security": PUBLIC,
        "description": "Without a token: whether this worker is ready, its generation and the models it "
                       "serves. `load_errors` and `dependencies` (the state and last error of Postgres and the "
                       "model store) only with an ml_ops token (or the internal token), or on METRICS_BIND's "
                       "port. " + TOKEN_SHOWS,
        "responses": {
            "200": json_response("This worker serves a model for every product.", ref("Ready")),
            "503": error_response("SERVICE_UNAVAILABLE: models not loaded yet (the message says why, the "
                                  "details which products; with an ml_ops token, also the load errors and the "
                                  "state of Postgres and the model store)."),
        },
    }


def op_metrics() -> dict:
    return {
        "operationId": "metrics", "tags": ["ops"], "summary": "Prometheus metrics of every process",
        "description": "Public: keep it on METRICS_BIND's port and let only the scraper reach that port; "
                       "SIRA_METRICS_ON_MAIN_PORT=off takes it off SIRA_BIND.",
        "security": PUBLIC,
        "responses": {"200": {"description": "Prometheus text exposition format.", "headers": REQUEST_ID_HEADER,
                              "content": {"text/plain": {"schema": {"type": "string"}}}},
                      "404": error_response("NOT_FOUND: SIRA_METRICS_ON_MAIN_PORT is off, and this is not "
                                            "METRICS_BIND's port.")},
    }


def op_openapi() -> dict:
    return {
        "operationId": "openapi", "tags": ["ops"], "summary": "This document", "security": PUBLIC,
        "description": "Each served product's payload schema (Payload_<product>: feature names, bounds, "
                       "categories) is in it for a request with a valid token of any role, or for everyone with "
                       "SIRA_OPENAPI_FEATURE_SPECS=on; otherwise the payload is a generic object. " + TOKEN_SHOWS,
        "responses": {"200": json_response("OpenAPI 3.1.", {"type": "object"})},
    }


def op_docs() -> dict:
    return {
        "operationId": "docs", "tags": ["ops"], "summary": "A page that renders this document", "security": PUBLIC,
        "responses": {"200": {"description": "HTML.", "headers": REQUEST_ID_HEADER,
                              "content": {"text/html": {"schema": {"type": "string"}}}}},
    }


def ops_schemas() -> dict:
    """The answers of /healthz and /readyz; what only details show is optional in Ready."""
    return {
        "Health": {
            "type": "object",
            "required": ["ok", "service", "timestamp"],
            "additionalProperties": False,
            "properties": {"ok": {"const": True}, "service": {"type": "string"},
                           "timestamp": {"type": "string", "format": "date-time"}},
        },
        "Ready": {
            "type": "object",
            "required": ["ready", "worker_pid", "generation", "models", "timestamp"],
            "additionalProperties": False,
            "properties": {
                "ready": {"const": True},
                "worker_pid": {"type": "integer"},
                "generation": {"type": ["integer", "null"]},
                "models": {"type": "object", "description": "product -> the model this worker serves for it.",
                           "additionalProperties": {
                               "type": "object", "required": ["model_id", "version", "role"],
                               "properties": {"model_id": {"type": "string"}, "version": {"type": "string"},
                                              "role": {"type": "string"},
                                              "loaded_at": {"type": ["string", "null"]}}}},
                "load_errors": {"type": "object", "additionalProperties": {"type": "string"},
                                "description": "Details only (ml_ops token or METRICS_BIND's port)."},
                "dependencies": {"$ref": "#/components/schemas/Dependencies"},
                "timestamp": {"type": "string", "format": "date-time"},
            },
        },
        "Dependencies": {
            "type": "object",
            "description": "Details only (ml_ops token or METRICS_BIND's port): the supervisor's view of each "
                           "dependency (postgres, model_store); empty before it looked. Also in the 503's details.",
            "additionalProperties": {
                "type": "object", "required": ["up", "since", "last_error"], "additionalProperties": False,
                "properties": {"up": {"type": "boolean"},
                               "since": {"type": "string", "format": "date-time",
                                         "description": "When it last went up or down."},
                               "last_error": {"type": ["string", "null"],
                                              "description": "The latest error while it is down."}}},
        },
    }
