"""Readiness per product, and RS256/ES256 client keys chosen by kid, on a real `sira serve`."""

from __future__ import annotations

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from app.auth.keys import mint_token
from tests.e2e.test_infer import assert_error, event
from tests.fixtures.server import bearer, run_sira


def test_not_ready_until_every_product_has_a_loadable_production_model(server_factory, fresh_db):
    """A product whose production model cannot be loaded keeps /readyz at 503; the others still score."""
    server_factory(workers=1).stop()  # first start: the demo model becomes fraud_score's production model
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO siramodel_registry (name, version, product, status, storage_key, sha256, size_bytes,
                                               feature_spec, threshold)
               VALUES ('missing', 'v1', 'chargeback_risk', 'production', 'models/absent.onnx', %s, 10, '{}', 0.5)""",
            ("0" * 64,))
    server = server_factory(workers=1, wait_ready=False)
    body = assert_error(httpx.get(server.url + "/readyz"), 503, "SERVICE_UNAVAILABLE")
    assert body["details"]["missing_products"] == ["chargeback_risk"]
    assert httpx.post(server.url + "/v1/infer", json=event(), headers=bearer()).status_code == 200


def private_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def asymmetric_keys(tmp_path):
    keys = {"rsa-1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec-1": ec.generate_private_key(ec.SECP256R1())}
    files = {}
    for kid, key in keys.items():
        (tmp_path / f"{kid}.pub.pem").write_bytes(public_pem(key))
        (tmp_path / f"{kid}.key.pem").write_bytes(private_pem(key))
        files[kid] = tmp_path / f"{kid}.pub.pem"
    return keys, files


def test_rs256_and_es256_tokens_are_accepted_by_their_kid(server_factory, asymmetric_keys, tmp_path):
    keys, files = asymmetric_keys
    server = server_factory(workers=1, JWT_PUBLIC_KEYS=",".join(f"{kid}={path}" for kid, path in files.items()))
    for kid, _algorithm in (("rsa-1", "RS256"), ("ec-1", "ES256")):
        minted = run_sira("token", "--role", "fraud_analyst", "--sub", "analyst", "--kid", kid,
                          "--private-key", str(tmp_path / f"{kid}.key.pem"), env=server.env)
        assert minted.returncode == 0, minted.stderr
        headers = {"Authorization": f"Bearer {minted.stdout.strip()}"}
        assert httpx.post(server.url + "/v1/infer", json=event(), headers=headers).status_code == 200
    # The RSA key's token presented under the EC key's kid, and a key nobody configured: refused.
    wrong_kid = mint_token(role="fraud_analyst", subject="x", ttl_s=60, private_key_pem=private_pem(keys["rsa-1"]),
                           algorithm="RS256", kid="ec-1")
    stranger = mint_token(role="fraud_analyst", subject="x", ttl_s=60, algorithm="RS256", kid="rsa-1",
                          private_key_pem=private_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    for token in (wrong_kid, stranger):
        response = httpx.post(server.url + "/v1/infer", json=event(), headers={"Authorization": f"Bearer {token}"})
        assert_error(response, 401, "UNAUTHORIZED")


def test_a_key_file_that_is_not_a_public_key_stops_the_server(tmp_path, fresh_db):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key\n")
    from tests.fixtures.server import free_port, sira_env

    env = sira_env(SIRA_DATA_DIR=str(tmp_path / "data"), SIRA_BIND=f"127.0.0.1:{free_port()}",
                   DATABASE_URL=fresh_db, JWT_SECRET="x" * 40, JWT_PUBLIC_KEYS=f"k1={bad}")
    result = run_sira("serve", env=env, timeout=60)
    assert result.returncode == 2
    assert "JWT_PUBLIC_KEYS" in result.stderr and "bad.pem" in result.stderr
    assert not (tmp_path / "data").exists(), "nothing may start before the key files are checked"
