"""Cost of OpenTelemetry tracing per POST /v1/infer, in process: off, on but not sampled, on and sampled.

Run: .venv/bin/python -m bench.bench_tracing [REQUESTS]

Each mode builds the real app (app/http/assembly.py create_app: auth, request id, cache, the demo model) and
calls it as an ASGI app in one event loop, no sockets, so the numbers are the app's own time. The
cache is on but every request has another amount, so each one runs the model (cache lookup, score,
cache store). On, spans go through the real BatchSpanProcessor to an exporter that drops them (the
OTLP encoding and the HTTP post happen on the SDK's thread, off the request path, and are not
counted). Rounds of the modes alternate, so that drift hits all alike; the median per request is
printed.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import sys
import time

import orjson

from app.http import assembly as app_main
from app.scoring.cache import cache_segment_name, shared_cache
from app.telemetry.tracing import Tracing, open_tracing
from tests.fixtures.server import bearer
from tests.unit.test_tracing import app_config

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
ROUNDS = 10


class DroppingExporter:
    """A span exporter that accepts and forgets (the SDK's SpanExporter protocol)."""

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def build_app(mode: str, cache_segment: str):
    """The app with tracing off, or on with the sampler of ``mode``."""
    if mode == "off":
        return app_main.create_app(app_config(False, cache_segment))
    os.environ["OTEL_TRACES_SAMPLER"] = "always_on" if mode == "on, sampled" else "always_off"
    original = app_main.open_tracing
    app_main.open_tracing = lambda enabled: open_tracing(enabled, DroppingExporter())
    try:
        return app_main.create_app(app_config(True, cache_segment))
    finally:
        app_main.open_tracing = original
        del os.environ["OTEL_TRACES_SAMPLER"]


def request_scope(headers: dict[str, str], body: bytes) -> dict:
    raw = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    raw += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/v1/infer", "raw_path": b"/v1/infer", "query_string": b"",
            "root_path": "", "headers": raw, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080)}


def receive_once(body: bytes):
    """An ASGI ``receive`` that gives ``body`` in one message, then a disconnect."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop() if messages else {"type": "http.disconnect"}

    return receive


async def timed_requests(app, count: int, first_amount: int, headers: dict[str, str]) -> list[int]:
    """Nanoseconds of each of ``count`` requests, each with a new amount (a cache miss)."""
    samples, clock = [], time.perf_counter_ns
    status = []

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    for i in range(count):
        body = orjson.dumps({"event_id": f"evt-{i}", "product": "fraud_score",
                             "payload": {"amount": first_amount + i, "currency": "USD", "country": "US",
                                         "payment_method": "card", "features": {"hour_of_day": 14}}})
        receive = receive_once(body)
        start = clock()
        await app(request_scope(headers, body), receive, send)
        samples.append(clock() - start)
    if set(status) != {200}:
        raise RuntimeError(f"unexpected statuses {sorted(set(status))}")
    return samples


def main() -> None:
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    modes = ("off", "on, not sampled", "on, sampled")
    headers = {**bearer(), "traceparent": TRACEPARENT}
    per_round = max(requests // ROUNDS, 1)
    samples: dict[str, list[int]] = {mode: [] for mode in modes}
    name = cache_segment_name(f"benchtrace{secrets.token_hex(4)}", 10 * requests)
    with shared_cache(name, 10 * requests, 600_000):
        apps = {mode: build_app(mode, name) for mode in modes}

        async def run_all():
            for mode in modes:  # warm-up
                await timed_requests(apps[mode], 500, 1_000_000 * (modes.index(mode) + 1), headers)
            for round_ in range(ROUNDS):
                for mode in modes:
                    base = 1_000_000 * (modes.index(mode) + 1) + 1000 + round_ * per_round
                    samples[mode] += await timed_requests(apps[mode], per_round, base, headers)

        asyncio.run(run_all())
        for app in apps.values():
            for middleware in app._unprepared_middleware:
                if isinstance(middleware, Tracing):
                    middleware.close()
    off = statistics.median(samples["off"]) / 1000
    print(f"POST /v1/infer in process, median of {len(samples['off'])} requests per mode "
          f"(python {sys.version.split()[0]}, traceparent sent)")
    for mode in modes:
        median = statistics.median(samples[mode]) / 1000
        p90 = statistics.quantiles(samples[mode], n=10)[-1] / 1000
        print(f"  tracing {mode:<16} median {median:8.1f} us   p90 {p90:8.1f} us   cost {median - off:+7.1f} us")


if __name__ == "__main__":
    main()
