"""Credentials inside URLs (a password in DATABASE_URL's query, a token in S3_ENDPOINT_URL) are never shown.

`sira config` (table and --json) runs with DATABASE_URL and S3_ENDPOINT_URL in each form that
carries a secret, and must show the rest of the URL but never the secret. A real `sira serve` is
given a password in DATABASE_URL's query and an S3 endpoint that does not answer, with a token in
its userinfo and a signature in its query: the master then logs a line about the database that
names the endpoint, and nothing in the log may show the password, the token or the signature.

The test Postgres trusts local connections: any password is accepted and ignored.
"""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest

from tests.fixtures.s3 import S3_ENV
from tests.fixtures.server import free_port, run_sira, sira_env
from tests.fixtures.waiting import wait_for

TAG = secrets.token_hex(6)  # makes every secret below unique to this run, so a hit is a leak

# (variable, value, what `sira config` shows for it, the secret texts it must never show)
FORMS = [
    pytest.param("DATABASE_URL", f"postgresql://:only-{TAG}@db:5432/sira", "postgresql://:****@db:5432/sira",
                 [f"only-{TAG}"], id="userinfo-password-without-user"),
    pytest.param("DATABASE_URL", f"postgresql://sira:at@{TAG}@db:5432/sira", "postgresql://sira:****@db:5432/sira",
                 [f"at@{TAG}", TAG], id="userinfo-password-with-unencoded-at"),
    pytest.param("DATABASE_URL", f"postgresql://sira@db:5432/sira?password=q-{TAG}&sslmode=disable",
                 "postgresql://sira@db:5432/sira?password=****&sslmode=disable", [f"q-{TAG}"], id="query-password"),
    pytest.param("DATABASE_URL", f"postgresql://sira@db:5432/sira?password=p%40{TAG}&application_name=sira",
                 "postgresql://sira@db:5432/sira?password=****&application_name=sira", [f"p%40{TAG}", f"p@{TAG}"],
                 id="query-password-percent-encoded"),
    pytest.param("DATABASE_URL",
                 f"postgresql://sira@db/sira?sslkey=/etc/sira/client.key&sslpassword=k-{TAG}&passfile=/etc/sira/pgpass",
                 "postgresql://sira@db/sira?sslkey=/etc/sira/client.key&sslpassword=****&passfile=/etc/sira/pgpass",
                 [f"k-{TAG}"], id="query-sslpassword-paths-shown"),
    pytest.param("S3_ENDPOINT_URL", f"https://tok-{TAG}@minio:9000", "https://****@minio:9000", [f"tok-{TAG}"],
                 id="s3-userinfo-token"),
    pytest.param("S3_ENDPOINT_URL", f"http://minio:9000/?X-Amz-Signature=sig-{TAG}&X-Amz-Credential=AKIAEXAMPLE",
                 "http://minio:9000/?X-Amz-Signature=****&X-Amz-Credential=AKIAEXAMPLE", [f"sig-{TAG}"],
                 id="s3-query-signature"),
    pytest.param("S3_ENDPOINT_URL", f"http://minio:9000/models?API_KEY=a-{TAG}&Token=t-{TAG}&region=eu",
                 "http://minio:9000/models?API_KEY=****&Token=****&region=eu", [f"a-{TAG}", f"t-{TAG}"],
                 id="s3-query-api-key-and-token-any-case"),
]


@pytest.mark.parametrize("variable, value, shown, hidden", FORMS)
def test_sira_config_shows_the_url_without_its_secret(tmp_path, variable, value, shown, hidden):
    env = sira_env(SIRA_DATA_DIR=str(tmp_path), **{variable: value})
    table = run_sira("config", env=env)
    as_json = run_sira("config", "--json", env=env)
    for result in (table, as_json):
        assert result.returncode == 0, result.stderr
        printed = result.stdout + result.stderr
        assert [secret for secret in hidden if secret in printed] == []
    line = next(line for line in table.stdout.splitlines() if line.split()[:1] == [variable])
    assert line.split()[1] == shown
    assert orjson.loads(as_json.stdout)[variable] == shown


def with_query_password(url: str, written: str) -> str:
    """The URL with `password=` added to its query (which may already hold ?host=/socket/dir)."""
    parts = urlsplit(url)
    query = "&".join(part for part in (parts.query, f"password={written}") if part)
    return urlunsplit(parts._replace(query=query))


def test_serve_never_logs_a_password_from_the_query_nor_an_endpoint_token(server_factory, fresh_db):
    password_written, password = f"db%2Fpw%40{TAG}", f"db/pw@{TAG}"
    token, signature, closed = f"store-token-{TAG}", f"store-sig-{TAG}", free_port()
    server = server_factory(
        workers=1, database_url=with_query_password(fresh_db, password_written), wait_ready=False,
        MODEL_BUCKET="sira-models", **S3_ENV,
        S3_ENDPOINT_URL=f"http://{token}@127.0.0.1:{closed}/?X-Amz-Signature={signature}")
    wait_for(lambda: "cannot prepare the database at start" in server.log(),
             "the master's line about the database", timeout=60)
    assert server.stop() == 0
    log = server.log()
    about_database = [line for line in log.splitlines() if "cannot prepare the database at start" in line]
    assert about_database and f"s3://sira-models at http://****@127.0.0.1:{closed}/?X-Amz-Signature=****" \
        in about_database[0], about_database
    leaked = [secret for secret in (password_written, password, token, signature, TAG) if secret in log]
    assert leaked == [], leaked


def test_a_bad_url_setting_is_refused_without_printing_its_password():
    env = sira_env(S3_ENDPOINT_URL="https://AKIA:topsecret@minio:9000 oops")
    result = run_sira("config", env=env)
    assert result.returncode == 2
    assert "S3_ENDPOINT_URL" in result.stderr and "topsecret" not in result.stderr + result.stdout
