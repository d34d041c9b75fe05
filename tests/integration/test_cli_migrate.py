"""`sira migrate` as ops run it: twice in a row, and twice at once, each migration applied once."""

from __future__ import annotations

import subprocess

import psycopg

from tests.fixtures.server import REPO, SIRA, run_sira, sira_env


def applied_versions(dsn: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def test_migrate_twice_applies_each_migration_once(fresh_db, tmp_path):
    env = sira_env(SIRA_DATA_DIR=str(tmp_path), DATABASE_URL=fresh_db)
    first = run_sira("migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert "001_init.sql" in first.stdout
    second = run_sira("migrate", env=env)
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout
    versions = applied_versions(fresh_db)
    assert versions == sorted(set(versions)) and versions[0] == 1


def test_migrate_twice_at_once_applies_each_migration_once(fresh_db, tmp_path):
    env = sira_env(SIRA_DATA_DIR=str(tmp_path), DATABASE_URL=fresh_db)
    runs = [subprocess.Popen([*SIRA, "migrate"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    said_applied = [out for out, _ in outputs if "001_init.sql" in out]
    assert len(said_applied) == 1, outputs
    versions = applied_versions(fresh_db)
    assert len(versions) == len(set(versions))


def test_migrate_against_an_unreachable_database_exits_1(tmp_path):
    env = sira_env(SIRA_DATA_DIR=str(tmp_path), DATABASE_URL="postgresql://sira@127.0.0.1:1/sira?connect_timeout=2")
    result = run_sira("migrate", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("sira migrate: failed:")
