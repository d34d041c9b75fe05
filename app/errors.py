"""The one error schema of every endpoint: {error_code, message, request_id, timestamp, details}.

Handlers raise an `ApiError` subclass; `app.http.assembly` renders it (and every Falcon HTTPError, and
any unexpected exception) through `error_body`, so no other error shape can leave the server.
"""

from __future__ import annotations

import datetime as _dt


class ApiError(Exception):
    """An error answered to the client with its HTTP status and code."""

    status = 500
    code = "INTERNAL_ERROR"

    def __init__(self, message: str, details: dict | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.headers = headers or {}


class InvalidRequest(ApiError):
    status, code = 400, "INVALID_REQUEST"


class FeatureValidationFailed(ApiError):
    status, code = 400, "FEATURE_VALIDATION_FAILED"


class Unauthorized(ApiError):
    status, code = 401, "UNAUTHORIZED"

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message, details, {"WWW-Authenticate": "Bearer"})


class Forbidden(ApiError):
    status, code = 403, "FORBIDDEN"


class NotFound(ApiError):
    status, code = 404, "NOT_FOUND"


class PredictionArchived(ApiError):
    """The prediction's day left Postgres for the bucket (`sira predictions archive`)."""

    status, code = 410, "PREDICTION_ARCHIVED"


class ModelNotFound(ApiError):
    status, code = 404, "MODEL_NOT_FOUND"


class MethodNotAllowed(ApiError):
    status, code = 405, "METHOD_NOT_ALLOWED"


class Conflict(ApiError):
    status, code = 409, "CONFLICT"


class RequestTimeout(ApiError):
    """The body did not arrive in time (SIRA_BODY_TIMEOUT_S); the connection is closed after the answer."""

    status, code = 408, "REQUEST_TIMEOUT"

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message, details, {"Connection": "close"})


class PayloadTooLarge(ApiError):
    status, code = 413, "PAYLOAD_TOO_LARGE"


class UnsupportedMediaType(ApiError):
    status, code = 415, "UNSUPPORTED_MEDIA_TYPE"


class RateLimitExceeded(ApiError):
    status, code = 429, "RATE_LIMIT_EXCEEDED"


class InternalError(ApiError):
    status, code = 500, "INTERNAL_ERROR"


class ServiceUnavailable(ApiError):
    status, code = 503, "SERVICE_UNAVAILABLE"


class InferenceTimeout(ApiError):
    status, code = 504, "INFERENCE_TIMEOUT"


# Falcon raises its own HTTPError for routing and media problems; this maps its status to our code.
CODE_BY_STATUS = {
    400: "INVALID_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "REQUEST_TIMEOUT",
    409: "CONFLICT",
    411: "INVALID_REQUEST",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    429: "RATE_LIMIT_EXCEEDED",
    503: "SERVICE_UNAVAILABLE",
    504: "INFERENCE_TIMEOUT",
}


def utc_timestamp() -> str:
    """ISO 8601 UTC with milliseconds and a Z, the timestamp format of every response."""
    now = _dt.datetime.now(_dt.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def error_body(code: str, message: str, request_id: str | None, details: dict | None) -> dict:
    return {
        "error_code": code,
        "message": message,
        "request_id": request_id,
        "timestamp": utc_timestamp(),
        "details": details or {},
    }
