"""Reading and checking request bodies: size, content type, JSON object, the infer request's fields."""

from __future__ import annotations

import math

import falcon

from app.errors import ApiError, InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from app.ids import EVENT_ID_MAX, PRODUCT_PATTERN, is_event_id

TIMEOUT_MS_MAX = 60_000
OPTION_KEYS = frozenset({"include_explanation", "enable_cache", "timeout_ms"})


class LengthRequired(ApiError):
    status, code = 411, "INVALID_REQUEST"


class InferRequest:
    """The checked fields of one infer request."""

    __slots__ = ("event_id", "product", "payload", "include_explanation", "enable_cache", "timeout_ms")

    def __init__(self, event_id: str, product: str, payload: dict, include_explanation: bool,
                 enable_cache: bool, timeout_ms: int | None):
        self.event_id = event_id
        self.product = product
        self.payload = payload
        self.include_explanation = include_explanation
        self.enable_cache = enable_cache
        self.timeout_ms = timeout_ms


async def read_json_object(req: falcon.asgi.Request, max_bytes: int) -> dict:
    """The body as a dict, through the app's orjson media handler, after the size and type checks."""
    content_type = req.content_type
    if content_type is None or not content_type.lower().startswith("application/json"):
        raise UnsupportedMediaType("Content-Type must be application/json",
                                   {"content_type": content_type})
    length = req.content_length
    if length is None:
        raise LengthRequired("a Content-Length header is required")
    if length > max_bytes:
        raise PayloadTooLarge(f"the body is larger than {max_bytes} bytes",
                              {"limit_bytes": max_bytes, "content_length": length})
    body = await req.get_media()
    if type(body) is not dict:
        raise InvalidRequest("the body must be a JSON object", {"got": type(body).__name__})
    return body


def parse_infer_request(body: dict, path: str = "") -> InferRequest:
    """Check the envelope of an infer request; the payload itself is checked by the model's spec."""
    event_id = body.get("event_id")
    if not is_event_id(event_id):
        raise InvalidRequest(f"event_id must be a printable string of 1 to {EVENT_ID_MAX} characters",
                             {"field": path + "event_id"})
    product = body.get("product")
    if type(product) is not str or PRODUCT_PATTERN.fullmatch(product) is None:
        raise InvalidRequest("product must be a lower-case identifier such as fraud_score",
                             {"field": path + "product"})
    payload = body.get("payload")
    if type(payload) is not dict:
        raise InvalidRequest("payload must be a JSON object", {"field": path + "payload"})
    options = body.get("options")
    if options is None:
        return InferRequest(event_id, product, payload, True, True, None)
    return InferRequest(event_id, product, payload, *parse_options(options, path + "options"))


def parse_options(options: object, path: str) -> tuple[bool, bool, int | None]:
    if type(options) is not dict:
        raise InvalidRequest("options must be a JSON object", {"field": path})
    unknown = options.keys() - OPTION_KEYS
    if unknown:
        raise InvalidRequest(f"unknown option {sorted(unknown)[0]!r}",
                             {"field": f"{path}.{sorted(unknown)[0]}", "allowed": sorted(OPTION_KEYS)})
    include_explanation = options.get("include_explanation", True)
    enable_cache = options.get("enable_cache", True)
    for name, value in (("include_explanation", include_explanation), ("enable_cache", enable_cache)):
        if type(value) is not bool:
            raise InvalidRequest(f"{name} must be true or false", {"field": f"{path}.{name}"})
    timeout_ms = options.get("timeout_ms")
    if timeout_ms is not None:
        if type(timeout_ms) not in (int, float) or not math.isfinite(timeout_ms) \
                or not 0 < timeout_ms <= TIMEOUT_MS_MAX:
            raise InvalidRequest(f"timeout_ms must be a number of milliseconds over 0 and at most {TIMEOUT_MS_MAX}",
                                 {"field": f"{path}.timeout_ms"})
    return include_explanation, enable_cache, timeout_ms
