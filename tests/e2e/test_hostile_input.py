"""Hostile bodies and slow clients against one real two-worker `sira serve`: each gets its 4xx, or is cut off.

JSON that is deep, large, duplicated, out of float range or not UTF-8, bodies over the limit or never
sent, other media types, path traversal in ids, bodies and headers that arrive a byte at a time, a
thousand idle connections. The server (tests/fixtures/hostile.py) has 1-second header and body
timeouts. The module's last test checks that the server still answers and that nothing it logged is
a traceback or a 5xx. Hostile tokens are in tests/e2e/test_hostile_tokens.py.
"""

from __future__ import annotations

import json
import selectors
import socket
import time

import httpx
import pytest

from tests.fixtures.hostile import (  # noqa: F401 (fixtures)
    ERROR_FIELDS,
    assert_error,
    assert_server_whole,
    auth,
    claims,
    client_fixture,
    event,
    hs256,
    rsa_key_fixture,
    server_fixture,
)

SLOW_DEADLINE_S = 30.0  # the longest a test waits for the server to give up on a slow client (it takes ~1 s)


def post_raw(client: httpx.Client, body: bytes, content_type: str = "application/json", **headers):
    return client.post("/v1/infer", content=body, headers={"Content-Type": content_type, **headers})


# --- JSON -----------------------------------------------------------------------------------------

HOSTILE_BODIES = [
    # (what, body, status, code)
    ("100,000 nested arrays", b"[" * 100_000 + b"]" * 100_000, 400, "INVALID_REQUEST"),
    ("nesting past orjson's 1024 levels inside an event", json.dumps(event()).encode()[:-1]
     + b', "deep": ' + b"[" * 1025 + b"]" * 1025 + b"}", 400, "INVALID_REQUEST"),
    ("1e400", b'{"event_id": "e", "product": "fraud_score", "payload": {"amount": 1e400}}', 400, "INVALID_REQUEST"),
    ("-1e400", b'{"event_id": "e", "product": "fraud_score", "payload": {"amount": -1e400}}', 400,
     "INVALID_REQUEST"),
    ("Infinity", b'{"event_id": "e", "product": "fraud_score", "payload": {"amount": Infinity}}', 400,
     "INVALID_REQUEST"),
    ("-Infinity", b'{"event_id": "e", "product": "fraud_score", "payload": {"amount": -Infinity}}', 400,
     "INVALID_REQUEST"),
    ("NaN as the timeout", (b'{"event_id": "e", "product": "fraud_score", "payload": {}, "options": '
                            b'{"timeout_ms": NaN}}'), 400, "INVALID_REQUEST"),
    ("2**64 - 1 as the amount", (b'{"event_id": "e", "product": "fraud_score", "payload": {"amount": '
                                 b'18446744073709551615, "currency": "USD", "country": "US", '
                                 b'"payment_method": "card"}}'), 400, "FEATURE_VALIDATION_FAILED"),
    ("a 30-digit integer as the hour", json.dumps(event(features={"hour_of_day": 0})).encode().replace(
        b'"hour_of_day": 0', b'"hour_of_day": 123456789012345678901234567890'), 400, "FEATURE_VALIDATION_FAILED"),
    ("1e308 as the timeout", (b'{"event_id": "e", "product": "fraud_score", "payload": {}, "options": '
                              b'{"timeout_ms": 1e308}}'), 400, "INVALID_REQUEST"),
    ("invalid UTF-8 inside a string", b'{"event_id": "e\xff\xfe", "product": "fraud_score", "payload": {}}', 400,
     "INVALID_REQUEST"),
    ("overlong UTF-8 of '/'", b'{"event_id": "e\xc0\xaf", "product": "fraud_score", "payload": {}}', 400,
     "INVALID_REQUEST"),
    ("UTF-8 encoded surrogate", b'{"event_id": "e\xed\xa0\x80", "product": "fraud_score", "payload": {}}', 400,
     "INVALID_REQUEST"),
    ("lone surrogate escape", b'{"event_id": "e\\ud800", "product": "fraud_score", "payload": {}}', 400,
     "INVALID_REQUEST"),
    ("latin-1 bytes", '{"event_id": "é", "product": "fraud_score", "payload": {}}'.encode("latin-1"), 400,
     "INVALID_REQUEST"),
    ("NUL in the event id", b'{"event_id": "a\\u0000b", "product": "fraud_score", "payload": {}}', 400,
     "INVALID_REQUEST"),
    ("duplicate keys: the last event_id (a number) counts",
     b'{"event_id": "fine", "event_id": 5, "product": "fraud_score", "payload": {}}', 400, "INVALID_REQUEST"),
    ("JSON followed by more JSON", json.dumps(event()).encode() + b'{"x": 1}', 400, "INVALID_REQUEST"),
    ("a bare NUL byte", b"\x00", 400, "INVALID_REQUEST"),
]


@pytest.mark.parametrize("what, body, status, code", HOSTILE_BODIES, ids=[case[0] for case in HOSTILE_BODIES])
def test_hostile_json_gets_its_4xx(client, what, body, status, code):
    assert_error(post_raw(client, body), status, code)


def test_duplicate_keys_take_the_last_value(client):
    """orjson keeps the last of duplicate keys (as Python's json does); a valid last value is scored."""
    body = json.dumps(event()).encode().replace(b'"amount": 42.0', b'"amount": "forty-two", "amount": 42.0')
    assert b"forty-two" in body
    assert post_raw(client, body).status_code == 200


def test_tiny_and_negative_zero_numbers_are_scored(client):
    body = json.dumps(event(features={"hour_of_day": 0})).encode()
    body = body.replace(b'"amount": 42.0', b'"amount": 1e-400').replace(b'"hour_of_day": 0', b'"hour_of_day": -0.0')
    assert post_raw(client, body).status_code == 200


def test_nesting_within_orjsons_limit_in_an_ignored_field_is_scored(client):
    body = json.dumps(event()).encode()[:-1] + b', "deep": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    assert post_raw(client, body).status_code == 200


def test_body_at_the_limit_with_80000_keys_is_scored(server):
    limit = 1_048_576
    body = json.dumps({**event(), "padding": {f"k{key}": 0 for key in range(80_000)}}).encode()
    body = body[:-1] + b" " * (limit - len(body)) + b"}"
    assert len(body) == limit
    # A fresh connection: gunicorn 27 with gunicorn-h1c and uvloop sometimes closes a kept-alive
    # connection after a large body (remaining_truncated), and the next request on it gets no answer.
    response = httpx.post(server.url + "/v1/infer", content=body, timeout=15,
                          headers={"Content-Type": "application/json", **auth(hs256())})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("declared", [1_048_577, 104_857_600])
def test_body_declared_over_the_limit_is_413_after_its_first_bytes(server, declared):
    """The answer comes without reading the rest (the client stops sending, so no reset races it)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {hs256()}\r\nContent-Length: {declared}\r\n\r\n".encode()
                     + b"[" + b" " * 65535)
        status, body = read_response(sock)
    assert (status, json.loads(body)["error_code"]) == (413, "PAYLOAD_TOO_LARGE")


def test_body_declared_but_never_sent_is_408(server):
    """Falcon waits for the first body bytes before running anything: the body deadline answers."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"X-Request-ID: never-sent-1\r\n"
                     + f"Authorization: Bearer {hs256()}\r\n".encode() + b"Content-Length: 104857600\r\n\r\n")
        sock.settimeout(SLOW_DEADLINE_S)
        status, body = read_response(sock)
        assert closed_by_server(sock)
    answer = json.loads(body)
    assert (status, answer["error_code"], answer["request_id"]) == (408, "REQUEST_TIMEOUT", "never-sent-1")
    assert set(answer) == ERROR_FIELDS


@pytest.mark.parametrize("content_type", ["application/jsonx", "text/json", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_other_media_types_are_415(client, content_type):
    assert_error(post_raw(client, json.dumps(event()).encode(), content_type), 415, "UNSUPPORTED_MEDIA_TYPE")


def test_chunked_body_without_length_is_411(client):
    def chunks():
        yield json.dumps(event()).encode()

    response = client.post("/v1/infer", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(response, 411, "INVALID_REQUEST")


@pytest.mark.parametrize("path, status, code", [
    ("/v1/infer/..%5c..%5cwin.ini", 400, "INVALID_REQUEST"),  # one path segment: a malformed prediction id
    ("/v1/infer/%2e%2e%2f%2e%2e%2fetc%2fpasswd", 404, "NOT_FOUND"),  # decoded before routing: no such route
    ("/v1/models/%2e%2e%2f%2e%2e%2fetc%2fpasswd/promote", 404, "NOT_FOUND"),
    ("/v1/models/..%5cx/promote", 400, "INVALID_REQUEST"),
])
def test_path_traversal_in_ids_gets_a_4xx(server, path, status, code):
    headers = auth(hs256(claims(role="ml_ops")))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        method = "POST" if path.endswith("promote") else "GET"
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {headers['Authorization']}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}".encode())
        answer = read_response(sock)
    assert (answer[0], json.loads(answer[1])["error_code"]) == (status, code), answer


# --- slow and idle clients --------------------------------------------------------------------------


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), body


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed (EOF or reset); False when it did not within SLOW_DEADLINE_S."""
    sock.settimeout(SLOW_DEADLINE_S)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_body_sent_a_byte_at_a_time_gets_408_and_the_connection_is_closed(server):
    body = json.dumps(event()).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {hs256()}\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        sock.setblocking(False)
        answer, sent, deadline = b"", 0, time.monotonic() + SLOW_DEADLINE_S
        while b"\r\n\r\n" not in answer and sent < len(body) and time.monotonic() < deadline:
            sock.send(body[sent:sent + 1])
            sent += 1
            time.sleep(0.1)
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
        sock.setblocking(True)
        assert sent < len(body), "the whole body went through: the server never gave up"
        sock.settimeout(10)
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), head
        assert b"connection: close" in head.lower()
        assert closed_by_server(sock)
    assert json.loads(rest)["error_code"] == "REQUEST_TIMEOUT"


def test_body_shorter_than_its_content_length_gets_408(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {hs256()}\r\n".encode() + b"Content-Length: 500\r\n\r\n{\"event_id\"")
        sock.settimeout(SLOW_DEADLINE_S)
        status, body = read_response(sock)
    assert (status, json.loads(body)["error_code"]) == (408, "REQUEST_TIMEOUT")


def test_headers_sent_a_line_at_a_time_slowloris_are_cut_off(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\n")
        closed, lines, deadline = False, 0, time.monotonic() + SLOW_DEADLINE_S
        while not closed and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                sock.sendall(f"X-Slow-{lines}: {'a' * 10}\r\n".encode())
                lines += 1
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        assert closed or closed_by_server(sock), "the server waited for the headers forever"
    assert lines < 100  # ~5 lines a second against a 1 s header timeout


def test_silent_connection_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        assert closed_by_server(sock)


def test_a_thousand_idle_connections_do_not_stop_another_client_and_are_all_closed(server):
    idle = []
    try:
        for _ in range(1000):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        response = httpx.post(server.url + "/v1/infer", json=event(), headers=auth(hs256()), timeout=15)
        assert response.status_code == 200, response.text
        assert count_closed_by_server(idle) == 1000
    finally:
        for sock in idle:
            sock.close()


def count_closed_by_server(sockets: list[socket.socket]) -> int:
    """How many of the sockets the server closed within SLOW_DEADLINE_S (read EOF or reset)."""
    selector = selectors.DefaultSelector()
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    closed, deadline = 0, time.monotonic() + SLOW_DEADLINE_S
    while closed < len(sockets) and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=1.0):
            try:
                data = key.fileobj.recv(4096)
            except ConnectionResetError:
                data = b""
            if not data:
                closed += 1
                selector.unregister(key.fileobj)
    selector.close()
    return closed


# --- after all of it ------------------------------------------------------------------------------


def test_zz_server_still_answers_and_logged_no_traceback_or_5xx(server, client):
    """Runs last (file order): whatever came before left the server whole."""
    assert_server_whole(server, client, refused_status="400")
