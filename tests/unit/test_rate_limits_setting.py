"""SIRA_RATE_LIMITS: the default table, the syntax, and one line naming the variable for every wrong form."""

from __future__ import annotations

import pytest

from app.auth.roles import INTERNAL_ROLE, KNOWN_ROLES
from conf.ratelimit import (
    ANONYMOUS,
    DEFAULT_LIMITS,
    EXTERNAL_ROLES,
    INTERNAL_ROLES,
    ROLES,
    RateLimit,
    parse_rate_limits,
)
from conf.settings import ConfigError, load_settings


def limits_of(value: str) -> dict:
    return dict(load_settings({"SIRA_RATE_LIMITS": value}).rate_limits.by_role)


def test_every_role_sira_grants_has_a_default():
    assert set(ROLES) == KNOWN_ROLES | {INTERNAL_ROLE, ANONYMOUS}
    assert set(DEFAULT_LIMITS) == set(ROLES)


def test_defaults_limit_external_roles_and_failed_auth_to_100_a_minute_and_not_internal_callers():
    limits = load_settings({}).rate_limits
    for role in (*EXTERNAL_ROLES, ANONYMOUS):
        assert limits.by_role[role] == RateLimit(100, 60)
    for role in INTERNAL_ROLES:
        assert limits.by_role[role] is None
    assert str(limits) == ("anonymous=100/minute,fraud_analyst=100/minute,internal_service=unlimited,"
                           "ml_ops=100/minute,pay_admin=100/minute,sira_service=unlimited")


def test_named_roles_override_their_default_and_the_others_keep_theirs():
    limits = limits_of("fraud_analyst=5/minute,sira_service=50000/minute")
    assert limits["fraud_analyst"] == RateLimit(5, 60)
    assert limits["sira_service"] == RateLimit(50000, 60)
    assert limits["ml_ops"] == RateLimit(100, 60)
    assert limits["internal_service"] is None


@pytest.mark.parametrize("value, role, expected", [
    ("ml_ops=unlimited", "ml_ops", None),
    ("anonymous=10/second", "anonymous", RateLimit(10, 1)),
    ("pay_admin=3/hour", "pay_admin", RateLimit(3, 3600)),
    ("internal_service=1000000000/second", "internal_service", RateLimit(1_000_000_000, 1)),
    (" fraud_analyst = 7 / minute , ml_ops=1/second ", "fraud_analyst", RateLimit(7, 60)),
    ("", "fraud_analyst", RateLimit(100, 60)),
    ("   ", "sira_service", None),
])
def test_good_values(value, role, expected):
    assert limits_of(value)[role] == expected


def test_the_printed_table_parses_back_to_itself():
    limits = parse_rate_limits("fraud_analyst=5/minute,ml_ops=unlimited,anonymous=2/second,pay_admin=9/hour")
    assert parse_rate_limits(str(limits)) == limits


@pytest.mark.parametrize("value, fragment", [
    ("root=5/minute", "a role among"),                          # unknown role
    ("Fraud_Analyst=5/minute", "a role among"),                 # roles are case sensitive
    ("internal=5/minute", "a role among"),                      # the internal token's role is internal_service
    ("fraud_analyst=0/minute", "from 1 to"),                    # zero
    ("fraud_analyst=-5/minute", "from 1 to"),                   # negative
    ("fraud_analyst=1000000001/second", "from 1 to"),           # too many
    ("fraud_analyst=5/fortnight", "second, minute or hour"),    # garbage unit
    ("fraud_analyst=5/minutes", "second, minute or hour"),
    ("fraud_analyst=5/Minute", "second, minute or hour"),
    ("fraud_analyst=5/", "second, minute or hour"),
    ("fraud_analyst=5/minute,fraud_analyst=6/minute", "each role once"),  # duplicate role
    ("ml_ops=unlimited,ml_ops=unlimited", "each role once"),
    ("fraud_analyst=5/minute,", "an empty entry"),              # trailing comma
    ("fraud_analyst=5/minute,,ml_ops=1/second", "an empty entry"),
    ("fraud_analyst", "ROLE=N/second|minute|hour"),             # no '='
    ("fraud_analyst=", "ROLE=N/second|minute|hour"),
    ("=5/minute", "ROLE=N/second|minute|hour"),
    ("fraud_analyst=5", "ROLE=N/second|minute|hour"),           # no period
    ("fraud_analyst=1.5/minute", "ROLE=N/second|minute|hour"),  # not a whole number
    ("fraud_analyst=1e3/minute", "ROLE=N/second|minute|hour"),
    ("fraud_analyst=five/minute", "ROLE=N/second|minute|hour"),
    ("fraud_analyst=+5/minute", "ROLE=N/second|minute|hour"),
    ("fraud_analyst=unlimited/minute", "ROLE=N/second|minute|hour"),
    ("fraud_analyst=none", "ROLE=N/second|minute|hour"),
    ("fraud_analyst:5/minute", "ROLE=N/second|minute|hour"),
    ("fraud_analyst=5/minute;ml_ops=1/second", "second, minute or hour"),
])
def test_bad_value_is_one_line_naming_the_variable(value, fragment):
    with pytest.raises(ConfigError) as caught:
        load_settings({"SIRA_RATE_LIMITS": value})
    message = str(caught.value)
    assert message.startswith("SIRA_RATE_LIMITS: expected ")
    assert fragment in message
    assert "\n" not in message


def test_rate_limit_arithmetic_gives_an_exact_burst():
    limit = RateLimit(7, 60)
    assert limit.interval_ns == 60_000_000_000 // 7
    assert limit.burst_ns == 7 * limit.interval_ns <= 60_000_000_000
    assert str(limit) == "7/minute"
