"""A body that stops arriving is answered 408 REQUEST_TIMEOUT in the one error schema, never a 500.

The deadline itself is kept by the HTTP worker (workers/http_worker.py, SIRA_BODY_TIMEOUT_S, armed
only when a request's body did not come with its headers): when it passes, the request's ASGI
`receive` returns `http.disconnect`, as it does when the client goes away or gunicorn's own wait
for the next chunk (its `timeout`) runs out. Left alone, that reaches Falcon in one of two places:

- before Falcon runs anything (it waits for the first body event first): Falcon returns without
  an answer, and gunicorn sends a plain-text 500;
- while Falcon reads the body: the body ends early and the client gets 400 for malformed JSON.

`BodyDeadline` wraps the Falcon app as plain ASGI (app.http.assembly.create_worker_app) and turns
`http.disconnect` before the body's end into 408: answered here when Falcon has not started, raised as
`RequestTimeout` (rendered by app.http.assembly's error handler) when it has. The answer says
`Connection: close`; gunicorn closes the connection anyway, its body being unfinished. A client that
really left never reads the 408. It costs about 0.5 us a request (`python -m bench.bench_body_deadline`).
"""

from __future__ import annotations

import os

import orjson

from app.errors import RequestTimeout, error_body
from app.http.middleware import SANE_REQUEST_ID


class BodyReceive:
    """One request's receive for the app: the first event replayed, a premature disconnect raised as 408."""

    __slots__ = ("body_done", "first", "receive", "timeout_s")

    def __init__(self, receive, first: dict, timeout_s: float):
        self.receive = receive
        self.first = first
        self.body_done = not first.get("more_body")
        self.timeout_s = timeout_s

    async def __call__(self) -> dict:
        first = self.first
        if first is not None:
            self.first = None
            return first
        event = await self.receive()
        if not self.body_done:
            if event["type"] == "http.disconnect":
                raise timeout_error(self.timeout_s)
            if not event.get("more_body"):
                self.body_done = True
        return event


class BodyDeadline:
    """ASGI wrapper of the app: see the module docstring."""

    def __init__(self, app, timeout_s: float):
        self.app = app
        self.timeout_s = timeout_s  # what the worker enforces; said in the 408's message

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        first = await receive()
        if first["type"] == "http.disconnect":
            return await send_timeout(scope, send, timeout_error(self.timeout_s))
        return await self.app(scope, BodyReceive(receive, first, self.timeout_s), send)


def timeout_error(timeout_s: float) -> RequestTimeout:
    return RequestTimeout(f"the request body did not arrive within {timeout_s:g} seconds", {"timeout_s": timeout_s})


async def send_timeout(scope: dict, send, exc: RequestTimeout) -> None:
    """The 408 answer, in the one error schema, for a body that never started."""
    body = orjson.dumps(error_body(exc.code, exc.message, request_id_of(scope), exc.details))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def request_id_of(scope: dict) -> str:
    """The client's X-Request-ID when it is sane (as app.http.middleware), else a fresh one."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            given = value.decode("latin-1")
            if SANE_REQUEST_ID.fullmatch(given):
                return given
    return os.urandom(6).hex() + "-timeout"
