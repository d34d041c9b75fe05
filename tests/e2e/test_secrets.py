"""The server's secrets never leave it: not in its log, its answers, /metrics, /openapi.json, /docs or `sira config`.

One server runs at LOG_LEVEL=debug with the access log on, with a JWT secret, an internal token and
a database password that are random and recognisable (the test Postgres trusts local connections,
so the password is accepted and ignored: the server works while holding it). It is sent requests
whose credentials are, or are built from, those secrets. Everything it wrote or answered is then
searched for them. Client input the API echoes by design (X-Request-ID, query values in errors) is
not sent with secrets: that would only find the client's own bytes.

The redactor of conf/logs.py masks only values of 8 characters or more; these secrets are longer.
"""

from __future__ import annotations

import base64
import secrets
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import httpx
import jwt
import pytest

from tests.fixtures.postgres import create_database, drop_database, unique_database_name
from tests.fixtures.server import SiraServer, free_port, run_sira, sira_env

JWT_SECRET = "jwt-secret-" + secrets.token_hex(20)
INTERNAL_TOKEN = "internal-token-" + secrets.token_hex(16)
DB_PASSWORD = "db-password-" + secrets.token_hex(12)
SECRETS = {"JWT_SECRET": JWT_SECRET, "INTERNAL_SERVICE_TOKEN": INTERNAL_TOKEN, "database password": DB_PASSWORD}


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user.split(':')[0]}:{password}@{host}"))


def event() -> dict:
    return {"event_id": str(uuid.uuid4()), "product": "fraud_score",
            "payload": {"amount": 10.0, "currency": "USD", "country": "US", "payment_method": "card"}}


def hostile_credentials() -> list[str]:
    """Authorization headers made of, or signed with, the secrets (and near misses of them)."""
    signed_with_secret = jwt.encode({"sub": "x", "role": "sira_service", "exp": 9999999999}, JWT_SECRET,
                                    algorithm="HS256", headers={"kid": "no-such-kid"})
    claiming_secret = jwt.encode({"sub": JWT_SECRET, "role": INTERNAL_TOKEN, "exp": 1}, "x" * 40, algorithm="HS256")
    return [
        f"Bearer {JWT_SECRET}", f"Bearer {INTERNAL_TOKEN}x", f"Bearer x{INTERNAL_TOKEN}", f"Bearer {DB_PASSWORD}",
        f"Basic {base64.b64encode(f'sira:{DB_PASSWORD}'.encode()).decode()}", f"Bearer {signed_with_secret}",
        f"Bearer {claiming_secret}", f"Bearer {JWT_SECRET}.{INTERNAL_TOKEN}.{DB_PASSWORD}", JWT_SECRET,
    ]


@pytest.fixture(scope="module")
def exposed(tmp_path_factory, pg_url) -> dict[str, str]:
    """Every text the server and the CLI showed, by where it was seen."""
    name = unique_database_name("sira_secrets")
    dsn = with_password(create_database(pg_url, name), DB_PASSWORD)
    port = free_port()
    data_dir = str(tmp_path_factory.mktemp("secrets"))
    env = sira_env(SIRA_DATA_DIR=data_dir, SIRA_BIND=f"127.0.0.1:{port}", SIRA_WORKERS="2", DATABASE_URL=dsn,
                   JWT_SECRET=JWT_SECRET, INTERNAL_SERVICE_TOKEN=INTERNAL_TOKEN, LOG_LEVEL="debug",
                   SIRA_ACCESS_LOG="on", SIRA_RATE_LIMITS="anonymous=unlimited")
    server = SiraServer(data_dir, env, port)
    seen: dict[str, str] = {}
    try:
        server.start()
        internal = {"Authorization": f"Bearer {INTERNAL_TOKEN}"}
        with httpx.Client(base_url=server.url, timeout=15) as client:
            assert client.post("/v1/infer", json=event(), headers=internal).status_code == 200
            answers = []
            for credentials in hostile_credentials():
                response = client.post("/v1/infer", json=event(), headers={"Authorization": credentials})
                assert response.status_code == 401, response.text
                answers.append(response)
            answers += [
                client.get(f"/v1/infer/{uuid.uuid4()}", headers=internal),  # reads Postgres: 404
                client.get("/v1/models", headers=internal),  # reads Postgres: 200
                client.post(f"/v1/models/{uuid.uuid4()}/promote", json={"target": "production"}, headers=internal),
                client.post("/v1/infer", content=b"{broken", headers={**internal, "Content-Type": "application/json"}),
                client.post("/v1/infer/batch", json={"events": [event(), "x"]}, headers=internal),
                client.get("/v1/models", headers={"Authorization": f"Bearer {JWT_SECRET}"}),
            ]
            seen["answers"] = "\n".join(f"{r.status_code} {dict(r.headers)} {r.text}" for r in answers)
            for path in ("/metrics", "/openapi.json", "/docs", "/readyz", "/healthz"):
                response = client.get(path)
                assert response.status_code == 200, path
                seen[path] = response.text
        for args in (["config"], ["config", "--json"]):
            result = run_sira(*args, env=env)
            assert result.returncode == 0, result.stderr
            seen["sira " + " ".join(args)] = result.stdout + result.stderr
        assert server.stop() == 0
        seen["server log"] = server.log()
    finally:
        server.stop()
        drop_database(pg_url, name)
    return seen


@pytest.mark.parametrize("where", ["answers", "/metrics", "/openapi.json", "/docs", "/readyz", "/healthz",
                                   "sira config", "sira config --json", "server log"])
def test_no_secret_is_shown(exposed, where):
    text = exposed[where]
    assert text, f"nothing was captured from {where}"
    leaked = [name for name, value in SECRETS.items() if value in text]
    assert leaked == [], f"{leaked} in {where}"


def test_sira_config_shows_that_the_secrets_are_set_and_masked(exposed):
    text = exposed["sira config"]
    for variable in ("JWT_SECRET", "INTERNAL_SERVICE_TOKEN", "DATABASE_URL"):
        line = next(line for line in text.splitlines() if line.split()[:1] == [variable])
        assert "****" in line, line


def test_the_hostile_requests_reached_the_log(exposed):
    """So the search above looked at lines written about them (access log on)."""
    refused = [line for line in exposed["server log"].splitlines()
               if '"logger":"gunicorn.access"' in line and '"status":401' in line]
    assert len(refused) >= len(hostile_credentials()) + 1


def test_unreachable_database_error_does_not_show_its_password(tmp_path):
    """`sira migrate` fails and says so; the password is never in what it prints."""
    closed_port = free_port()
    env = sira_env(SIRA_DATA_DIR=str(tmp_path), SIRA_BIND=f"127.0.0.1:{free_port()}", JWT_SECRET=JWT_SECRET,
                   DATABASE_URL=f"postgresql://sira:{DB_PASSWORD}@127.0.0.1:{closed_port}/sira?connect_timeout=2")
    result = run_sira("migrate", env=env, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip(), "the failure is said"
    assert DB_PASSWORD not in result.stdout + result.stderr
    assert JWT_SECRET not in result.stdout + result.stderr


def test_serving_without_its_database_never_shows_the_password(tmp_path):
    """`sira serve` starts without an unreachable Postgres and waits for it; its logs name no password."""
    port, closed_port = free_port(), free_port()
    env = sira_env(SIRA_DATA_DIR=str(tmp_path), SIRA_BIND=f"127.0.0.1:{port}", SIRA_WORKERS="1",
                   JWT_SECRET=JWT_SECRET,
                   DATABASE_URL=f"postgresql://sira:{DB_PASSWORD}@127.0.0.1:{closed_port}/sira?connect_timeout=2")
    server = SiraServer(str(tmp_path), env, port)
    try:
        server.start(wait_ready=False)
        ready = httpx.get(server.url + "/readyz", timeout=5)
        assert ready.status_code == 503 and "postgres unreachable" in ready.text
        deadline = time.monotonic() + 60
        while "cannot prepare the database" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        server.stop()
    log = server.log()
    assert "cannot prepare the database" in log  # the failure is said
    assert DB_PASSWORD not in log and JWT_SECRET not in log
