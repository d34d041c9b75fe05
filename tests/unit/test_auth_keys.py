"""Keys: mint_token's arguments and claims, the JWT public-key setting, and the key files a KeyRing accepts."""

from __future__ import annotations

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from app.auth.keys import KeyRing, mint_token
from app.auth.tokens import Authenticator
from conf.parsers import parse_public_keys
from tests.fixtures.jwt_keys import (  # noqa: F401 (fixtures)
    SECRET,
    SECRET_KID,
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
        ({"kid": "bad kid!"}, "key id: expected a key id of 1-64"),
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


def test_jwt_public_keys_are_kid_path_pairs_each_kid_once(tmp_path):
    a, b = tmp_path / "a.pem", tmp_path / "c=d.pem"
    a.write_text("x"), b.write_text("x")
    assert parse_public_keys("") == {} and parse_public_keys("  ") == {}
    assert parse_public_keys(f"k1={a}") == {"k1": str(a)}
    assert parse_public_keys(f" k1={a} , k-2.x={b}") == {"k1": str(a), "k-2.x": str(b)}


@pytest.mark.parametrize("value", ["k1", "=/a.pem", "k1=", "k1=A,k1=B", "k 1=A", "k1=/does/not/exist.pem"])
def test_bad_jwt_public_keys_are_refused(tmp_path, value):
    (tmp_path / "a.pem").write_text("x")
    with pytest.raises(ValueError):
        parse_public_keys(value.replace("A", str(tmp_path / "a.pem")).replace("B", str(tmp_path / "a.pem")))


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
