"""conf/logs.py: one JSON object per line, request ids, masking, levels, gunicorn's logs and access log."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from types import SimpleNamespace

import pytest
from gunicorn.config import Config

from conf.logs import (
    ACCESS_FLUSH_S,
    MASK,
    PIPE_BUF,
    REQUEST_ID,
    AccessLog,
    GunicornJsonLogger,
    JsonFormatter,
    ProcessRole,
    Redactor,
    access_log_enabled,
    configure_logging,
    secret_values,
)
from conf.settings import load_settings

SECRET = "a-jwt-secret-of-more-than-32-bytes-0123456789"
TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXNpZ25hdHVyZQ"


@pytest.fixture
def stream():
    """The root logger writes JSON into a buffer during the test; logging is restored after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buffer = io.StringIO()
    configure_logging("info", [SECRET], stream=buffer)
    yield buffer
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.captureWarnings(False)


def lines(buffer: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_a_record_is_one_json_line_with_the_common_fields(stream):
    logging.getLogger("sira.test").info("model %s loaded", "m-1", extra={"model_id": "m-1", "latency_ms": 1.5})
    (entry,) = lines(stream)
    assert entry["message"] == "model m-1 loaded"
    assert entry["level"] == "info" and entry["logger"] == "sira.test"
    assert entry["service"] == "sira-inference" and entry["pod_id"]
    assert entry["pid"] == os.getpid() and entry["process"]
    assert entry["timestamp"].endswith("Z") and "T" in entry["timestamp"]
    assert entry["model_id"] == "m-1" and entry["latency_ms"] == 1.5
    assert "request_id" not in entry


def test_a_multiline_message_and_a_traceback_stay_on_one_line(stream):
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logging.getLogger("sira.test").exception("failed:\nsecond line")
    text = stream.getvalue()
    assert text.count("\n") == 1
    (entry,) = lines(stream)
    assert entry["message"] == "failed:\nsecond line"
    assert "ValueError: bad" in entry["exception"] and entry["level"] == "error"


def test_the_request_id_of_the_running_request_is_on_every_line(stream):
    token = REQUEST_ID.set("req-7")
    try:
        logging.getLogger("sira.test").warning("inside a request")
    finally:
        REQUEST_ID.reset(token)
    logging.getLogger("sira.test").warning("outside")
    inside, outside = lines(stream)
    assert inside["request_id"] == "req-7"
    assert "request_id" not in outside


def test_level_drops_lower_records_even_from_loggers_with_their_own_level(stream):
    configure_logging("warning", stream=stream)
    logging.getLogger("sira.test").info("dropped")
    access = logging.getLogger("gunicorn.access.test")
    access.setLevel(logging.INFO)  # gunicorn sets its access logger to INFO itself
    access.info("dropped too")
    logging.getLogger("sira.test").warning("kept")
    assert [entry["message"] for entry in lines(stream)] == ["kept"]


def test_secrets_bearer_tokens_and_jwts_are_masked(stream):
    log = logging.getLogger("sira.test")
    log.error("config %s", SECRET)
    log.error("header Authorization: Bearer opaque-token-value-123")
    log.error("got %s", TOKEN)
    log.error("quoted", extra={"detail": f'say "{SECRET}"'})
    text = stream.getvalue()
    assert SECRET not in text and "opaque-token-value-123" not in text and TOKEN not in text
    assert text.count(MASK) >= 4


def test_redactor_leaves_short_values_and_ordinary_text_alone():
    redact = Redactor(["short", "", "a-longer-secret-value"])
    assert redact("a short note about bearings") == "a short note about bearings"
    assert redact("x a-longer-secret-value y") == f"x {MASK} y"
    assert redact('"bearer abc.def"') == f'"bearer {MASK}"'


def test_secret_values_come_from_the_secret_settings_and_the_database_password():
    settings = load_settings({"JWT_SECRET": SECRET, "INTERNAL_SERVICE_TOKEN": "internal-token-0123456789",
                              "DATABASE_URL": "postgresql://sira:pg-password-42@db:5432/sira"})
    values = secret_values(settings)
    assert SECRET in values and "internal-token-0123456789" in values and "pg-password-42" in values


def test_process_role_is_named_per_pid():
    role = ProcessRole()
    role.set("writer")
    assert role.of(os.getpid()) == "writer"
    assert role.of(os.getpid() + 1) == "worker"  # a child that named no role: gunicorn's worker


def test_formatter_uses_the_role_of_the_process_that_logged():
    role = ProcessRole()
    role.set("supervisor")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    assert json.loads(JsonFormatter(role=role).format(record))["process"] == "supervisor"


def gunicorn_logger(accesslog: str | None) -> GunicornJsonLogger:
    cfg = Config()
    cfg.set("accesslog", accesslog)
    cfg.set("loglevel", "info")
    return GunicornJsonLogger(cfg)


def access_call(logger: GunicornJsonLogger) -> None:
    response = SimpleNamespace(status="200 OK", sent=274,
                               headers=[("content-type", "application/json"), ("X-Request-ID", "req-9")])
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/v1/infer", "QUERY_STRING": "token=zzz",
               "REMOTE_ADDR": "10.0.0.7", "HTTP_USER_AGENT": "client/1.0", "HTTP_AUTHORIZATION": f"Bearer {TOKEN}"}
    logger.access(response, SimpleNamespace(), environ, SimpleNamespace(seconds=0, microseconds=1500))


def test_gunicorn_access_line_has_the_request_fields_and_no_headers_or_query(stream):
    access_call(gunicorn_logger("-"))
    (entry,) = lines(stream)
    assert entry["logger"] == "gunicorn.access" and entry["message"] == "POST /v1/infer 200"
    assert entry["request_id"] == "req-9" and entry["status"] == 200 and entry["bytes"] == 274
    assert entry["duration_ms"] == 1.5 and entry["path"] == "/v1/infer"
    assert entry["remote_addr"] == "10.0.0.7" and entry["user_agent"] == "client/1.0"
    assert "zzz" not in stream.getvalue() and "eyJ" not in stream.getvalue()


def test_gunicorn_access_log_off_writes_nothing(stream):
    logger = gunicorn_logger(None)
    assert not logger.access_log_enabled
    access_call(logger)
    assert stream.getvalue() == ""


def test_gunicorn_error_log_goes_through_the_json_handler(stream):
    gunicorn_logger(None).info("Booting worker with pid: %s", 42)
    (entry,) = lines(stream)
    assert entry["logger"] == "gunicorn.error" and entry["message"] == "Booting worker with pid: 42"


@pytest.mark.parametrize("switch, level, expected", [
    (True, "INFO", True), (True, "DEBUG", True), (True, "WARNING", False), (False, "DEBUG", False)])
def test_access_log_needs_the_switch_and_an_info_level(switch, level, expected):
    assert access_log_enabled(switch, level) is expected


def test_access_lines_leave_in_pipe_sized_batches_cut_at_line_ends():
    writes: list[bytes] = []
    access = AccessLog(JsonFormatter(), writes.append)

    async def serve_requests():
        for index in range(40):
            access.add(f"GET /healthz 200 #{index}", {"path": "/healthz", "status": 200})
        assert writes, "a full batch is written without waiting"
        await asyncio.sleep(ACCESS_FLUSH_S + 0.1)  # the rest, once the delay has passed

    asyncio.run(serve_requests())
    assert len(writes) >= 2 and all(len(chunk) <= PIPE_BUF for chunk in writes)
    assert all(chunk.endswith(b"\n") for chunk in writes)
    lines = b"".join(writes).decode().splitlines()
    assert [json.loads(line)["message"] for line in lines] == [f"GET /healthz 200 #{i}" for i in range(40)]


def test_a_lone_access_line_waits_at_most_the_flush_delay():
    writes: list[bytes] = []
    access = AccessLog(JsonFormatter(), writes.append)

    async def one_request():
        access.add("GET /readyz 200", {"path": "/readyz", "status": 200})
        await asyncio.sleep(0)
        assert writes == []  # not one write() per line
        await asyncio.sleep(ACCESS_FLUSH_S + 0.1)

    asyncio.run(one_request())
    assert [json.loads(chunk)["message"] for chunk in writes] == ["GET /readyz 200"]


def test_access_line_outside_an_event_loop_is_written_at_once():
    writes: list[bytes] = []
    AccessLog(JsonFormatter(), writes.append).add("GET / 404", {"status": 404})
    (chunk,) = writes
    entry = json.loads(chunk)
    assert entry["logger"] == "gunicorn.access" and entry["level"] == "info" and entry["status"] == 404


def test_what_a_client_puts_in_an_access_line_is_scrubbed_too(stream):
    logger = gunicorn_logger("-")
    response = SimpleNamespace(status=404, sent=0, headers=[])
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": f"/v1/infer/{TOKEN}", "REMOTE_ADDR": "10.0.0.7",
               "HTTP_USER_AGENT": f"client {SECRET}"}
    logger.access(response, SimpleNamespace(), environ, SimpleNamespace(seconds=0, microseconds=10))
    text = stream.getvalue()
    assert TOKEN not in text and SECRET not in text
    (entry,) = lines(stream)
    assert entry["path"] == f"/v1/infer/{MASK}" and entry["message"] == f"GET /v1/infer/{MASK} 404"
