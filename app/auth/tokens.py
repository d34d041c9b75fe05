"""Bearer authentication (internal service token or JWT) and the role table that authorises actions.

A JWT is checked with the key its header's `kid` names (no kid: the HS256 secret's kid), and always
with that key's own single algorithm, never one the token picks: this refuses `alg: none` and
HS256-with-a-public-key confusion. Verified tokens are kept until they expire, so a client that
sends the same token on every request pays the signature check once.

Decisions: the secret must be at least 32 bytes (RFC 7518 section 3.2); key files must hold a PEM
*public* key (a private key is refused: the server has no business holding it); RSA keys are at
least 2048 bits; EC keys must be P-256. `aud` is ignored when no audience is configured. `exp`,
`nbf` and `iat` are checked here (not by pyjwt) against an injectable clock.

Roles (the table is app/auth/roles.py): only the internal service token grants every action, and the
role `internal_service` belongs to it alone: a JWT that claims that role (in `role` or `roles`) is
refused with 401, whatever else it holds. Roles SIRA does not know grant nothing and set no rate
limit; a token with no known role is authenticated and refused 403 for every protected action.
A request is rate limited by the roles of its token that grant the action it asks for, the most
generous of them; never by a role that does not grant that action (app/auth/ratelimit.py).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jwt
import orjson
from jwt import exceptions as jwt_errors

from app.auth.keys import KeyRing
from app.auth.roles import INTERNAL_ROLE, REQUIRED_ROLES, granting_roles, jwt_roles
from app.errors import Forbidden, Unauthorized

MAX_TOKEN_CHARS = 8192


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made the request and which roles they hold."""

    subject: str
    roles: frozenset[str]
    internal: bool = False


INTERNAL_PRINCIPAL = Principal(subject=INTERNAL_ROLE, roles=frozenset({INTERNAL_ROLE}), internal=True)


# pyjwt failure -> message for the client; the most specific class along the MRO wins.
_FAILURE_MESSAGES: dict[type[Exception], str] = {
    jwt_errors.InvalidSignatureError: "token signature is invalid",
    jwt_errors.InvalidAlgorithmError: "token algorithm is not accepted for its key",
    jwt_errors.InvalidAudienceError: "token audience is not accepted",
    jwt_errors.InvalidIssuerError: "token issuer is not accepted",
    jwt_errors.DecodeError: "token is malformed",
    jwt_errors.InvalidKeyError: "token cannot be verified with the configured key",
    jwt_errors.PyJWTError: "token is invalid",
}


def _failure_message(exc: jwt_errors.PyJWTError) -> str:
    """A message that says what is wrong with the token without echoing any of it."""
    if isinstance(exc, jwt_errors.MissingRequiredClaimError):
        return f"token is missing the '{exc.claim}' claim"
    for cls in type(exc).__mro__:
        message = _FAILURE_MESSAGES.get(cls)
        if message is not None:
            return message
    return "token is invalid"


def _bearer_token(authorization_header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header."""
    if not authorization_header:
        raise Unauthorized("missing Authorization header")
    scheme, _, token = authorization_header.partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthorized("Authorization header must use the Bearer scheme")
    token = token.strip()
    if not token or " " in token:
        raise Unauthorized("malformed Authorization header: expected 'Bearer <token>'")
    if len(token) > MAX_TOKEN_CHARS:
        raise Unauthorized(f"token is larger than {MAX_TOKEN_CHARS} bytes")
    return token


def _unverified_kid(token: str) -> str | None:
    """The header's kid, read only to pick a key: pyjwt then parses and checks the whole token.

    Reading it here costs about 1.5 us against 19 us for jwt.get_unverified_header. Whatever
    this returns, the signature must still verify under that key's own algorithm.
    """
    segment = token.partition(".")[0]
    try:
        header = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error):
        raise Unauthorized("token is malformed") from None
    if not isinstance(header, dict):
        raise Unauthorized("token is malformed")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise Unauthorized("token kid must be a string")
    return kid


def _numeric_claim(claims: dict[str, Any], name: str) -> float:
    value = claims[name]
    if type(value) is int or (type(value) is float and math.isfinite(value)):
        return value
    raise Unauthorized(f"token '{name}' claim must be a number of seconds")


def _check_time_claims(claims: dict[str, Any], now: float, leeway: float) -> float:
    """Refuses an expired or not yet valid token; returns its exp."""
    exp = _numeric_claim(claims, "exp")
    if exp <= now - leeway:
        raise Unauthorized("token has expired")
    if "nbf" in claims and _numeric_claim(claims, "nbf") > now + leeway:
        raise Unauthorized("token is not yet valid (nbf)")
    if "iat" in claims and _numeric_claim(claims, "iat") > now + leeway:
        raise Unauthorized("token is not yet valid (iat in the future)")
    return exp


def _roles(claims: dict[str, Any]) -> frozenset[str]:
    """The known roles of the `role` string and the `roles` list (both may be present).

    A token that claims `internal_service` is refused rather than trimmed: whoever signed it meant
    to grant what only the internal token may have, so none of its other claims can be trusted.
    Unknown roles are dropped here, so that neither authorisation nor rate limiting sees them.
    """
    roles: set[str] = set()
    role = claims.get("role")
    if role is not None:
        if not isinstance(role, str):
            raise Unauthorized("token 'role' claim must be a string")
        roles.add(role)
    listed = claims.get("roles")
    if listed is not None:
        if not isinstance(listed, list) or not all(isinstance(item, str) for item in listed):
            raise Unauthorized("token 'roles' claim must be a list of strings")
        roles.update(listed)
    if INTERNAL_ROLE in roles:
        raise Unauthorized(
            f"token claims the role '{INTERNAL_ROLE}', which only the internal service token holds; "
            "a JWT may not claim it"
        )
    return jwt_roles(roles)


class Authenticator:
    """Turns an Authorization header into a Principal and checks it against the role table.

    Keeps up to `cache_size` verified tokens (0 turns the cache off) until their exp. Not thread
    safe: one per process, used from its event loop. `internal_token` may be several tokens, all
    accepted (a rotation overlaps them); `replace_credentials` swaps keys and tokens in place (SIGHUP).
    """

    def __init__(
        self,
        keyring: KeyRing,
        internal_token: str | Iterable[str] | None,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_s: float = 5.0,
        cache_size: int = 10000,
        clock: Callable[[], float] = time.time,
    ):
        self._keyring = keyring
        self._internal_tokens = _token_bytes(internal_token)
        self._issuer = issuer
        self._audience = audience
        self._leeway = float(leeway_s)
        self._cache_size = max(0, cache_size)
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._clock = clock
        self._decode_options = {
            "require": ["exp", "sub"],
            "verify_exp": False,  # time claims are checked by _check_time_claims with our clock
            "verify_nbf": False,
            "verify_iat": False,
            "verify_iss": issuer is not None,
            "verify_aud": audience is not None,
            "verify_sub": False,  # checked in _verify, the same on every pyjwt 2.x
            "enforce_minimum_key_length": True,
        }

    def replace_credentials(self, keyring: KeyRing, internal_token: str | Iterable[str] | None) -> None:
        """New keys and internal tokens in force from the next request; verified tokens are checked again."""
        self._keyring = keyring
        self._internal_tokens = _token_bytes(internal_token)
        self._cache.clear()  # a token verified by a key now removed must be refused

    @property
    def kids(self) -> list[str]:
        return self._keyring.kids()

    @property
    def cached_tokens(self) -> int:
        """How many verified tokens the cache holds now."""
        return len(self._cache)

    def authenticate(self, authorization_header: str | None) -> Principal:
        """The principal of a Bearer header; raises Unauthorized when it is missing, malformed or invalid."""
        token = _bearer_token(authorization_header)
        if self._internal_tokens:
            presented = token.encode("utf-8", "surrogatepass")
            for expected in self._internal_tokens:
                if hmac.compare_digest(presented, expected):
                    return INTERNAL_PRINCIPAL
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None:
            if now < cached[1]:
                return cached[0]
            del self._cache[token]
        principal, exp = self._verify(token, now)
        if self._cache_size:
            self._remember(token, principal, exp, now)
        return principal

    def authorize(self, principal: Principal, action: str) -> None:
        """Raises Forbidden unless one of the principal's roles may do the action."""
        if granting_roles(principal.roles, action) or principal.internal:
            return
        required = REQUIRED_ROLES[action]
        raise Forbidden(
            f"'{action}' needs one of the roles: {', '.join(required)}", details={"required": list(required)}
        )

    def _key_for(self, token: str) -> tuple[str, Any]:
        """(algorithm, key) for the token's kid, or the default key when it has none."""
        kid = _unverified_kid(token)
        if kid is None:
            kid = self._keyring.default_kid
            if kid is None:
                raise Unauthorized("token has no kid and no default key is configured")
        entry = self._keyring.get(kid)
        if entry is None:
            raise Unauthorized("token kid names no known key")
        return entry

    def _verify(self, token: str, now: float) -> tuple[Principal, float]:
        """Checks signature and claims; returns the principal and the token's exp."""
        try:
            algorithm, key = self._key_for(token)
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],  # the key's own algorithm, never the token's choice
                options=self._decode_options,
                issuer=self._issuer,
                audience=self._audience,
            )
        except jwt_errors.PyJWTError as exc:
            raise Unauthorized(_failure_message(exc)) from None
        exp = _check_time_claims(claims, now, self._leeway)
        subject = claims["sub"]
        if not isinstance(subject, str):
            raise Unauthorized("token 'sub' claim must be a string")
        if not subject:
            raise Unauthorized("token 'sub' claim is empty")
        return Principal(subject=subject, roles=_roles(claims)), exp

    def _remember(self, token: str, principal: Principal, exp: float, now: float) -> None:
        if len(self._cache) >= self._cache_size:
            self._evict(now)
        self._cache[token] = (principal, exp)

    def _evict(self, now: float) -> None:
        """Drops expired tokens, then the oldest, down to 3/4 full, so eviction runs rarely."""
        for token in [token for token, (_, exp) in self._cache.items() if exp <= now]:
            del self._cache[token]
        excess = len(self._cache) - self._cache_size * 3 // 4
        if excess > 0:
            for token in list(itertools.islice(self._cache, excess)):
                del self._cache[token]


def _token_bytes(tokens: str | Iterable[str] | None) -> tuple[bytes, ...]:
    if not tokens:
        return ()
    if isinstance(tokens, str):
        tokens = (tokens,)
    return tuple(token.encode("utf-8") for token in tokens if token)


class AuthMiddleware:
    """Falcon ASGI middleware: a resource's `auth_actions` maps a method to the action it needs.

    A method missing from the mapping, or a resource without one, is public. With a `limiter`
    (app/auth/ratelimit.py), an authenticated request spends from the bucket its action picks among
    the principal's roles before it is authorised, and a failed authentication from its client
    address's bucket before the 401.
    """

    def __init__(self, authenticator: Authenticator, limiter: Any = None):
        self._authenticator = authenticator
        self._limiter = limiter

    async def process_resource(self, req: Any, resp: Any, resource: Any, params: dict) -> None:
        actions = getattr(resource, "auth_actions", None)
        if not actions:
            return
        action = actions.get(req.method)
        if action is None:
            return
        try:
            principal = self._authenticator.authenticate(req.get_header("Authorization"))
        except Unauthorized:
            if self._limiter is not None:
                client = req.scope.get("client")  # the TCP peer, never a forwarded-for header
                self._limiter.admit_failed_authentication(client[0] if client else None)
            raise
        if self._limiter is not None:
            self._limiter.admit(principal, action)
        self._authenticator.authorize(principal, action)
        req.context.principal = principal
