"""The Falcon ASGI app: routes, middleware, orjson media handlers and the one error renderer."""

from __future__ import annotations

import logging

import falcon
import falcon.asgi
import falcon.media
import orjson

from app.auth import AuthMiddleware
from app.config import AppConfig
from app.errors import CODE_BY_STATUS, ApiError, error_body
from app.health import HealthResource, ReadyResource
from app.infer import BatchInferResource, InferResource
from app.middleware import RequestIdMiddleware
from app.models import ModelTable

log = logging.getLogger("sira.app")


async def render_error(req, resp, exc, params):
    """Every error of every endpoint leaves through here, in the one schema."""
    request_id = getattr(req.context, "request_id", None)
    if isinstance(exc, ApiError):
        status, code, message, details = exc.status, exc.code, exc.message, exc.details
        for name, value in exc.headers.items():
            resp.set_header(name, value)
    elif isinstance(exc, falcon.HTTPError):
        status = exc.status_code
        code = CODE_BY_STATUS.get(status, "INTERNAL_ERROR" if status >= 500 else "INVALID_REQUEST")
        message = exc.description or exc.title or code
        details = {}
        for name, value in (exc.headers or {}).items():
            resp.set_header(name, value)
    else:
        log.exception("unhandled error on %s %s (request %s)", req.method, req.path, request_id)
        status, code, message, details = 500, "INTERNAL_ERROR", "internal error", {}
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps(error_body(code, message, request_id, details))


def json_handler() -> falcon.media.JSONHandler:
    return falcon.media.JSONHandler(dumps=orjson.dumps, loads=orjson.loads)


def create_app(config: AppConfig) -> falcon.asgi.App:
    """Build the app in the worker process: models are loaded here, once, never per request."""
    models = ModelTable(config.expected_products)
    models.load(config.model_files)

    app = falcon.asgi.App(
        middleware=[RequestIdMiddleware(), AuthMiddleware(config.authenticator)],
        cors_enable=False,
    )
    handler = json_handler()
    app.req_options.media_handlers = falcon.media.Handlers({falcon.MEDIA_JSON: handler})
    app.resp_options.media_handlers = falcon.media.Handlers({falcon.MEDIA_JSON: handler})
    app.req_options.strip_url_path_trailing_slash = True
    for exc_type in (Exception, falcon.HTTPError, ApiError):
        app.add_error_handler(exc_type, render_error)

    app.add_route("/healthz", HealthResource())
    app.add_route("/readyz", ReadyResource(models))
    app.add_route("/v1/infer", InferResource(models, config.max_body_bytes))
    app.add_route("/v1/infer/batch", BatchInferResource(models, config.max_body_bytes, config.batch_max))
    return app
