"""conf/redact.py: the credentials in URLs, libpq strings and free text are masked, the rest stays readable.

Checked where they are shown: `mask` (what `sira config` prints), the log lines (conf/logs.py) and
the values the log filter masks wherever they appear (`secret_values`).
"""

from __future__ import annotations

import io
import json
import logging

import pytest

from conf.logs import MASK, Redactor, configure_logging, secret_values
from conf.redact import redact, redact_text, secrets_in
from conf.settings import SETTINGS_BY_ENV, load_settings, mask

DATABASE_URL = SETTINGS_BY_ENV["DATABASE_URL"]
S3_ENDPOINT_URL = SETTINGS_BY_ENV["S3_ENDPOINT_URL"]

# (value, what `sira config` shows, the secret texts it must not show)
DATABASE_URLS = [
    pytest.param("postgresql://:pw-only-9f3a@db:5432/sira", "postgresql://:****@db:5432/sira", ["pw-only-9f3a"],
                 id="userinfo-password-without-user"),
    pytest.param("postgresql://sira:p@ss-w0rd@db:5432/sira", "postgresql://sira:****@db:5432/sira", ["ss-w0rd"],
                 id="userinfo-password-with-unencoded-at"),
    pytest.param("postgresql://sira@db:5432/sira?password=s3cr3t-q&sslmode=disable",
                 "postgresql://sira@db:5432/sira?password=****&sslmode=disable", ["s3cr3t-q"], id="query-password"),
    pytest.param("postgresql://sira@db:5432/sira?password=p%26ss%3Dw0rd&application_name=sira",
                 "postgresql://sira@db:5432/sira?password=****&application_name=sira", ["p%26ss%3Dw0rd", "w0rd"],
                 id="query-password-percent-encoded"),
    pytest.param("postgresql://sira@db/sira?sslkey=/etc/sira/client.key&sslpassword=k3y-pass&passfile=/etc/sira/pgpass",
                 "postgresql://sira@db/sira?sslkey=/etc/sira/client.key&sslpassword=****&passfile=/etc/sira/pgpass",
                 ["k3y-pass"], id="query-sslpassword-paths-shown"),
    pytest.param("postgresql://sira:both-1@/sira?host=/var/run/postgresql&password=both-2",
                 "postgresql://sira:****@/sira?host=/var/run/postgresql&password=****", ["both-1", "both-2"],
                 id="userinfo-and-query-socket-dir"),
]

S3_ENDPOINT_URLS = [
    pytest.param("http://minio:9000/?X-Amz-Signature=abc123sig&X-Amz-Credential=AKIAEXAMPLE/20240101",
                 "http://minio:9000/?X-Amz-Signature=****&X-Amz-Credential=AKIAEXAMPLE/20240101", ["abc123sig"],
                 id="presigned-signature"),
    pytest.param("https://ghp-token-123@minio:9000", "https://****@minio:9000", ["ghp-token-123"],
                 id="userinfo-token"),
    pytest.param("http://minio:9000/store?token=t0k3n&api_key=k3y-1&SECRET=s3c-2&Access-Key=acc-3&region=eu",
                 "http://minio:9000/store?token=****&api_key=****&SECRET=****&Access-Key=****&region=eu",
                 ["t0k3n", "k3y-1", "s3c-2", "acc-3"], id="query-token-api-key-secret-access-key"),
]


@pytest.mark.parametrize("url, shown, secrets", DATABASE_URLS)
def test_sira_config_masks_every_password_of_database_url(url, shown, secrets):
    assert mask(DATABASE_URL, url) == shown
    assert not [secret for secret in secrets if secret in mask(DATABASE_URL, url)]


@pytest.mark.parametrize("url, shown, secrets", S3_ENDPOINT_URLS)
def test_sira_config_masks_the_credentials_of_other_urls(url, shown, secrets):
    assert mask(S3_ENDPOINT_URL, url) == shown
    assert not [secret for secret in secrets if secret in mask(S3_ENDPOINT_URL, url)]


@pytest.mark.parametrize("value, shown", [
    ("host=db port=5432 user=sira password=s3cr3t dbname=sira",
     "host=db port=5432 user=sira password=**** dbname=sira"),
    ("host=db user=sira password='a b\\'c' dbname=sira", "host=db user=sira password=**** dbname=sira"),
    ("host=db user=sira sslpassword=k3y sslkey=/k.pem dbname=sira",
     "host=db user=sira sslpassword=**** sslkey=/k.pem dbname=sira"),
    ("postgresql://sira:pa?ss#w@db/sira", "postgresql://sira:****@db/sira"),  # libpq's userinfo runs to the '@'
    ("https://idp.example/cb#access_token=tok&state=1", "https://idp.example/cb#access_token=****&state=1"),
    ("postgresql://sira:pw@h1:5432,h2:5433/sira?target_session_attrs=read-write",
     "postgresql://sira:****@h1:5432,h2:5433/sira?target_session_attrs=read-write"),
    ("postgresql://sira@[::1]:5432/sira?password=v6", "postgresql://sira@[::1]:5432/sira?password=****"),
])
def test_a_value_keeps_everything_but_its_secrets(value, shown):
    assert redact(value) == shown
    assert redact(shown) == shown  # masking twice changes nothing


@pytest.mark.parametrize("text, shown", [
    ('connection to "host=db user=sira password=s3cr3t dbname=sira" failed',
     'connection to "host=db user=sira password=**** dbname=sira" failed'),
    ("options host=db password = 'q r\\'s' port=5432", "options host=db password = **** port=5432"),
    ("retrying postgresql://sira:pw@db/sira and s3 at http://tok@minio:9000/?sig=abc, twice",
     "retrying postgresql://sira:****@db/sira and s3 at http://****@minio:9000/?sig=****, twice"),
    ("GET /download?X-Amz-Security-Token=st&X-Amz-Signature=sg&part=2",
     "GET /download?X-Amz-Security-Token=****&X-Amz-Signature=****&part=2"),
])
def test_free_text_masks_the_secrets_of_the_urls_and_pairs_in_it(text, shown):
    assert redact_text(text) == shown


@pytest.mark.parametrize("text", [
    "max_tokens=5 tokens=3 signal=15 passfile=/etc/pgpass sslkey=/etc/k.pem sslrootcert=/ca.pem",
    "postgresql://sira@db:5432/sira?sslmode=verify-full&application_name=sira",
    "https://minio:9000/models?X-Amz-Credential=AKIAEXAMPLE/20240101&X-Amz-Expires=60",
    "a=b c=d, the registry has 3 models",
])
def test_what_is_not_a_secret_is_left_alone(text):
    assert redact_text(text) == text and redact(text) == text


def test_secrets_in_gives_each_secret_as_written_and_decoded():
    found = secrets_in("postgresql://sira:p%40ss@db/sira?password=q%26r&sslpassword=k3y")
    assert set(found) == {"p%40ss", "p@ss", "q%26r", "q&r", "k3y"}
    assert set(secrets_in("host=db password='a b\\'c'")) == {"a b'c", "a b\\'c"}


@pytest.fixture
def log_stream():
    """The root logger writes JSON into a buffer during the test; logging is restored after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buffer = io.StringIO()

    def configure(settings=None) -> io.StringIO:
        configure_logging("info", secret_values(settings) if settings else [], stream=buffer)
        return buffer

    yield configure
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.captureWarnings(False)


def messages(buffer: io.StringIO) -> list[str]:
    return [json.loads(line)["message"] for line in buffer.getvalue().splitlines()]


def test_a_log_line_echoing_database_url_masks_its_percent_encoded_password(log_stream):
    url = "postgresql://sira:p%40ss%3Aw0rd%2Flong@db:5432/sira"
    stream = log_stream(load_settings({"DATABASE_URL": url}))
    logging.getLogger("sira.test").error("cannot connect to %s", url)
    assert messages(stream) == ["cannot connect to postgresql://sira:****@db:5432/sira"]


def test_a_log_line_masks_a_short_url_password_by_its_place(log_stream):
    """Values under 8 characters are not masked by value (they would mask words): here by where they sit."""
    stream = log_stream()
    logging.getLogger("sira.test").error("cannot connect to postgresql://sira:hunter2@db:5432/sira?password=pw2")
    assert messages(stream) == ["cannot connect to postgresql://sira:****@db:5432/sira?password=****"]


def test_a_library_error_echoing_a_dsn_is_masked(log_stream):
    stream = log_stream()
    log = logging.getLogger("sira.test")
    log.error("connection failed: host=db user=sira password=s3cr3t dbname=sira")
    log.error("bad options: host=db password='a b\\'c d' dbname=sira")
    log.error("store", extra={"detail": "s3://models at https://tok-123@minio:9000/?X-Amz-Signature=sg-1"})
    text = stream.getvalue()
    assert messages(stream)[:2] == ["connection failed: host=db user=sira password=**** dbname=sira",
                                    "bad options: host=db password=**** dbname=sira"]
    assert json.loads(text.splitlines()[2])["detail"] == "s3://models at https://****@minio:9000/?X-Amz-Signature=****"
    assert not [secret for secret in ("s3cr3t", "a b", "c d", "tok-123", "sg-1") if secret in text]


def test_a_password_only_in_the_query_is_masked_wherever_a_line_shows_it(log_stream):
    url = "postgresql://sira@db:5432/sira?password=q%40long-password"
    settings = load_settings({"DATABASE_URL": url, "S3_ENDPOINT_URL": "http://minio:9000/?token=s3-token-value-1"})
    values = secret_values(settings)
    assert {"q%40long-password", "q@long-password", "s3-token-value-1"} <= set(values)
    stream = log_stream(settings)
    logging.getLogger("sira.test").error("auth %s / %s / %s",
                                         "q%40long-password", "q@long-password", "s3-token-value-1")
    assert messages(stream) == [f"auth {MASK} / {MASK} / {MASK}"]


def test_the_access_log_redactor_masks_urls_in_client_text():
    """AccessLog scrubs the fields a client chooses (user agent) with the same Redactor, before JSON."""
    assert Redactor()("curl postgresql://u:pw@db/x?password=zz") == "curl postgresql://u:****@db/x?password=****"
