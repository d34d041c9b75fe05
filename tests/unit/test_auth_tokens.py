"""JWT verification: which tokens the Authenticator accepts (HS256, RS256, ES256, key rotation) and which it refuses.

Refused: wrong key or kid, alg none and algorithm confusion, time claims (exp, nbf, iat, leeway), required claims,
issuer and audience, size, garbage and malformed Authorization headers; refusal messages never echo the token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.auth.keys import mint_token
from app.auth.tokens import Authenticator, Principal
from app.errors import Unauthorized
from tests.fixtures.jwt_keys import (  # noqa: F401 (fixtures)
    INTERNAL,
    SECRET,
    SECRET_KID,
    FakeClock,
    auth_fixture,
    bearer,
    claims,
    ec_key_fixture,
    hs256,
    key_files_fixture,
    keyring_fixture,
    private_pem,
    public_pem,
    refusal,
    rsa_new_fixture,
    rsa_old_fixture,
)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# --- valid tokens -------------------------------------------------------------------------------


def test_valid_hs256_token_without_kid_uses_default_key(auth):
    token = mint_token(role="fraud_analyst", subject="analyst-7", ttl_s=60, secret=SECRET)
    assert jwt.get_unverified_header(token).get("kid") is None
    principal = auth.authenticate(bearer(token))
    assert principal == Principal(subject="analyst-7", roles=frozenset({"fraud_analyst"}), internal=False)


def test_valid_hs256_token_with_secret_kid(auth):
    token = mint_token(role="ml_ops", subject="ops", ttl_s=60, secret=SECRET, kid=SECRET_KID)
    assert auth.authenticate(bearer(token)).roles == {"ml_ops"}


def test_valid_rs256_token_with_kid(auth, rsa_old):
    token = mint_token(
        role="ml_ops", subject="ops-1", ttl_s=60, private_key_pem=private_pem(rsa_old), kid="rsa-2025",
        algorithm="RS256",
    )
    assert auth.authenticate(bearer(token)) == Principal("ops-1", frozenset({"ml_ops"}))


def test_valid_es256_token_with_kid(auth, ec_key):
    token = mint_token(
        role="pay_admin", subject="admin", ttl_s=60, private_key_pem=private_pem(ec_key), kid="ec-1", algorithm="ES256"
    )
    assert auth.authenticate(bearer(token)) == Principal("admin", frozenset({"pay_admin"}))


def test_rotation_old_and_new_keys_both_valid(auth, rsa_old, rsa_new):
    old = jwt.encode(claims(sub="a"), private_pem(rsa_old), algorithm="RS256", headers={"kid": "rsa-2025"})
    new = jwt.encode(claims(sub="b"), private_pem(rsa_new), algorithm="RS256", headers={"kid": "rsa-2026"})
    assert auth.authenticate(bearer(old)).subject == "a"
    assert auth.authenticate(bearer(new)).subject == "b"


def test_bearer_scheme_is_case_insensitive(auth):
    token = hs256(claims())
    assert auth.authenticate(f"bearer {token}").subject == "client-1"


def test_keyring_knows_every_kid(keyring):
    assert keyring.kids() == sorted([SECRET_KID, "rsa-2025", "rsa-2026", "ec-1"])
    assert keyring.default_kid == SECRET_KID


# --- refused tokens -----------------------------------------------------------------------------


def test_token_signed_by_another_key_than_its_kid_is_refused(auth, rsa_new):
    token = jwt.encode(claims(), private_pem(rsa_new), algorithm="RS256", headers={"kid": "rsa-2025"})
    assert refusal(auth, bearer(token)) == "token signature is invalid"


def test_hs256_token_with_wrong_secret_is_refused(auth):
    token = hs256(claims(), secret=secrets.token_urlsafe(48))
    assert refusal(auth, bearer(token)) == "token signature is invalid"


def test_unknown_kid_is_refused(auth):
    token = hs256(claims(), kid="nobody")
    assert refusal(auth, bearer(token)) == "token kid names no known key"


def hand_signed_hs256(header: dict, payload: dict, key: bytes) -> str:
    """A token built without pyjwt, so its header may be anything."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = b64url(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())
    return f"{signing_input}.{signature}"


def test_non_string_kid_is_refused(auth):
    token = hand_signed_hs256({"alg": "HS256", "kid": 7}, claims(), SECRET.encode())
    assert refusal(auth, bearer(token)) == "token kid must be a string"


def test_hand_signed_hs256_token_is_accepted(auth):
    """Guards the helper above: without a bad header, its tokens pass."""
    token = hand_signed_hs256({"alg": "HS256", "kid": SECRET_KID}, claims(), SECRET.encode())
    assert auth.authenticate(bearer(token)).subject == "client-1"


@pytest.mark.parametrize("kid", [None, SECRET_KID, "rsa-2025"])
def test_alg_none_is_refused(auth, kid):
    header = {"alg": "none", "typ": "JWT"}
    if kid:
        header["kid"] = kid
    token = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims()).encode())}."
    assert refusal(auth, bearer(token)) == "token algorithm is not accepted for its key"


def test_hs256_signed_with_rsa_public_pem_is_refused(auth, rsa_old):
    """Algorithm confusion: the RSA public key's PEM bytes used as an HMAC secret."""
    token = hand_signed_hs256({"alg": "HS256", "typ": "JWT", "kid": "rsa-2025"}, claims(), public_pem(rsa_old))
    assert refusal(auth, bearer(token)) == "token algorithm is not accepted for its key"


def test_rs256_token_presented_with_hs256_kid_is_refused(auth, rsa_old):
    token = jwt.encode(claims(), private_pem(rsa_old), algorithm="RS256", headers={"kid": SECRET_KID})
    assert refusal(auth, bearer(token)) == "token algorithm is not accepted for its key"


def test_expired_token_is_refused(auth):
    now = int(time.time())
    assert refusal(auth, bearer(hs256(claims(iat=now - 100, exp=now - 10)))) == "token has expired"


def test_token_just_past_exp_is_accepted_within_leeway(keyring):
    clock = FakeClock(time.time())
    auth = Authenticator(keyring, None, leeway_s=5.0, clock=clock)
    token = hs256(claims(exp=int(clock.now) - 2))
    assert auth.authenticate(bearer(token)).subject == "client-1"
    clock.now += 10
    assert refusal(auth, bearer(token)) == "token has expired"


def test_nbf_in_the_future_is_refused(auth):
    token = hs256(claims(nbf=int(time.time()) + 60))
    assert refusal(auth, bearer(token)) == "token is not yet valid (nbf)"


def test_nbf_within_leeway_is_accepted(auth):
    assert auth.authenticate(bearer(hs256(claims(nbf=int(time.time()) + 2)))).subject == "client-1"


def test_iat_in_the_future_is_refused(auth):
    token = hs256(claims(iat=int(time.time()) + 120))
    assert refusal(auth, bearer(token)) == "token is not yet valid (iat in the future)"


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["9999999999", True, float("nan"), [1]])
def test_non_numeric_time_claims_are_refused(auth, claim, value):
    payload = claims()
    payload[claim] = value
    assert refusal(auth, bearer(hs256(payload))) == f"token '{claim}' claim must be a number of seconds"


@pytest.mark.parametrize("missing", ["sub", "exp"])
def test_missing_required_claim_is_refused(auth, missing):
    token = hs256(claims(**{missing: None}))
    assert refusal(auth, bearer(token)) == f"token is missing the '{missing}' claim"


def test_empty_or_non_string_sub_is_refused(auth):
    assert refusal(auth, bearer(hs256(claims(sub="")))) == "token 'sub' claim is empty"
    assert refusal(auth, bearer(hs256(claims(sub=42)))) == "token 'sub' claim must be a string"


def test_issuer_and_audience_checked_when_configured(keyring):
    auth = Authenticator(keyring, None, issuer="https://idp.example", audience="sira-inference")
    good = claims(iss="https://idp.example", aud="sira-inference")
    assert auth.authenticate(bearer(hs256(good))).subject == "client-1"
    assert auth.authenticate(bearer(hs256({**good, "aud": ["other", "sira-inference"]}))).subject == "client-1"
    assert refusal(auth, bearer(hs256({**good, "iss": "https://evil.example"}))) == "token issuer is not accepted"
    assert refusal(auth, bearer(hs256({**good, "aud": "other-service"}))) == "token audience is not accepted"
    assert refusal(auth, bearer(hs256(claims(aud="sira-inference")))) == "token is missing the 'iss' claim"
    assert refusal(auth, bearer(hs256(claims(iss="https://idp.example")))) == "token is missing the 'aud' claim"


def test_issuer_and_audience_ignored_when_not_configured(auth):
    token = hs256(claims(iss="anyone", aud="anything"))
    assert auth.authenticate(bearer(token)).subject == "client-1"


def test_oversized_token_is_refused_even_when_validly_signed(auth):
    token = hs256(claims(padding="x" * 9000))
    assert refusal(auth, bearer(token)) == "token is larger than 8192 bytes"
    assert auth.cached_tokens == 0


def test_token_just_under_the_size_limit_is_accepted(auth):
    base = hs256(claims(padding=""))
    token = hs256(claims(padding="x" * ((8192 - len(base)) * 3 // 4 - 4)))
    assert len(token) <= 8192
    assert auth.authenticate(bearer(token)).subject == "client-1"


@pytest.mark.parametrize(
    "token",
    ["garbage", "a.b.c", "...", "eyJhbGciOiJIUzI1NiJ9..", "eyJ.eyJ.sig", "\u00e9t\u00e9.x.y", "a.b", "a" * 8192],
)
def test_garbage_token_is_refused(auth, token):
    refusal(auth, bearer(token))


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "missing Authorization header"),
        ("", "missing Authorization header"),
        ("Basic dXNlcjpwYXNz", "Authorization header must use the Bearer scheme"),
        ("Token abc", "Authorization header must use the Bearer scheme"),
        ("Bearer", "malformed Authorization header: expected 'Bearer <token>'"),
        ("Bearer ", "malformed Authorization header: expected 'Bearer <token>'"),
        ("Bearer    ", "malformed Authorization header: expected 'Bearer <token>'"),
        ("Bearer abc def", "malformed Authorization header: expected 'Bearer <token>'"),
    ],
)
def test_missing_or_malformed_header_is_refused(auth, header, message):
    assert refusal(auth, header) == message


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_refused_with_unauthorized_only(keyring, text):
    auth = Authenticator(keyring, INTERNAL)
    with pytest.raises(Unauthorized):
        auth.authenticate(bearer(text))


def test_refusal_messages_never_echo_the_token(auth, rsa_new):
    now = int(time.time())
    tokens = [
        hs256(claims(exp=now - 100)),
        hs256(claims(), kid="nobody"),
        hs256(claims(), secret=secrets.token_urlsafe(48)),
        hs256(claims(sub=None)),
        jwt.encode(claims(), private_pem(rsa_new), algorithm="RS256", headers={"kid": "rsa-2025"}),
        "not-a-jwt-" + secrets.token_hex(8),
    ]
    for token in tokens:
        message = refusal(auth, bearer(token))
        for piece in token.split("."):
            assert piece[:12] not in message
