"""workers/bootstrap.py at start: an external Postgres that does not answer defers the job; our own does not."""

from __future__ import annotations

import logging

import psycopg
import pytest

from app.store.buckets import LocalModelStore
from tests.fixtures.server import free_port
from workers import bootstrap


@pytest.fixture
def dead_dsn() -> str:
    return f"postgresql://sira@127.0.0.1:{free_port()}/sira"  # nothing listens there


def test_an_external_postgres_that_does_not_answer_is_left_to_the_supervisor(monkeypatch, tmp_path, dead_dsn,
                                                                            caplog):
    monkeypatch.setattr(bootstrap, "START_PATIENCE_S", 1.0)
    attempts = []
    real = bootstrap.apply_migrations
    monkeypatch.setattr(bootstrap, "apply_migrations", lambda dsn: attempts.append(dsn) or real(dsn))
    with caplog.at_level(logging.ERROR, "sira.bootstrap"):
        assert bootstrap.prepare_database_at_start(dead_dsn, LocalModelStore(str(tmp_path)), external=True) is False
    assert len(attempts) > 1  # retried with backoff before giving up
    assert "the supervisor applies the migrations" in caplog.text


def test_the_embedded_postgres_failing_stops_the_start(tmp_path, dead_dsn):
    with pytest.raises(psycopg.OperationalError):
        bootstrap.prepare_database_at_start(dead_dsn, LocalModelStore(str(tmp_path)), external=False)


def test_a_reachable_postgres_is_migrated_and_gets_the_demo_model(tmp_path, fresh_db):
    assert bootstrap.prepare_database_at_start(fresh_db, LocalModelStore(str(tmp_path)), external=True) is True
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT count(*) FROM siramodel_registry WHERE status = 'production'").fetchone()[0] == 1
