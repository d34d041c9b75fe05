"""Authorisation: the internal service token, the role and roles claims, and the role/action permission table."""

from __future__ import annotations

import pytest

from app.auth.roles import KNOWN_ROLES
from app.auth.tokens import Authenticator, Principal
from app.errors import Forbidden
from tests.fixtures.jwt_keys import (  # noqa: F401 (fixtures)
    INTERNAL,
    auth_fixture,
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

# Written out by hand (not derived from app.auth.roles.PERMISSIONS) so a change to the table shows up here.
EXPECTED_PERMISSIONS = {
    "infer": {"sira_service", "fraud_analyst"},
    "predictions:read": {"sira_service", "fraud_analyst", "ml_ops"},
    "models:read": {"ml_ops"},
    "models:write": {"ml_ops"},
    "canary:read": {"ml_ops", "pay_admin"},
    "canary:write": {"ml_ops"},
}


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
