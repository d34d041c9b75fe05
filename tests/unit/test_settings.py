"""Every setting an operator can get wrong is refused with one line naming it."""

from __future__ import annotations

import os

import pytest

from conf.parsers import parse_database_url
from conf.secrets import jwt_secret_or_generate
from conf.settings import SETTINGS, ConfigError, load_settings, markdown_table, mask


def test_defaults_match_the_documented_table():
    settings = load_settings({})
    assert settings.data_dir == "./var"
    assert settings.bind == "127.0.0.1:8080"
    assert settings.workers >= 1
    assert settings.database_url is None and settings.jwt_secret is None
    assert settings.cache_max_items == 5000 and settings.cache_ttl_ms == 300000
    assert settings.model_poll_interval_s == 30.0
    assert settings.batch_max == 256 and settings.max_body_bytes == 1048576
    assert settings.log_level == "INFO"


@pytest.mark.parametrize("env, variable", [
    ({"SIRA_WORKERS": "abc"}, "SIRA_WORKERS"),
    ({"SIRA_WORKERS": "0"}, "SIRA_WORKERS"),
    ({"SIRA_WORKERS": "-3"}, "SIRA_WORKERS"),
    ({"SIRA_BIND": "127.0.0.1"}, "SIRA_BIND"),
    ({"SIRA_BIND": "127.0.0.1:0"}, "SIRA_BIND"),
    ({"SIRA_BIND": "127.0.0.1:99999"}, "SIRA_BIND"),
    ({"SIRA_BIND": "[zz::1]:80"}, "SIRA_BIND"),
    ({"DATABASE_URL": "mysql://u@h/db"}, "DATABASE_URL"),
    ({"DATABASE_URL": "postgresql://"}, "DATABASE_URL"),
    ({"DATABASE_URL": "not a url"}, "DATABASE_URL"),
    ({"DATABASE_URL": "postgresql://u@h:port/db"}, "DATABASE_URL"),
    ({"JWT_SECRET": "short"}, "JWT_SECRET"),
    ({"JWT_SECRET": "x" * 31}, "JWT_SECRET"),
    ({"JWT_SECRET_KID": "bad kid!"}, "JWT_SECRET_KID"),
    ({"JWT_PUBLIC_KEYS": "nokid"}, "JWT_PUBLIC_KEYS"),
    ({"JWT_PUBLIC_KEYS": "k1=/does/not/exist.pem"}, "JWT_PUBLIC_KEYS"),
    ({"INTERNAL_SERVICE_TOKEN": "tiny"}, "INTERNAL_SERVICE_TOKEN"),
    ({"MODEL_BUCKET": "Bad_Bucket"}, "MODEL_BUCKET"),
    ({"S3_ENDPOINT_URL": "ftp://x"}, "S3_ENDPOINT_URL"),
    ({"CACHE_MAX_ITEMS": "many"}, "CACHE_MAX_ITEMS"),
    ({"CACHE_TTL_MS": "0"}, "CACHE_TTL_MS"),
    ({"MODEL_POLL_INTERVAL_S": "nan"}, "MODEL_POLL_INTERVAL_S"),
    ({"MODEL_POLL_INTERVAL_S": "-1"}, "MODEL_POLL_INTERVAL_S"),
    ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
    ({"SIRA_BATCH_MAX": "0"}, "SIRA_BATCH_MAX"),
    ({"SIRA_MAX_BODY_BYTES": "10"}, "SIRA_MAX_BODY_BYTES"),
    ({"SIRA_KEEPALIVE_S": "x"}, "SIRA_KEEPALIVE_S"),
    ({"SIRA_GUNICORN_CONFIG": "/nope.py"}, "SIRA_GUNICORN_CONFIG"),
    ({"SIRA_DATA_DIR": "  "}, "SIRA_DATA_DIR"),
    ({"SIRA_WRITER_LINGER_MS": "-1"}, "SIRA_WRITER_LINGER_MS"),
    ({"SIRA_WRITER_LINGER_MS": "5000"}, "SIRA_WRITER_LINGER_MS"),
    ({"SIRA_WRITER_LINGER_MS": "0.1s"}, "SIRA_WRITER_LINGER_MS"),
    ({"SIRA_CANARY_BUDGET_MS": "0"}, "SIRA_CANARY_BUDGET_MS"),
    ({"SIRA_CANARY_BUDGET_MS": "fast"}, "SIRA_CANARY_BUDGET_MS"),
    ({"SIRA_BREAKER_FAILURES": "0"}, "SIRA_BREAKER_FAILURES"),
    ({"SIRA_BREAKER_WINDOW_S": "soon"}, "SIRA_BREAKER_WINDOW_S"),
    ({"SIRA_BREAKER_COOLDOWN_S": "-5"}, "SIRA_BREAKER_COOLDOWN_S"),
    ({"SIRA_METRICS_WINDOW_S": "0"}, "SIRA_METRICS_WINDOW_S"),
    ({"SIRA_METRICS_WINDOW_S": "-60"}, "SIRA_METRICS_WINDOW_S"),
    ({"SIRA_CANARY_WINDOW_S": "0"}, "SIRA_CANARY_WINDOW_S"),
    ({"SIRA_CANARY_WINDOW_S": "a minute"}, "SIRA_CANARY_WINDOW_S"),
    ({"SIRA_CANARY_MIN_REQUESTS": "0"}, "SIRA_CANARY_MIN_REQUESTS"),
    ({"SIRA_CANARY_MIN_REQUESTS": "1.5"}, "SIRA_CANARY_MIN_REQUESTS"),
    ({"SIRA_CANARY_MAX_ERROR_RATIO": "0.9"}, "SIRA_CANARY_MAX_ERROR_RATIO"),
    ({"SIRA_CANARY_MAX_ERROR_RATIO": "inf"}, "SIRA_CANARY_MAX_ERROR_RATIO"),
    ({"SIRA_CANARY_MAX_LATENCY_RATIO": "nan"}, "SIRA_CANARY_MAX_LATENCY_RATIO"),
    ({"SIRA_CANARY_MAX_LATENCY_RATIO": "x1.3"}, "SIRA_CANARY_MAX_LATENCY_RATIO"),
    ({"SIRA_CANARY_MAX_BLOCK_RATIO": "0.5"}, "SIRA_CANARY_MAX_BLOCK_RATIO"),
    ({"SIRA_CANARY_MAX_BLOCK_RATIO": "inf"}, "SIRA_CANARY_MAX_BLOCK_RATIO"),
    ({"SIRA_CANARY_MAX_BLOCK_RATIO": "twice"}, "SIRA_CANARY_MAX_BLOCK_RATIO"),
    ({"SIRA_ARCHIVE_PREFIX": ""}, "SIRA_ARCHIVE_PREFIX"),
    ({"SIRA_CANARY_FP_WINDOW_H": "0"}, "SIRA_CANARY_FP_WINDOW_H"),
    ({"SIRA_CANARY_FP_WINDOW_H": "a week"}, "SIRA_CANARY_FP_WINDOW_H"),
    ({"SIRA_CANARY_MIN_LABELLED": "-1"}, "SIRA_CANARY_MIN_LABELLED"),
    ({"SIRA_CANARY_MAX_FP_RATIO": "0.5"}, "SIRA_CANARY_MAX_FP_RATIO"),
    ({"SIRA_CANARY_MAX_FP_RATIO": "nan"}, "SIRA_CANARY_MAX_FP_RATIO"),
    ({"SIRA_ARCHIVE_PREFIX": "archive"}, "SIRA_ARCHIVE_PREFIX"),
    ({"SIRA_ARCHIVE_PREFIX": "../archive/"}, "SIRA_ARCHIVE_PREFIX"),
    ({"SIRA_ARCHIVE_PREFIX": "/abs/"}, "SIRA_ARCHIVE_PREFIX"),
])
def test_bad_value_is_one_line_naming_the_variable(env, variable):
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    message = str(caught.value)
    assert message.startswith(variable + ": expected ")
    assert "\n" not in message


def test_good_values_are_parsed(tmp_path):
    pem = tmp_path / "k.pem"
    pem.write_text("x")
    settings = load_settings({
        "SIRA_WORKERS": "3", "SIRA_BIND": "[::1]:9000", "DATABASE_URL": "postgresql://u:p@db:5432/sira",
        "JWT_PUBLIC_KEYS": f"k1={pem}", "LOG_LEVEL": "debug", "MODEL_BUCKET": "models-prod",
        "S3_ENDPOINT_URL": "http://127.0.0.1:9000/",
    })
    assert settings.workers == 3 and settings.bind == "[::1]:9000"
    assert settings.jwt_public_keys == {"k1": str(pem)}
    assert settings.log_level == "DEBUG" and settings.s3_endpoint_url == "http://127.0.0.1:9000"


def test_secrets_are_masked():
    by_env = {s.env: s for s in SETTINGS}
    assert mask(by_env["JWT_SECRET"], "supersecretvalue123") == "****"
    assert mask(by_env["INTERNAL_SERVICE_TOKEN"], "abc") == "****"
    shown = mask(by_env["DATABASE_URL"], "postgresql://sira:hunter2@db:5432/sira")
    assert "hunter2" not in shown and "sira:****@db" in shown


def test_markdown_table_lists_every_setting():
    table = markdown_table()
    for setting in SETTINGS:
        assert f"`{setting.env}`" in table


def test_generated_jwt_secret_is_created_once_and_private(tmp_path):
    first = jwt_secret_or_generate(None, str(tmp_path))
    second = jwt_secret_or_generate(None, str(tmp_path))
    assert first == second and len(first) >= 32
    assert os.stat(tmp_path / "jwt_secret").st_mode & 0o077 == 0
    assert jwt_secret_or_generate("given-secret-0123456789", str(tmp_path)) == "given-secret-0123456789"


def test_unusable_generated_secret_file_is_an_error(tmp_path):
    (tmp_path / "jwt_secret").write_text("x\n")
    with pytest.raises(ValueError, match="jwt_secret"):
        jwt_secret_or_generate(None, str(tmp_path))


def test_configuration_guide_table_is_the_generated_one():
    guide = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "configuration.md")
    with open(guide, encoding="utf-8") as handle:
        documented = handle.read()
    assert markdown_table() in documented, "regenerate it in docs/configuration.md: python -m conf.settings --markdown"


@pytest.mark.parametrize("value", [
    "mysql://x", "not a url", "", "postgresql://", "postgres://", "postgresql:///sira",
    "postgresql://host:abc/sira", "postgresql://host:70000/sira", "postgresql://host:0/sira",
    "postgresql://host/sira?foo=bar", "postgresql://u@%zz/sira", "postgresql://host/sira?host=",
    "http://host/sira",
])
def test_database_url_rejects_malformed_urls_with_one_line(value):
    with pytest.raises(ValueError) as raised:
        parse_database_url(value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("value", [
    "postgresql://u:p@db.example.com:5432/sira",
    "postgres://db/sira",
    "postgresql://u@/sira?host=/var/run/postgresql",
    "postgresql://postgres@%2Ftmp%2Fpg:5432/sira",
    "postgresql://h1:5432,h2:5433/sira?target_session_attrs=read-write",
    "postgresql://[::1]:5432/sira?sslmode=require",
    "postgresql://u@10.0.0.1",
])
def test_database_url_accepts_valid_urls(value):
    parse_database_url(value)


def test_database_url_never_echoes_a_password():
    for value in ("postgresql://u:s3cret-pw@host:abc/db", "postgresql://u:s3cret%zz@host/db"):
        with pytest.raises(ValueError) as raised:
            parse_database_url(value)
        assert "s3cret" not in str(raised.value)
