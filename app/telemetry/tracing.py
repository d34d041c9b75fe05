"""OpenTelemetry traces: off unless asked for; on, one server span per request and a child per phase.

Tracing is on only when the environment asks for it, in the SDK's own variables
(``tracing_requested``): ``OTEL_TRACES_EXPORTER=otlp``, or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_ENDPOINT`` set while ``OTEL_TRACES_EXPORTER`` is unset; never when
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``. Off, nothing of this module runs on the
request path: no middleware is installed, the resources' ``tracer`` is None, and the SDK is never
imported. On, each worker builds its own TracerProvider after the fork (``open_tracing``, called from
``create_app``): a BatchSpanProcessor, whose export thread starts in the worker, hands spans to an
OTLP/HTTP exporter; the SDK reads the sampler (``OTEL_TRACES_SAMPLER[_ARG]``), the endpoint, headers,
timeouts and the batch sizes from the environment itself. Spans are flushed at lifespan shutdown.

A request's server span continues the client's W3C ``traceparent`` (and ``tracestate``); its trace id
goes into the request's prediction log rows (``req.context.trace_id``) when the client sent a
valid traceparent or the span is sampled; else None, as when tracing is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from typing import Any

from conf.settings import ConfigError

# The OpenTelemetry SDK is imported only inside what runs when tracing is on, so that a worker with
# tracing off never loads it (tests/unit/test_tracing.py checks that).

log = logging.getLogger("sira.tracing")

DEFAULT_SERVICE_NAME = "sira-inference"
SUPPORTED_PROTOCOL = "http/protobuf"
SHUTDOWN_FLUSH_MS = 5000  # at worker exit: spans still queued get this long to leave


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def tracing_requested(environ: Mapping[str, str]) -> bool:
    """Whether the OTEL_* environment asks for traces; ValueError for what SIRA cannot export."""
    if _true(environ.get("OTEL_SDK_DISABLED")):
        return False
    exporters = {name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",")} - {""}
    if exporters - {"otlp", "none"}:
        raise ValueError(f"OTEL_TRACES_EXPORTER: expected otlp or none, got {environ['OTEL_TRACES_EXPORTER']!r}")
    if exporters:
        on = "otlp" in exporters
    else:
        on = bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    if on:
        protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or SUPPORTED_PROTOCOL)
        if protocol.strip().lower() != SUPPORTED_PROTOCOL:
            raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: expected {SUPPORTED_PROTOCOL} (OTLP over HTTP), "
                             f"got {protocol!r}")
    return on


def tracing_from_environment() -> bool:
    """``tracing_requested`` of this process' environment; a bad value is a ConfigError (exit 2)."""
    try:
        return tracing_requested(os.environ)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def open_tracing(enabled: bool, exporter: Any = None) -> Tracing | None:
    """This worker's tracing (call it after the fork), or None when off; ``exporter`` for tests."""
    if not enabled:
        return None
    from opentelemetry.sdk.resources import Resource  # tracing on only (see the imports)
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # endpoint, headers, timeout, compression: from OTEL_EXPORTER_OTLP_*
    resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # sampler: OTEL_TRACES_SAMPLER[_ARG]
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider)


class PhaseTracer:
    """Opens a phase's span only inside a recorded request span; else a shared no-op (measured: an
    unsampled request then costs one context lookup per phase instead of an SDK span each)."""

    def __init__(self, sdk_tracer: Any):
        from opentelemetry import trace  # tracing on only (see the imports)

        self.sdk_tracer = sdk_tracer
        self._current_span = trace.get_current_span
        self._no_span = contextlib.nullcontext(trace.INVALID_SPAN)

    def start_as_current_span(self, name: str, **kwargs: Any) -> Any:
        if self._current_span().is_recording():
            return self.sdk_tracer.start_as_current_span(name, **kwargs)
        return self._no_span


class HeaderGetter:
    """The propagator's view of a Falcon request's headers."""

    @staticmethod
    def get(req: Any, key: str) -> list[str] | None:
        value = req.get_header(key)
        return None if value is None else [value]

    @staticmethod
    def keys(req: Any) -> list[str]:
        return []


class Tracing:
    """A worker's tracer provider and the Falcon middleware that makes each request's server span.

    Put it first in the middleware list, so that its span covers the others. Spans of the request's
    phases are children of the server span: the resources and ``TracedAuth`` open them with ``tracer``.
    """

    def __init__(self, provider: Any):
        from opentelemetry import context, trace  # tracing on only (see the imports)
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = PhaseTracer(provider.get_tracer("sira"))
        self.closed = False
        self._propagator = TraceContextTextMapPropagator()
        self._attach = context.attach
        self._detach = context.detach
        self._set_span_in_context = trace.set_span_in_context
        self._get_span_context = trace.get_current_span
        self._server = trace.SpanKind.SERVER
        self._error = trace.Status(trace.StatusCode.ERROR)

    async def process_request(self, req, resp):
        parent = self._propagator.extract(req, getter=HeaderGetter)
        span = self.tracer.sdk_tracer.start_span(req.method, context=parent, kind=self._server,
                                      attributes={"http.request.method": req.method, "url.path": req.path})
        req.context.span = span
        req.context.span_token = self._attach(self._set_span_in_context(span))
        span_context = span.get_span_context()
        given = self._get_span_context(parent).get_span_context().is_valid
        req.context.trace_id = (format(span_context.trace_id, "032x")
                                if given or span_context.trace_flags.sampled else None)

    async def process_resource(self, req, resp, resource, params):
        if req.uri_template:
            req.context.span.update_name(f"{req.method} {req.uri_template}")
            req.context.span.set_attribute("http.route", req.uri_template)

    async def process_response(self, req, resp, resource, req_succeeded):
        span = getattr(req.context, "span", None)
        if span is None:
            return
        try:
            if span.is_recording():
                self.describe(span, req, resp)
        finally:
            span.end()
            self._detach(req.context.span_token)

    def describe(self, span: Any, req: Any, resp: Any) -> None:
        """The span's attributes from what the request became (only for a sampled span)."""
        status = resp.status_code
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(self._error)
        request_id = getattr(req.context, "request_id", None)
        if request_id is not None:
            span.set_attribute("sira.request_id", request_id)
        model = getattr(req.context, "model", None)
        if model is not None:
            span.set_attributes({"sira.product": model.product, "sira.model_id": model.model_id,
                                 "sira.model_role": model.role})
        media = resp.media if resp.data is None else None
        if type(media) is dict and "decision" in media:
            span.set_attributes({"sira.decision": media["decision"], "sira.cached": media["cached"]})
        code = getattr(req.context, "error_code", None)
        if code is not None:
            span.set_attribute("error.type", code)

    async def process_shutdown(self, scope, event):
        """Falcon lifespan hook: flush what is queued, then stop the export thread."""
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Flush and stop (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if not self.provider.force_flush(SHUTDOWN_FLUSH_MS):
            log.warning("tracing: spans still queued at shutdown were dropped")
        self.provider.shutdown()


class TracedAuth:
    """AuthMiddleware inside an ``auth`` span, for the resources that check a token (tracing on only)."""

    OTHER_HOOKS = ("process_request", "process_response", "process_startup", "process_shutdown")

    def __init__(self, auth: Any, tracer: Any):
        self.auth = auth
        self.tracer = tracer
        for hook in self.OTHER_HOOKS:  # whatever else the auth middleware does, it still does
            if hasattr(auth, hook):
                setattr(self, hook, getattr(auth, hook))

    async def process_resource(self, req, resp, resource, params):
        actions = getattr(resource, "auth_actions", None)
        if not actions or req.method not in actions:
            return
        with self.tracer.start_as_current_span("auth"):
            await self.auth.process_resource(req, resp, resource, params)


class TracedCache:
    """The prediction cache with each lookup and store in a ``cache`` span (tracing on only)."""

    def __init__(self, cache: Any, tracer: Any):
        self.cache = cache
        self.tracer = tracer
        self.key = cache.key
        self.put = cache.put  # storing is a copy into shared memory: not worth a span of its own

    def get(self, key: Any, explained: bool) -> Any:
        with self.tracer.start_as_current_span("cache") as span:
            hit = self.cache.get(key, explained)
            span.set_attribute("sira.cache.hit", hit is not None)
            return hit

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)


def traced_cache(cache: Any, tracer: Any) -> TracedCache | None:
    return None if cache is None else TracedCache(cache, tracer)
