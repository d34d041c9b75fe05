"""Authentication and authorisation: JWT verification, key rotation, attacks, roles, cache, middleware."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time

import falcon
import falcon.asgi
import falcon.testing
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from app.auth.keys import KeyRing, mint_token, parse_public_key_setting
from app.auth.roles import KNOWN_ROLES
from app.auth.tokens import Authenticator, AuthMiddleware, Principal
from app.errors import ApiError, Forbidden, Unauthorized

SECRET = secrets.token_urlsafe(48)
SECRET_KID = "hs-main"
INTERNAL = "internal-" + secrets.token_hex(24)

# Written out by hand (not derived from app.auth.roles.PERMISSIONS) so a change to the table shows up here.
EXPECTED_PERMISSIONS = {
    "infer": {"sira_service", "fraud_analyst"},
    "predictions:read": {"sira_service", "fraud_analyst", "ml_ops"},
    "models:read": {"ml_ops"},
    "models:write": {"ml_ops"},
    "canary:read": {"ml_ops", "pay_admin"},
    "canary:write": {"ml_ops"},
}


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def public_pem(private_key) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_pem(private_key) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def claims(**overrides) -> dict:
    now = int(time.time())
    base = {"sub": "client-1", "role": "sira_service", "iat": now, "exp": now + 300}
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not None}


def hs256(payload: dict, kid: str | None = None, secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers={"kid": kid} if kid else None)


def bearer(token: str) -> str:
    return f"Bearer {token}"


@pytest.fixture(scope="module")
def rsa_old():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_new():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def key_files(tmp_path_factory, rsa_old, rsa_new, ec_key) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("keys")
    files = {}
    for kid, key in (("rsa-2025", rsa_old), ("rsa-2026", rsa_new), ("ec-1", ec_key)):
        path = folder / f"{kid}.pem"
        path.write_bytes(public_pem(key))
        files[kid] = str(path)
    return files


@pytest.fixture(scope="module")
def keyring(key_files) -> KeyRing:
    return KeyRing.from_config(SECRET, SECRET_KID, key_files)


@pytest.fixture()
def auth(keyring) -> Authenticator:
    return Authenticator(keyring, INTERNAL)


def refusal(auth: Authenticator, header: str | None) -> str:
    """The Unauthorized message for a header that must be refused."""
    with pytest.raises(Unauthorized) as info:
        auth.authenticate(header)
    assert info.value.status == 401
    return info.value.message


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


# --- internal service token ---------------------------------------------------------------------


def test_internal_token_is_accepted_and_may_do_everything(auth):
    principal = auth.authenticate(bearer(INTERNAL))
    assert principal.internal and principal.roles == {"internal_service"}
    for action in EXPECTED_PERMISSIONS:
        auth.authorize(principal, action)


def test_internal_token_differing_in_last_char_is_refused(auth):
    wrong = INTERNAL[:-1] + ("a" if INTERNAL[-1] != "a" else "b")
    refusal(auth, bearer(wrong))
    refusal(auth, bearer(INTERNAL + "x"))
    refusal(auth, bearer(INTERNAL[:-1]))


def test_internal_token_is_refused_when_not_configured(keyring):
    auth = Authenticator(keyring, None)
    refusal(auth, bearer(INTERNAL))


def test_jwt_claiming_internal_service_role_is_refused(auth):
    message = refusal(auth, bearer(hs256(claims(role="internal_service"))))
    assert "internal_service" in message and "internal service token" in message


# --- roles and authorisation --------------------------------------------------------------------


def test_role_claim_as_string(auth):
    assert auth.authenticate(bearer(hs256(claims(role="pay_admin")))).roles == {"pay_admin"}


def test_roles_claim_as_list(auth):
    token = hs256(claims(role=None, roles=["ml_ops", "fraud_analyst"]))
    assert auth.authenticate(bearer(token)).roles == {"ml_ops", "fraud_analyst"}


def test_role_and_roles_claims_are_merged(auth):
    token = hs256(claims(role="pay_admin", roles=["ml_ops"]))
    assert auth.authenticate(bearer(token)).roles == {"pay_admin", "ml_ops"}


def test_token_without_roles_is_authenticated_but_forbidden(auth):
    principal = auth.authenticate(bearer(hs256(claims(role=None))))
    assert principal.roles == frozenset()
    with pytest.raises(Forbidden):
        auth.authorize(principal, "predictions:read")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"role": ["ml_ops"]}, "token 'role' claim must be a string"),
        ({"role": 3}, "token 'role' claim must be a string"),
        ({"roles": "ml_ops"}, "token 'roles' claim must be a list of strings"),
        ({"roles": ["ml_ops", 4]}, "token 'roles' claim must be a list of strings"),
    ],
)
def test_malformed_role_claims_are_refused(auth, overrides, message):
    assert refusal(auth, bearer(hs256(claims(**overrides)))) == message


@pytest.mark.parametrize("action", sorted(EXPECTED_PERMISSIONS))
@pytest.mark.parametrize("role", sorted(KNOWN_ROLES))
def test_authorize_matrix(auth, role, action):
    principal = Principal(subject="someone", roles=frozenset({role}))
    if role in EXPECTED_PERMISSIONS[action]:
        auth.authorize(principal, action)
        return
    with pytest.raises(Forbidden) as info:
        auth.authorize(principal, action)
    assert info.value.status == 403
    assert sorted(info.value.details["required"]) == sorted(EXPECTED_PERMISSIONS[action])


def test_known_roles_are_the_documented_ones():
    assert KNOWN_ROLES == {"sira_service", "fraud_analyst", "ml_ops", "pay_admin"}


def test_authorize_unknown_action_is_a_programming_error(auth):
    with pytest.raises(ValueError, match="unknown action"):
        auth.authorize(Principal("x", frozenset({"ml_ops"})), "models:delete")


# --- cache --------------------------------------------------------------------------------------


def test_verified_token_is_served_from_cache(keyring):
    auth = Authenticator(keyring, None)
    token = bearer(hs256(claims()))
    first = auth.authenticate(token)
    assert auth.cached_tokens == 1
    assert auth.authenticate(token) is first


def test_cached_token_is_refused_after_expiry(keyring):
    clock = FakeClock(time.time())
    auth = Authenticator(keyring, None, leeway_s=5.0, clock=clock)
    token = bearer(mint_token(role="sira_service", subject="svc", ttl_s=30, secret=SECRET))
    first = auth.authenticate(token)
    clock.now += 20
    assert auth.authenticate(token) is first
    clock.now += 30
    assert refusal(auth, token) == "token has expired"
    assert auth.cached_tokens == 0


def test_failures_are_not_cached(keyring):
    clock = FakeClock(time.time())
    auth = Authenticator(keyring, None, leeway_s=0, clock=clock)
    token = bearer(hs256(claims(nbf=int(clock.now) + 60)))
    assert refusal(auth, token) == "token is not yet valid (nbf)"
    assert auth.cached_tokens == 0
    clock.now += 61
    assert auth.authenticate(token).subject == "client-1"


def test_cache_size_zero_turns_the_cache_off(keyring):
    auth = Authenticator(keyring, None, cache_size=0)
    token = bearer(hs256(claims()))
    assert auth.authenticate(token) is not auth.authenticate(token)
    assert auth.cached_tokens == 0


def test_cache_stays_bounded_and_evicts_expired_first(keyring):
    clock = FakeClock(time.time())
    auth = Authenticator(keyring, None, leeway_s=0, cache_size=4, clock=clock)
    now = int(clock.now)
    short = bearer(hs256(claims(sub="short", exp=now + 10)))
    long_lived = [bearer(hs256(claims(sub=f"long-{i}", exp=now + 1000))) for i in range(3)]
    auth.authenticate(short)
    principals = [auth.authenticate(token) for token in long_lived]
    assert auth.cached_tokens == 4
    clock.now += 100
    auth.authenticate(bearer(hs256(claims(sub="newcomer", exp=now + 1000))))
    assert auth.cached_tokens == 4
    assert [auth.authenticate(token) for token in long_lived] == principals
    assert all(auth.authenticate(t) is p for t, p in zip(long_lived, principals, strict=True))
    for i in range(20):
        auth.authenticate(bearer(hs256(claims(sub=f"burst-{i}", exp=now + 1000))))
        assert auth.cached_tokens <= 4


# --- mint_token ---------------------------------------------------------------------------------


def test_mint_token_rejects_unknown_role():
    with pytest.raises(ValueError, match="unknown role"):
        mint_token(role="root", subject="x", ttl_s=60, secret=SECRET)
    with pytest.raises(ValueError, match="unknown role"):
        mint_token(role="internal_service", subject="x", ttl_s=60, secret=SECRET)


def test_mint_token_sets_claims_and_kid(auth):
    token = mint_token(
        role="ml_ops", subject="ops", ttl_s=120, secret=SECRET, kid=SECRET_KID, issuer="iss-1", audience="aud-1"
    )
    payload = jwt.decode(token, SECRET, algorithms=["HS256"], audience="aud-1", issuer="iss-1")
    assert payload["sub"] == "ops" and payload["role"] == "ml_ops"
    assert payload["exp"] - payload["iat"] == 120
    assert jwt.get_unverified_header(token)["kid"] == SECRET_KID


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"secret": None}, "HS256 needs a secret"),
        ({"secret": "short-secret"}, "at least 32 bytes"),
        ({"ttl_s": 0}, "ttl_s must be positive"),
        ({"subject": ""}, "subject must not be empty"),
        ({"algorithm": "HS512"}, "algorithm must be one of"),
        ({"algorithm": "none"}, "algorithm must be one of"),
        ({"algorithm": "RS256"}, "RS256 needs private_key_pem"),
        ({"algorithm": "RS256", "private_key_pem": b"not a pem"}, "not an unencrypted PEM private key"),
        ({"kid": "bad kid!"}, "key id must be"),
    ],
)
def test_mint_token_argument_errors(kwargs, match):
    arguments = {"role": "ml_ops", "subject": "ops", "ttl_s": 60, "secret": SECRET, **kwargs}
    with pytest.raises(ValueError, match=match):
        mint_token(**arguments)


def test_mint_token_refuses_key_of_the_wrong_type(ec_key):
    with pytest.raises(ValueError, match="RS256 needs a RSAPrivateKey"):
        mint_token(role="ml_ops", subject="ops", ttl_s=60, private_key_pem=private_pem(ec_key), algorithm="RS256")


# --- configuration ------------------------------------------------------------------------------


def test_parse_public_key_setting():
    assert parse_public_key_setting("") == {}
    assert parse_public_key_setting("  ") == {}
    assert parse_public_key_setting("k1=/a.pem") == {"k1": "/a.pem"}
    assert parse_public_key_setting(" k1 = /a.pem , k-2.x=/b/c=d.pem") == {"k1": "/a.pem", "k-2.x": "/b/c=d.pem"}


@pytest.mark.parametrize(
    "value", ["k1", "=/a.pem", "k1=", "k1=/a.pem,", "k1=/a.pem,,k2=/b.pem", "k1=/a.pem,k1=/b.pem", "k 1=/a.pem"]
)
def test_parse_public_key_setting_errors(value):
    with pytest.raises(ValueError):
        parse_public_key_setting(value)


def write_pem(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_keyring_refuses_missing_file(tmp_path):
    path = str(tmp_path / "absent.pem")
    with pytest.raises(ValueError, match="cannot read JWT public key file .*absent.pem"):
        KeyRing.from_config(SECRET, SECRET_KID, {"k": path})


def test_keyring_refuses_non_pem_file(tmp_path):
    path = write_pem(tmp_path, "junk.pem", b"hello, I am not a key\n")
    with pytest.raises(ValueError, match="junk.pem is not a PEM public key"):
        KeyRing.from_config(SECRET, SECRET_KID, {"k": path})


def test_keyring_refuses_private_key_file(tmp_path, rsa_old):
    """Decision: only public keys; a private key on the verifying server is refused."""
    path = write_pem(tmp_path, "private.pem", private_pem(rsa_old))
    with pytest.raises(ValueError, match="private.pem is not a PEM public key"):
        KeyRing.from_config(SECRET, SECRET_KID, {"k": path})


def test_keyring_refuses_ed25519_key(tmp_path):
    path = write_pem(tmp_path, "ed.pem", public_pem(ed25519.Ed25519PrivateKey.generate()))
    with pytest.raises(ValueError, match="ed.pem holds an unsupported key type"):
        KeyRing.from_config(SECRET, SECRET_KID, {"k": path})


def test_keyring_refuses_ec_key_off_p256(tmp_path):
    path = write_pem(tmp_path, "p384.pem", public_pem(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(ValueError, match="p384.pem holds an EC key on curve secp384r1"):
        KeyRing.from_config(SECRET, SECRET_KID, {"k": path})


def test_keyring_refuses_small_rsa_key(tmp_path):
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = write_pem(tmp_path, "small.pem", public_pem(small))
    with pytest.raises(ValueError, match="small.pem holds a 1024-bit RSA key"):
        KeyRing.from_config(SECRET, SECRET_KID, {"k": path})


def test_keyring_refuses_short_or_key_shaped_secret(rsa_old):
    with pytest.raises(ValueError, match="at least 32 bytes"):
        KeyRing.from_config("only-sixteen-chr", SECRET_KID, {})
    with pytest.raises(ValueError, match="looks like a PEM"):
        KeyRing.from_config(public_pem(rsa_old).decode(), SECRET_KID, {})


def test_keyring_refuses_kid_clash(key_files):
    with pytest.raises(ValueError, match="already the JWT secret's kid"):
        KeyRing.from_config(SECRET, "ec-1", key_files)


def test_keyring_without_secret_has_no_default(key_files, rsa_old):
    ring = KeyRing.from_config(None, SECRET_KID, key_files)
    assert ring.default_kid is None
    auth = Authenticator(ring, None)
    no_kid = jwt.encode(claims(), private_pem(rsa_old), algorithm="RS256")
    assert refusal(auth, bearer(no_kid)) == "token has no kid and no default key is configured"
    with_kid = jwt.encode(claims(), private_pem(rsa_old), algorithm="RS256", headers={"kid": "rsa-2025"})
    assert auth.authenticate(bearer(with_kid)).subject == "client-1"
    refusal(auth, bearer(hs256(claims(), kid=SECRET_KID)))


# --- middleware ---------------------------------------------------------------------------------


class HealthResource:
    async def on_get(self, req, resp):
        resp.media = {"status": "ok"}


class InferResource:
    auth_actions = {"POST": "infer", "GET": "predictions:read"}

    async def on_post(self, req, resp):
        resp.media = {"subject": req.context.principal.subject}

    async def on_get(self, req, resp):
        resp.media = {"subject": req.context.principal.subject}

    async def on_put(self, req, resp):
        resp.media = {"public": True}


async def render_api_error(req, resp, ex, params):
    resp.status = ex.status
    resp.media = {"error_code": ex.code, "message": ex.message, "details": ex.details}
    for name, value in ex.headers.items():
        resp.set_header(name, value)


@pytest.fixture()
def client(auth) -> falcon.testing.TestClient:
    app = falcon.asgi.App(middleware=[AuthMiddleware(auth)])
    app.add_error_handler(ApiError, render_api_error)
    app.add_route("/healthz", HealthResource())
    app.add_route("/v1/infer", InferResource())
    return falcon.testing.TestClient(app)


def test_middleware_public_route_needs_no_token(client):
    assert client.simulate_get("/healthz").status_code == 200


def test_middleware_method_not_in_auth_actions_is_public(client):
    assert client.simulate_put("/v1/infer").json == {"public": True}


def test_middleware_protected_route_without_token_is_401(client):
    result = client.simulate_post("/v1/infer")
    assert result.status_code == 401
    assert result.json["error_code"] == "UNAUTHORIZED"
    assert result.headers["WWW-Authenticate"] == "Bearer"


def test_middleware_wrong_role_is_403(client):
    token = mint_token(role="pay_admin", subject="admin", ttl_s=60, secret=SECRET)
    result = client.simulate_post("/v1/infer", headers={"Authorization": bearer(token)})
    assert result.status_code == 403
    assert sorted(result.json["details"]["required"]) == ["fraud_analyst", "sira_service"]


def test_middleware_right_role_is_200_and_sets_principal(client):
    token = mint_token(role="sira_service", subject="svc-9", ttl_s=60, secret=SECRET)
    result = client.simulate_post("/v1/infer", headers={"Authorization": bearer(token)})
    assert result.status_code == 200
    assert result.json == {"subject": "svc-9"}


def test_middleware_action_depends_on_method(client):
    token = mint_token(role="ml_ops", subject="ops", ttl_s=60, secret=SECRET)
    headers = {"Authorization": bearer(token)}
    assert client.simulate_get("/v1/infer", headers=headers).status_code == 200
    assert client.simulate_post("/v1/infer", headers=headers).status_code == 403


def test_middleware_internal_token_passes(client):
    result = client.simulate_post("/v1/infer", headers={"Authorization": bearer(INTERNAL)})
    assert result.json == {"subject": "internal_service"}


def test_unknown_route_is_not_an_auth_error(client):
    assert client.simulate_get("/nowhere").status_code == 404
