"""Hostile tokens and Authorization headers against one real two-worker `sira serve`: each gets its exact 4xx.

JWT attacks beyond tests/e2e/test_infer.py's: key confusion, `alg: none`, time, issuer and audience
claims, sizes, garbage, raw non-ASCII header bytes, a header past gunicorn's field limit. The server
(tests/fixtures/hostile.py) trusts an RS256 key besides the HS256 secret, so a refusal is about the
attack, not a key that never works. Hostile bodies and slow clients are in tests/e2e/test_hostile_input.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import httpx
import jwt
import pytest

from tests.fixtures.hostile import (  # noqa: F401 (fixtures)
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


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed_hs256(header: dict, payload: dict, secret: bytes) -> str:
    """What pyjwt refuses to make: an HMAC token keyed with whatever bytes we like (a public key's PEM)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


# --- JWT ------------------------------------------------------------------------------------------


def test_tokens_of_every_configured_key_are_accepted(client, server, rsa_key):
    """The control case: the refusals below are about the attack, not a key that never works."""
    assert client.post("/v1/infer", json=event()).status_code == 200
    rs256 = jwt.encode(claims(), rsa_key[0], algorithm="RS256", headers={"kid": "rsa1"})
    assert httpx.post(server.url + "/v1/infer", json=event(), headers=auth(rs256)).status_code == 200


def jwt_attacks(rsa_key) -> dict[str, str]:
    private_key, public_pem, _ = rsa_key
    none_header = {"alg": "none", "typ": "JWT", "kid": "rsa1"}
    return {
        "alg none naming the RSA key": f"{b64(json.dumps(none_header).encode())}.{b64(json.dumps(claims()).encode())}.",
        "HS256 keyed with the RS256 public PEM, kid rsa1": hand_signed_hs256(
            {"alg": "HS256", "typ": "JWT", "kid": "rsa1"}, claims(), public_pem),
        "HS256 keyed with the RS256 public PEM, no kid": hand_signed_hs256(
            {"alg": "HS256", "typ": "JWT"}, claims(), public_pem),
        "RS256 presented under the HS256 kid": jwt.encode(claims(), private_key, algorithm="RS256",
                                                          headers={"kid": "default"}),
        "not yet valid (nbf in an hour)": hs256(claims(nbf=int(time.time()) + 3600)),
        "issued in the future": hs256(claims(iat=int(time.time()) + 3600)),
        "expired an hour ago": jwt.encode(claims(exp=int(time.time()) - 3600), private_key, algorithm="RS256",
                                          headers={"kid": "rsa1"}),
        "exp as a string": hs256(claims(exp="9999999999")),
        "wrong issuer": hs256(claims(iss="https://evil.example")),
        "no issuer": hs256(claims(iss=None)),
        "wrong audience": hs256(claims(aud="another-service")),
        "no audience": hs256(claims(aud=None)),
        "no exp": hs256(claims(exp=None)),
        "kid that is a path": hs256(kid="../../etc/passwd"),
        "oversized (8193 characters)": hs256(claims(pad="x" * 8000))[:8193].ljust(8193, "x"),
        "three dots": "...",
        "header that is a JSON list": f"{b64(b'[1]')}.{b64(json.dumps(claims()).encode())}.c2ln",
        "header that is not base64": "%%%.eyJzdWIiOiJ4In0.c2ln",
        "binary junk": b64(bytes(range(256))) + "." + b64(b"\x00" * 40) + "." + b64(b"\xff" * 32),
        "signature stripped": hs256().rsplit(".", 1)[0] + ".",
    }


JWT_ATTACK_NAMES = ["alg none naming the RSA key", "HS256 keyed with the RS256 public PEM, kid rsa1",
                    "HS256 keyed with the RS256 public PEM, no kid", "RS256 presented under the HS256 kid",
                    "not yet valid (nbf in an hour)", "issued in the future", "expired an hour ago",
                    "exp as a string", "wrong issuer", "no issuer", "wrong audience", "no audience", "no exp",
                    "kid that is a path", "oversized (8193 characters)", "three dots", "header that is a JSON list",
                    "header that is not base64", "binary junk", "signature stripped"]


@pytest.mark.parametrize("attack", JWT_ATTACK_NAMES)
def test_jwt_attack_is_401(server, rsa_key, attack):
    token = jwt_attacks(rsa_key)[attack]
    response = httpx.post(server.url + "/v1/infer", json=event(), headers=auth(token), timeout=10)
    body = assert_error(response, 401, "UNAUTHORIZED")
    assert token[:40] not in body["message"] and response.headers["www-authenticate"] == "Bearer"


def test_authorization_header_of_raw_non_ascii_bytes_is_401(server):
    response = httpx.post(server.url + "/v1/infer", json=event(),
                          headers={"Authorization": b"Bearer \xff\xfe\x80token"}, timeout=10)
    assert_error(response, 401, "UNAUTHORIZED")


def test_header_beyond_gunicorns_field_limit_is_refused_before_the_app(server):
    """A 20 kB Authorization header: gunicorn's parser answers 431 itself (its own plain body, not ours)."""
    response = httpx.post(server.url + "/v1/infer", json=event(), headers=auth("a" * 20_000), timeout=10)
    assert response.status_code == 431


def test_zz_server_still_answers_and_logged_no_traceback_or_5xx(server, client):
    """Runs last (file order): the token attacks above left the server whole."""
    assert_server_whole(server, client, refused_status="401")
