"""app/http/body_deadline.py as plain ASGI: a body cut off before its end is a 408, whoever was waiting for it.

The worker's deadline (workers/http_worker.py) shows up here as `http.disconnect` from receive.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from app.errors import RequestTimeout
from app.http.body_deadline import BodyDeadline

HTTP = {"type": "http", "headers": [(b"x-request-id", b"client-7")]}
DISCONNECT = {"type": "http.disconnect"}
ERROR_FIELDS = {"error_code", "message", "request_id", "timestamp", "details"}


def events(*items):
    queue = list(items)

    async def receive():
        return queue.pop(0)

    return receive


def run(app, scope, receive) -> list[dict]:
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    asyncio.run(BodyDeadline(app, 1.5)(scope, receive, send))
    return sent


def test_body_cut_off_before_it_starts_is_answered_408_without_calling_the_app():
    called = []

    async def app(scope, receive, send):
        called.append(scope)

    start, body = run(app, HTTP, events(DISCONNECT))
    assert called == []
    assert start["status"] == 408 and (b"connection", b"close") in start["headers"]
    answer = orjson.loads(body["body"])
    assert set(answer) == ERROR_FIELDS
    assert (answer["error_code"], answer["request_id"], answer["details"]) == ("REQUEST_TIMEOUT", "client-7",
                                                                              {"timeout_s": 1.5})


def test_insane_request_id_is_replaced_in_the_408():
    async def app(scope, receive, send):
        raise AssertionError("not called")

    scope = {"type": "http", "headers": [(b"x-request-id", b"bad id \xff")]}
    answer = orjson.loads(run(app, scope, events(DISCONNECT))[1]["body"])
    assert answer["request_id"].endswith("-timeout")


def test_body_cut_off_half_way_raises_request_timeout_in_the_app():
    seen = []

    async def app(scope, receive, send):
        seen.append(await receive())
        with pytest.raises(RequestTimeout):
            await receive()
        seen.append("408")

    run(app, HTTP, events({"type": "http.request", "body": b"{", "more_body": True}, DISCONNECT))
    assert seen == [{"type": "http.request", "body": b"{", "more_body": True}, "408"]


def test_a_complete_body_is_passed_on_and_a_later_disconnect_is_just_a_disconnect():
    seen = []

    async def app(scope, receive, send):
        seen.append(await receive())
        seen.append(await receive())
        seen.append(await receive())

    run(app, HTTP, events({"type": "http.request", "body": b"{", "more_body": True},
                          {"type": "http.request", "body": b"}", "more_body": False}, DISCONNECT))
    assert [event.get("body") for event in seen] == [b"{", b"}", None]
    assert seen[-1] == DISCONNECT


def test_lifespan_and_other_scopes_pass_through_untouched():
    seen = []

    async def app(scope, receive, send):
        seen.append((scope["type"], await receive()))

    run(app, {"type": "lifespan"}, events({"type": "lifespan.startup"}))
    assert seen == [("lifespan", {"type": "lifespan.startup"})]
