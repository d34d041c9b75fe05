"""The OpenAPI 3.1 document of every endpoint (GET /openapi.json) and a docs page that renders it (GET /docs).

The document is built in Python from the same constants the server checks with (product pattern,
event id length, timeout bound, SIRA_BATCH_MAX, error codes), and only for the routes the app
really has: ``OPERATIONS`` describes each route, the app's router (``falcon.inspect``) says which
exist. A route without a description is left out of the document and logged, and
``tests/e2e/test_openapi.py`` fails on it; schemathesis checks the document against a live server.

Both endpoints are public, like /healthz, but the served products' feature specs (names, bounds,
categories: what a fraudster probing the model wants to learn) are in /openapi.json only for a
request with a valid token of any role, or for everyone with SIRA_OPENAPI_FEATURE_SPECS=on. Any
role, not only those that score: every holder of a token is a service or a person of ours, and the
point is to keep the specs from anonymous callers of SIRA_BIND. Without either the document
describes every route with a generic payload. /docs is a static page that fetches the document
without a token, so it shows the generic one unless the setting is on.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from typing import Any

import falcon
import falcon.inspect
import orjson

from app.http.docs import DOCS_HTML
from app.http.health import OptionalToken
from app.http.openapi_ops import op_docs, op_healthz, op_metrics, op_openapi, op_readyz, ops_schemas
from app.http.openapi_outcomes import op_post_outcomes, outcomes_schemas
from app.http.openapi_schemas import JSON, error_response, json_response, ref, schemas
from app.ids import PRODUCT_PATTERN
from app.store.registry import PROMOTION_TARGETS, STATUSES

log = logging.getLogger("sira.openapi")

OPENAPI_VERSION = "3.1.0"
ROLES_INFER = "sira_service, fraud_analyst (or the internal service token)"
ROLES_ML_OPS = "ml_ops (or the internal service token)"
ROLES_CANARY_READ = "ml_ops, pay_admin (or the internal service token)"
ROLES_PREDICTIONS = "sira_service, fraud_analyst, ml_ops (or the internal service token)"


def service_version() -> str:
    try:
        return importlib.metadata.version("sira")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


# -- operations --------------------------------------------------------------------------------------

BODY_ERRORS = {
    "400": error_response("INVALID_REQUEST (malformed JSON, a bad field) or FEATURE_VALIDATION_FAILED."),
    "411": error_response("INVALID_REQUEST: no Content-Length."),
    "413": error_response("PAYLOAD_TOO_LARGE: above SIRA_MAX_BODY_BYTES."),
    "415": error_response("UNSUPPORTED_MEDIA_TYPE: the body must be application/json."),
}
AUTH_ERRORS = {
    "401": error_response("UNAUTHORIZED: no token, or one that is invalid or expired."),
    "403": error_response("FORBIDDEN: the token's role may not do this."),
    "429": error_response("RATE_LIMIT_EXCEEDED: over SIRA_RATE_LIMITS for the token's role and subject (or, "
                          "failing authentication, for the client address); Retry-After says when to retry."),
}
ID_PARAMETER_DESCRIPTION = "A UUID such as 987f6543-e21c-34d5-b678-537625285111 (400 otherwise)."


def path_parameter(name: str) -> dict:
    return {"name": name, "in": "path", "required": True, "description": ID_PARAMETER_DESCRIPTION,
            "schema": {"type": "string", "format": "uuid", "minLength": 36, "maxLength": 36}}


def op_infer() -> dict:
    return {
        "operationId": "infer", "tags": ["scoring"], "summary": "Score one payment event",
        "description": f"Roles: {ROLES_INFER}.",
        "requestBody": {"required": True, "content": {JSON: {"schema": ref("InferRequest")}}},
        "responses": {
            "200": json_response("The score, decision and explanation.", ref("Prediction")),
            **BODY_ERRORS, **AUTH_ERRORS,
            "404": error_response("MODEL_NOT_FOUND: no model serves the product."),
            "503": error_response("SERVICE_UNAVAILABLE: the prediction log cannot keep the prediction."),
            "504": error_response("INFERENCE_TIMEOUT: slower than options.timeout_ms."),
        },
    }


def op_infer_batch() -> dict:
    return {
        "operationId": "inferBatch", "tags": ["scoring"], "summary": "Score up to SIRA_BATCH_MAX events",
        "description": f"Roles: {ROLES_INFER}. One model run per model; results in request order.",
        "requestBody": {"required": True, "content": {JSON: {"schema": ref("BatchRequest")}}},
        "responses": {
            "200": json_response("One result per event: a prediction or that event's error.", ref("BatchResponse")),
            **BODY_ERRORS, **AUTH_ERRORS,
            "503": error_response("SERVICE_UNAVAILABLE: the prediction log cannot keep the predictions."),
        },
    }


def op_get_prediction() -> dict:
    return {
        "operationId": "getPrediction", "tags": ["scoring"], "summary": "One logged prediction",
        "description": f"Roles: {ROLES_PREDICTIONS}. Finds a prediction made a moment ago too.",
        "parameters": [path_parameter("prediction_id")],
        "responses": {
            "200": json_response("The prediction as logged.", ref("LoggedPrediction")),
            "400": error_response("INVALID_REQUEST: not a UUID."),
            **AUTH_ERRORS,
            "404": error_response("NOT_FOUND: no such prediction."),
            "410": error_response("PREDICTION_ARCHIVED: the prediction's day was archived to the bucket; details "
                                  "name the day and the object (`sira predictions restore DAY` brings it back)."),
            "503": error_response("SERVICE_UNAVAILABLE: Postgres cannot be reached."),
        },
    }


def op_list_models() -> dict:
    return {
        "operationId": "listModels", "tags": ["models"], "summary": "Every registered model",
        "description": f"Roles: {ROLES_ML_OPS}. By product, newest first.",
        "parameters": [
            {"name": "product", "in": "query", "required": False,
             "schema": {"type": "string", "pattern": PRODUCT_PATTERN.pattern.join(("^", "$"))}},
            {"name": "status", "in": "query", "required": False,
             "schema": {"type": "string", "enum": list(STATUSES)}},
        ],
        "responses": {
            "200": json_response("The models and the generation this worker serves.", ref("ModelList")),
            "400": error_response("INVALID_REQUEST: a bad product or status."),
            **AUTH_ERRORS,
            "503": error_response("SERVICE_UNAVAILABLE: Postgres cannot be reached."),
        },
    }


def op_get_model() -> dict:
    return {
        "operationId": "getModel", "tags": ["models"], "summary": "One model, and what this host served with it",
        "description": f"Roles: {ROLES_ML_OPS}. The registry's facts, when this instance loaded it, the generation, "
                       "and since the server started: requests, errors, cache hits and the p50/p95 of the model's "
                       "run time, in total and by role, from every worker of this host.",
        "parameters": [path_parameter("model_id")],
        "responses": {
            "200": json_response("The model and its counts.", ref("ModelInfo")),
            "400": error_response("INVALID_REQUEST: a malformed model id."),
            **AUTH_ERRORS,
            "404": error_response("MODEL_NOT_FOUND: no such model."),
            "503": error_response("SERVICE_UNAVAILABLE: Postgres cannot be reached."),
        },
    }


def op_promote_model() -> dict:
    return {
        "operationId": "promoteModel", "tags": ["models"], "summary": "Move a model to another status",
        "description": f"Roles: {ROLES_ML_OPS}. Promoting to production archives the product's previous "
                       "production model in the same transaction; every instance picks it up within a second.",
        "parameters": [path_parameter("model_id")],
        "requestBody": {"required": True, "content": {JSON: {"schema": {
            "type": "object", "required": ["target"],
            "properties": {"target": {"type": "string", "enum": list(PROMOTION_TARGETS)}}}}}},
        "responses": {
            "200": json_response("The model as it is now.", ref("PromotedModel")),
            **BODY_ERRORS, **AUTH_ERRORS,
            "404": error_response("MODEL_NOT_FOUND: no such model."),
            "409": error_response("CONFLICT: the registry refuses this move."),
            "503": error_response("SERVICE_UNAVAILABLE: Postgres cannot be reached."),
        },
    }


def product_parameter() -> dict:
    return {"name": "product", "in": "path", "required": True, "description": "A product such as fraud_score.",
            "schema": {"type": "string", "pattern": PRODUCT_PATTERN.pattern.join(("^", "$"))}}


CANARY_ERRORS = {
    "404": error_response("MODEL_NOT_FOUND: a model id is not in the registry."),
    "409": error_response("CONFLICT: the registry refuses the pair (a model of another product, an archived or "
                          "production canary, a production id that is not the current production model, the "
                          "same model twice)."),
    "503": error_response("SERVICE_UNAVAILABLE: Postgres cannot be reached."),
}


def op_set_canary() -> dict:
    return {
        "operationId": "setCanary", "tags": ["canary"], "summary": "Create or replace a product's canary",
        "description": f"Roles: {ROLES_ML_OPS}. The registry status of the models is not changed; every instance "
                       "picks the config up within a second. `started_at` restarts for a new canary model or a "
                       "stopped canary that gets traffic again.",
        "requestBody": {"required": True, "content": {JSON: {
            "schema": ref("CanaryRequest"),
            "examples": {"ten_percent": {"value": {"product": "fraud_score",
                                                   "canary_model_id": "987f6543-e21c-34d5-b678-537625285111",
                                                   "production_model_id": "3f2c1a9e-8b7d-4c6e-9f10-2a3b4c5d6e7f",
                                                   "canary_percent": 10}}}}}},
        "responses": {
            "200": json_response("The config as stored.", ref("CanaryConfig")),
            **BODY_ERRORS, **AUTH_ERRORS, **CANARY_ERRORS,
        },
    }


def op_get_canary() -> dict:
    return {
        "operationId": "getCanary", "tags": ["canary"], "summary": "A product's canary config",
        "description": f"Roles: {ROLES_CANARY_READ}.",
        "parameters": [product_parameter()],
        "responses": {
            "200": json_response("The config and its latest rollbacks.", ref("CanaryConfig")),
            "400": error_response("INVALID_REQUEST: a malformed product."),
            **AUTH_ERRORS,
            "404": error_response("NOT_FOUND: the product has no canary config."),
            "503": error_response("SERVICE_UNAVAILABLE: Postgres cannot be reached."),
        },
    }


def op_stop_canary() -> dict:
    return {
        "operationId": "stopCanary", "tags": ["canary"], "summary": "Stop a product's canary",
        "description": f"Roles: {ROLES_ML_OPS}. Sets canary_percent to 0 (and mode to canary) and logs a manual "
                       "rollback; stopping a stopped canary changes nothing.",
        "parameters": [product_parameter()],
        "responses": {
            "200": json_response("The config after the stop.", ref("CanaryConfig")),
            "400": error_response("INVALID_REQUEST: a malformed product."),
            **AUTH_ERRORS,
            "404": error_response("NOT_FOUND: the product has no canary config."),
            "503": error_response("SERVICE_UNAVAILABLE: Postgres cannot be reached."),
        },
    }


# (route template, method) -> its operation; a route the app has but this table lacks is undocumented.
OPERATIONS: dict[tuple[str, str], Callable[[], dict]] = {
    ("/v1/infer", "POST"): op_infer,
    ("/v1/infer/batch", "POST"): op_infer_batch,
    ("/v1/infer/{prediction_id}", "GET"): op_get_prediction,
    ("/v1/models", "GET"): op_list_models,
    ("/v1/models/{model_id}", "GET"): op_get_model,
    ("/v1/models/{model_id}/promote", "POST"): op_promote_model,
    ("/v1/canary", "POST"): op_set_canary,
    ("/v1/canary/{product}", "GET"): op_get_canary,
    ("/v1/canary/{product}/stop", "POST"): op_stop_canary,
    ("/v1/outcomes", "POST"): op_post_outcomes,
    ("/healthz", "GET"): op_healthz,
    ("/readyz", "GET"): op_readyz,
    ("/metrics", "GET"): op_metrics,
    ("/openapi.json", "GET"): op_openapi,
    ("/docs", "GET"): op_docs,
}


def app_routes(app: falcon.asgi.App) -> set[tuple[str, str]]:
    """(route template, method) of every responder the app has, Falcon's own (OPTIONS, 405) excluded."""
    return {(route.path, method.method) for route in falcon.inspect.inspect_routes(app)
            for method in route.methods if not method.internal}


def build_document(routes: set[tuple[str, str]], batch_max: int = 256, specs: dict[str, Any] | None = None,
                   outcomes_batch_max: int = 1000) -> dict:
    """The document of the given routes that OPERATIONS describes, with the served products' payloads.

    `specs` None: the public document, with a generic payload and no example that names a feature.
    """
    paths: dict[str, dict] = {}
    for path, method in sorted(routes):
        describe = OPERATIONS.get((path, method))
        if describe is not None:
            paths.setdefault(path, {})[method.lower()] = describe()
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "SIRA inference service",
            "version": service_version(),
            "description": "Scores payment events for fraud and risk in about a millisecond. Every error has "
                           "one shape (Error) and every response carries X-Request-ID (the client's when it "
                           "is 1-128 of A-Z a-z 0-9 . _ : -, else a generated one).",
        },
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                "description": "A JWT (HS256 with JWT_SECRET, or RS256/ES256 by kid) or the internal service "
                               "token (`sira token --role ROLE --sub NAME` mints one)."}},
            "headers": {"RequestId": {"required": True, "description": "The request's id, also in every log line.",
                                      "schema": {"type": "string"}}},
            "schemas": {**schemas(batch_max, specs), **ops_schemas(), **outcomes_schemas(outcomes_batch_max)},
        },
    }


class OpenApiResource:
    """GET /openapi.json: built from the app's routes and served models, rebuilt when the models change.

    Two documents: the public one (no feature spec; built once) and the one with the served
    products' payloads, for a valid token of any role or for everyone when `specs_public`
    (SIRA_OPENAPI_FEATURE_SPECS=on). No token or a bad one gets the public document (app/http/health.py).
    """

    def __init__(self, app: falcon.asgi.App, batch_max: int, models: Any = None,
                 token: OptionalToken | None = None, specs_public: bool = False, outcomes_batch_max: int = 1000):
        self.app = app
        self.batch_max = batch_max
        self.outcomes_batch_max = outcomes_batch_max
        self.models = models  # app.scoring.models.ModelTable: the served products and their feature specs
        self.token = token  # None: no authenticator, so only the setting shows the specs
        self.specs_public = specs_public
        self._body: bytes | None = None
        self._built_for: object = None
        self._public_body: bytes | None = None

    async def on_get(self, req, resp):
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self.with_specs() if self.shows_specs(req) else self.public()

    def shows_specs(self, req) -> bool:
        if self.specs_public:
            return True
        return self.token is not None and self.token.principal(req) is not None

    def public(self) -> bytes:
        if self._public_body is None:
            self._public_body = orjson.dumps(build_document(self.routes(), self.batch_max,
                                                            outcomes_batch_max=self.outcomes_batch_max))
        return self._public_body

    def with_specs(self) -> bytes:
        served = self.served_models()
        if self._body is None or served != self._built_for:
            specs = {product: self.models.production[product].spec for product, _, _ in served}
            self._body = orjson.dumps(build_document(self.routes(), self.batch_max, specs, self.outcomes_batch_max))
            self._built_for = served
        return self._body

    def served_models(self) -> tuple:
        """What the document depends on: (product, model id, version) of every served model."""
        if self.models is None:
            return ()
        self.models.refresh()
        return tuple(sorted((product, model.model_id, model.version)
                            for product, model in self.models.production.items()))

    def routes(self) -> set[tuple[str, str]]:
        routes = app_routes(self.app)
        undocumented = sorted(routes - OPERATIONS.keys())
        if undocumented:
            log.warning("routes missing from the OpenAPI document: %s", undocumented)
        return routes


class DocsResource:
    """GET /docs: a self-contained page (no CDN) that loads /openapi.json and lists every operation."""

    async def on_get(self, req, resp):
        resp.content_type = falcon.MEDIA_HTML
        resp.text = DOCS_HTML

