"""TLS and mutual TLS on a real `sira serve`, with certificates made by the test (tests/fixtures/tls.py).

TLS: https answers with the CA, the ops port (METRICS_BIND) speaks TLS too, cleartext gets nothing.
Mutual TLS (required): no client certificate, or one signed by another CA, fails the handshake; a
client certificate of the CA gets 200 on /v1/infer, and still needs its bearer token.
A worker whose TLS context fails to build stops the server rather than serving cleartext.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import time
import uuid

import httpx
import pytest

from tests.fixtures.server import REPO, SIRA, bearer, free_port, run_sira, sira_env
from tests.fixtures.tls import TlsFiles

HANDSHAKE_FAILURES = (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError)


def event() -> dict:
    return {"event_id": str(uuid.uuid4()), "product": "fraud_score",
            "payload": {"amount": 12.5, "currency": "USD", "country": "US", "payment_method": "card"}}


def tls_env(files: TlsFiles, **more: str) -> dict[str, str]:
    return {"SIRA_TLS_CERT": files.server_cert, "SIRA_TLS_KEY": files.server_key, **more}


def test_tls_server_answers_https_on_both_listeners_and_nothing_in_cleartext(server_factory, tls_files):
    metrics_port = free_port()
    server = server_factory(workers=1, tls=tls_files.client_context(), METRICS_BIND=f"127.0.0.1:{metrics_port}",
                            **tls_env(tls_files))
    assert server.url.startswith("https://")
    with httpx.Client(verify=tls_files.client_context(), timeout=10) as client:
        response = client.post(server.url + "/v1/infer", json=event(), headers=bearer())
        assert response.status_code == 200, response.text
        assert client.get(f"https://127.0.0.1:{metrics_port}/metrics").status_code == 200
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(server.url + "/healthz", timeout=5)  # the system CAs do not know the test CA
    for port in (server.port, metrics_port):
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


@pytest.fixture
def mtls_server(server_factory, tls_files):
    context = tls_files.client_context(tls_files.client_cert, tls_files.client_key)
    return server_factory(workers=1, tls=context,
                          **tls_env(tls_files, SIRA_TLS_CA=tls_files.ca, SIRA_TLS_CLIENT_AUTH="required"))


def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(mtls_server, tls_files):
    without_cert = tls_files.client_context()
    other_ca_cert = tls_files.client_context(tls_files.other_client_cert, tls_files.other_client_key)
    for context in (without_cert, other_ca_cert):
        with pytest.raises(HANDSHAKE_FAILURES):
            httpx.post(mtls_server.url + "/v1/infer", json=event(), headers=bearer(), verify=context, timeout=5)


def test_mutual_tls_handshake_alert_names_the_missing_certificate(mtls_server, tls_files):
    """Below httpx: the server's alert itself, on a raw TLS socket."""
    import socket

    context = tls_files.client_context()
    with socket.create_connection(("127.0.0.1", mtls_server.port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls, \
            pytest.raises((ssl.SSLError, ConnectionResetError)) as caught:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert tls.recv(100) == b"", "no answer without a client certificate"
            raise ConnectionResetError("closed without an alert")
    if isinstance(caught.value, ssl.SSLError):
        assert "CERTIFICATE_REQUIRED" in str(caught.value) or "alert" in str(caught.value).lower()


def test_mutual_tls_client_with_a_certificate_of_the_ca_is_served_and_still_needs_its_token(mtls_server, tls_files):
    context = tls_files.client_context(tls_files.client_cert, tls_files.client_key)
    with httpx.Client(verify=context, timeout=10) as client:
        response = client.post(mtls_server.url + "/v1/infer", json=event(), headers=bearer())
        assert response.status_code == 200, response.text
        assert response.json()["decision"] in {"allow", "review", "block"}
        refused = client.post(mtls_server.url + "/v1/infer", json=event())
        assert refused.status_code == 401 and refused.json()["error_code"] == "UNAUTHORIZED"


@pytest.mark.parametrize("settings, variable", [
    (lambda f: {"SIRA_TLS_CERT": f.server_cert, "SIRA_TLS_KEY": f.stray_key}, "SIRA_TLS_KEY"),
    (lambda f: {"SIRA_TLS_CERT": f.server_cert, "SIRA_TLS_KEY": "/no/such.key"}, "SIRA_TLS_KEY"),
    (lambda f: {"SIRA_TLS_CERT": f.server_cert, "SIRA_TLS_KEY": f.server_key, "SIRA_TLS_CA": f.ca},
     "SIRA_TLS_CLIENT_AUTH"),
    (lambda f: {"SIRA_TLS_CERT": f.server_cert, "SIRA_TLS_KEY": f.server_key, "SIRA_TLS_CLIENT_AUTH": "required"},
     "SIRA_TLS_CA"),
])
def test_bad_tls_settings_stop_sira_serve_with_one_line_and_exit_2(tls_files, tmp_path, settings, variable):
    env = sira_env(SIRA_DATA_DIR=str(tmp_path), SIRA_BIND=f"127.0.0.1:{free_port()}", **settings(tls_files))
    result = run_sira("serve", env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0], result.stderr
    assert not os.path.exists(tmp_path / "pg"), "nothing may start before the settings are checked"


def test_worker_without_its_tls_context_stops_the_server_instead_of_serving_cleartext(tls_files, tmp_path, fresh_db):
    """An ssl_context hook that raises stands for any failure in the worker (a file changed since the check)."""
    hook = tmp_path / "gunicorn_conf.py"
    hook.write_text("def ssl_context(config, default_factory):\n    raise RuntimeError('no context today')\n")
    port = free_port()
    env = sira_env(SIRA_DATA_DIR=str(tmp_path / "data"), SIRA_BIND=f"127.0.0.1:{port}", SIRA_WORKERS="1",
                   DATABASE_URL=fresh_db, SIRA_GUNICORN_CONFIG=str(hook), **tls_env(tls_files))
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([*SIRA, "serve"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    answered = []
    try:
        deadline = time.monotonic() + 90
        while process.poll() is None and time.monotonic() < deadline:
            try:
                answered.append(httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code)
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    log_text = log_path.read_text(errors="replace")
    assert answered == [], "a worker served cleartext on the TLS port"
    assert process.returncode not in (0, None), log_text
    assert "cannot build the TLS context" in log_text
