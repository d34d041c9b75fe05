"""The logs of a real `sira serve`: JSON lines from every process, an access log, no token, secret or payload.

The server runs at LOG_LEVEL=debug with the access log on (the most it ever writes), gets requests
that carry tokens and payload values that are easy to recognise, and its whole log is read after a
clean stop.
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.fixtures.postgres import create_database, drop_database, unique_database_name
from tests.fixtures.server import TEST_INTERNAL_TOKEN, TEST_JWT_SECRET, SiraServer, free_port, make_token, sira_env

FIELDS = {"timestamp", "level", "logger", "message", "service", "pod_id", "process", "pid"}
PAYLOAD_MARK = "Zq7PayloadMark"  # in payload values only: it must never reach the log
QUERY_MARK = "Zq7QueryMark"


def event(**payload) -> dict:
    body = {"amount": 42.0, "currency": "USD", "country": "US", "payment_method": "card"}
    body.update(payload)
    return {"event_id": str(uuid.uuid4()), "product": "fraud_score", "payload": body}


def start_server(pg_url: str, tmp_path_factory, **settings: str):
    name = unique_database_name("sira_logs")
    dsn = create_database(pg_url, name)
    port = free_port()
    data_dir = str(tmp_path_factory.mktemp("logs"))
    env = sira_env(SIRA_DATA_DIR=data_dir, SIRA_BIND=f"127.0.0.1:{port}", SIRA_WORKERS="2", DATABASE_URL=dsn,
                   JWT_SECRET=TEST_JWT_SECRET, INTERNAL_SERVICE_TOKEN=TEST_INTERNAL_TOKEN, **settings)
    return SiraServer(data_dir, env, port), name


@pytest.fixture(scope="module")
def logged(tmp_path_factory, pg_url):
    """(the server's log lines after a clean stop, what was sent: tokens and the responses)."""
    server, name = start_server(pg_url, tmp_path_factory, LOG_LEVEL="debug", SIRA_ACCESS_LOG="on")
    jwt = make_token("sira_service", subject="log-test")
    forged = make_token("sira_service", subject="forged")[:-6] + "AAAAAA"
    responses = []
    try:
        server.start()
        with httpx.Client(base_url=server.url, timeout=10) as client:
            as_service = {"Authorization": f"Bearer {jwt}"}
            responses.append(client.post("/v1/infer", headers=as_service, json=event(currency=PAYLOAD_MARK)))
            responses.append(client.post("/v1/infer", headers=as_service, json=event(amount=PAYLOAD_MARK)))
            responses.append(client.post("/v1/infer", headers=as_service, json=event(amount=1e12,
                                                                                      country=PAYLOAD_MARK)))
            responses.append(client.post("/v1/infer/batch", headers=as_service,
                                         json={"events": [event(country=PAYLOAD_MARK), PAYLOAD_MARK]}))
            responses.append(client.post("/v1/infer", headers={**as_service, "Content-Type": "application/json"},
                                         content=b'{"payload": "' + PAYLOAD_MARK.encode() + b'", broken'))
            responses.append(client.post("/v1/infer", headers={"Authorization": f"Bearer {forged}"},
                                         json=event(country=PAYLOAD_MARK)))
            responses.append(client.post("/v1/infer", headers={"Authorization": f"Bearer {TEST_INTERNAL_TOKEN}"},
                                         json=event(country=PAYLOAD_MARK)))
            responses.append(client.get("/readyz", params={"token": QUERY_MARK}, headers={"X-Request-ID": "log-42"}))
        assert server.stop() == 0
        lines = server.log().splitlines()
    finally:
        server.stop()
        drop_database(pg_url, name)
    return lines, {"jwt": jwt, "forged": forged}, responses


def test_every_line_is_one_json_object_with_the_common_fields(logged):
    lines, _, _ = logged
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert FIELDS <= set(entry), line
        assert entry["service"] == "sira-inference"
        assert entry["timestamp"].endswith("Z")


def test_no_token_secret_or_payload_value_reaches_the_log(logged):
    lines, tokens, responses = logged
    assert [r.status_code for r in responses] == [200, 400, 400, 200, 400, 401, 200, 200]
    text = "\n".join(lines)
    for secret in (TEST_JWT_SECRET, TEST_INTERNAL_TOKEN, tokens["jwt"], tokens["forged"], PAYLOAD_MARK, QUERY_MARK):
        assert secret not in text, f"{secret[:12]}... is in the log"
    for part in tokens["jwt"].split("."):  # not even a piece of the token
        assert part not in text


def test_access_log_has_one_line_per_request_with_its_request_id(logged):
    lines, _, responses = logged
    access = [json.loads(line) for line in lines if '"logger":"gunicorn.access"' in line]
    by_id = {entry["request_id"]: entry for entry in access}
    for response in responses:
        entry = by_id[response.headers["x-request-id"]]
        assert entry["status"] == response.status_code
        assert entry["method"] == response.request.method
        assert entry["path"] == response.request.url.path  # never the query string
        assert entry["duration_ms"] >= 0 and entry["level"] == "info"
    assert by_id["log-42"]["path"] == "/readyz"


def test_every_process_logs_under_its_own_role(logged):
    lines, _, _ = logged
    roles = {json.loads(line)["process"] for line in lines}
    assert {"master", "worker", "supervisor", "writer"} <= roles, roles
    worker_pids = {json.loads(line)["pid"] for line in lines if '"process":"worker"' in line}
    assert len(worker_pids) >= 2


def test_log_level_warning_drops_info_lines(tmp_path_factory, pg_url):
    server, name = start_server(pg_url, tmp_path_factory, LOG_LEVEL="warning", SIRA_ACCESS_LOG="on")
    try:
        server.start()
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
        assert server.stop() == 0
        levels = {json.loads(line)["level"] for line in server.log().splitlines()}
    finally:
        server.stop()
        drop_database(pg_url, name)
    assert not levels & {"debug", "info"}, levels
