"""JWT keys: the verification key ring (JWT_SECRET / JWT_SECRET_FILE, JWT_PUBLIC_KEYS) and minting.

Each key is bound to one algorithm (HS256 for a secret, RS256 or ES256 for a public key), which is
what app/auth/tokens.py verifies a token with, never an algorithm the token names. A secret must be at
least 32 bytes (RFC 7518 section 3.2); key files must hold a PEM *public* key; RSA keys are at least
2048 bits; EC keys must be P-256. `mint_token` signs tokens for `sira token` and the tests.
"""

from __future__ import annotations

import time
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt import exceptions as jwt_errors
from jwt.algorithms import HMACAlgorithm

from app.auth.roles import KNOWN_ROLES
from conf.parsers import parse_kid

MIN_SECRET_BYTES = 32
MIN_RSA_BITS = 2048
_SIGNING_ALGORITHMS = ("HS256", "RS256", "ES256")
_HMAC_SHA256 = HMACAlgorithm(HMACAlgorithm.SHA256)


class KeyRing:
    """Verification keys by kid, each bound to one algorithm, so old and new keys can both be live."""

    __slots__ = ("_keys", "default_kid")

    def __init__(self, keys: dict[str, tuple[str, Any]], default_kid: str | None = None):
        if default_kid is not None and default_kid not in keys:
            raise ValueError(f"default kid {default_kid!r} is not one of the keys {sorted(keys)}")
        self._keys = dict(keys)
        self.default_kid = default_kid

    @classmethod
    def from_config(cls, jwt_secret: str | None, secret_kid: str, public_key_files: dict[str, str]) -> KeyRing:
        """Builds the ring from JWT_SECRET (HS256, the default kid) and kid -> PEM public key files."""
        return cls.from_secrets({secret_kid: jwt_secret} if jwt_secret else {}, secret_kid, public_key_files)

    @classmethod
    def from_secrets(cls, hmac_secrets: dict[str, str], default_kid: str, public_key_files: dict[str, str]) -> KeyRing:
        """Builds the ring from kid -> HS256 secret (JWT_SECRET_FILE may hold several) and kid -> PEM files.

        `default_kid` verifies tokens without a kid; it is ignored when there is no HS256 secret.
        """
        keys: dict[str, tuple[str, Any]] = {}
        for kid, secret in hmac_secrets.items():
            _check_kid(kid)
            keys[kid] = ("HS256", _hmac_secret(secret))
        for kid, path in public_key_files.items():
            _check_kid(kid)
            if kid in keys:
                raise ValueError(f"key id {kid!r} of {path} is already the JWT secret's kid")
            keys[kid] = load_public_key(path)
        return cls(keys, default_kid if hmac_secrets else None)

    def get(self, kid: str) -> tuple[str, Any] | None:
        """(algorithm, key) for a kid, or None when the kid is unknown."""
        return self._keys.get(kid)

    def kids(self) -> list[str]:
        """The key ids, for startup logs."""
        return sorted(self._keys)


def _check_kid(kid: str) -> None:
    try:
        parse_kid(kid)
    except ValueError as exc:
        raise ValueError(f"key id: expected {exc}") from None


def _hmac_secret(secret: str) -> bytes:
    """The secret as bytes, refused when too short or when it looks like a PEM or JWK key."""
    key = secret.encode("utf-8")
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(
            f"the JWT secret must be at least {MIN_SECRET_BYTES} bytes for HS256 (RFC 7518 section 3.2), "
            f"got {len(key)}; make one with: python -c 'import secrets; print(secrets.token_urlsafe(48))'"
        )
    try:
        _HMAC_SHA256.prepare_key(key)
    except jwt_errors.InvalidKeyError:
        raise ValueError("the JWT secret looks like a PEM, DER or JWK key, not an HMAC secret") from None
    return key


def load_public_key(path: str) -> tuple[str, Any]:
    """(algorithm, key) from a PEM public key file: RSA -> RS256, EC P-256 -> ES256."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ValueError(f"cannot read JWT public key file {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(
            f"{path} is not a PEM public key (BEGIN PUBLIC KEY); private keys and certificates are refused"
        ) from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"{path} holds a {key.key_size}-bit RSA key; at least {MIN_RSA_BITS} bits are required")
        return "RS256", key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"{path} holds an EC key on curve {key.curve.name}; only P-256 (ES256) is supported")
        return "ES256", key
    raise ValueError(
        f"{path} holds an unsupported key type ({type(key).__name__}); use RSA (RS256) or EC P-256 (ES256)"
    )


def mint_token(
    *,
    role: str,
    subject: str,
    ttl_s: int,
    secret: str | None = None,
    kid: str | None = None,
    private_key_pem: bytes | None = None,
    algorithm: str = "HS256",
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """A signed token for one known role (the `sira token` command and tests)."""
    if role not in KNOWN_ROLES:
        raise ValueError(f"unknown role {role!r}; known roles: {sorted(KNOWN_ROLES)}")
    if not subject:
        raise ValueError("subject must not be empty")
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
    if kid is not None:
        _check_kid(kid)
    key = _signing_key(algorithm, secret, private_key_pem)
    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, "role": role, "iat": now, "exp": now + int(ttl_s)}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    try:
        return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid} if kid else None)
    except (jwt_errors.PyJWTError, ValueError, TypeError) as exc:
        raise ValueError(f"cannot sign an {algorithm} token with this key: {exc}") from None


def _signing_key(algorithm: str, secret: str | None, private_key_pem: bytes | None) -> Any:
    """The key that signs with `algorithm`: the secret for HS256, the private key for RS256 / ES256."""
    if algorithm not in _SIGNING_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {_SIGNING_ALGORITHMS}, got {algorithm!r}")
    if algorithm == "HS256":
        if not secret:
            raise ValueError("HS256 needs a secret")
        return _hmac_secret(secret)
    if not private_key_pem:
        raise ValueError(f"{algorithm} needs private_key_pem")
    try:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("private_key_pem is not an unencrypted PEM private key") from None
    expected = rsa.RSAPrivateKey if algorithm == "RS256" else ec.EllipticCurvePrivateKey
    if not isinstance(key, expected):
        raise ValueError(f"{algorithm} needs a {expected.__name__}, got {type(key).__name__}")
    return key
