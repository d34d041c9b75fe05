"""The Authenticator's cache of verified tokens: hits, expiry, failures not cached, size 0 and the bound."""

from __future__ import annotations

import time

from app.auth.keys import mint_token
from app.auth.tokens import Authenticator
from tests.fixtures.jwt_keys import (  # noqa: F401 (fixtures)
    SECRET,
    FakeClock,
    bearer,
    claims,
    ec_key_fixture,
    hs256,
    key_files_fixture,
    keyring_fixture,
    refusal,
    rsa_new_fixture,
    rsa_old_fixture,
)

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
