"""Fixtures shared by every kind of test: a real Postgres and a real `sira serve`."""

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.server",
    "tests.fixtures.s3",
    "tests.fixtures.tls",
    "tests.fixtures.otlp",
]
