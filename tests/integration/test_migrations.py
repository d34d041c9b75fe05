"""The migrations runner and the schema of 001_init.sql, against a real PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg import errors

from workers.migrate import MigrationError, apply_migrations, load_migrations

REPO_ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS_DIR = REPO_ROOT / "migrations"

# A child process: connect, say "ready", wait for "go" on stdin, then migrate and print the names.
MIGRATE_IN_CHILD = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
import psycopg
from workers.migrate import apply_migrations
dsn, directory = sys.argv[1], sys.argv[2]
psycopg.connect(dsn).close()
print("ready", flush=True)
sys.stdin.readline()
print(json.dumps(apply_migrations(dsn, directory)), flush=True)
"""


def applied_rows(dsn: str) -> list[tuple[int, str, str]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT version, name, checksum FROM schema_migrations ORDER BY version").fetchall()


def table_exists(dsn: str, name: str) -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]


def write_migrations(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


# -- the runner -------------------------------------------------------------------------------

def test_applies_every_migration_once_and_records_checksums(fresh_db):
    files = sorted(p for p in MIGRATIONS_DIR.glob("*.sql"))
    assert files, "the migrations package has no SQL file"
    assert apply_migrations(fresh_db) == [p.name for p in files]
    rows = applied_rows(fresh_db)
    assert [(version, name) for version, name, _ in rows] == [(int(p.name[:3]), p.name) for p in files]
    assert [checksum for _, _, checksum in rows] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    assert table_exists(fresh_db, "siramodel_predictions")

    assert apply_migrations(fresh_db) == []
    assert applied_rows(fresh_db) == rows


def test_package_migrations_are_found_without_a_directory():
    assert [m.file_name for m in load_migrations()] == sorted(p.name for p in MIGRATIONS_DIR.glob("*.sql"))


def test_concurrent_runs_in_separate_processes_apply_each_migration_exactly_once(fresh_db, tmp_path):
    folder = write_migrations(tmp_path / "migrations", {
        "001_init.sql": (MIGRATIONS_DIR / "001_init.sql").read_text(),
        # Holds the lock long enough that the other runs surely queue behind it.
        "002_slow.sql": "SELECT pg_sleep(1); CREATE TABLE slow_marker (id int);",
        "003_after.sql": "INSERT INTO slow_marker VALUES (3);",
    })
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    children = [subprocess.Popen([sys.executable, "-c", MIGRATE_IN_CHILD, fresh_db, str(folder)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env) for _ in range(4)]
    try:
        for child in children:
            assert child.stdout.readline().strip() == "ready"
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        outputs = [child.communicate(timeout=60) for child in children]
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert [child.returncode for child in children] == [0, 0, 0, 0], [err for _, err in outputs]
    applied = [json.loads(out) for out, _ in outputs]
    assert sorted(name for names in applied for name in names) == ["001_init.sql", "002_slow.sql", "003_after.sql"]
    assert sum(1 for names in applied if names) == 1, applied
    assert any("waiting for it" in err for _, err in outputs), "no run ever met the lock: the test proved nothing"
    assert [version for version, _, _ in applied_rows(fresh_db)] == [1, 2, 3]
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT id FROM slow_marker").fetchall() == [(3,)]


def test_changed_applied_file_is_an_error_naming_it(fresh_db, tmp_path):
    folder = write_migrations(tmp_path / "m", {"001_first.sql": "CREATE TABLE first_table (id int);"})
    assert apply_migrations(fresh_db, str(folder)) == ["001_first.sql"]
    (folder / "001_first.sql").write_text("CREATE TABLE first_table (id bigint);")
    (folder / "002_second.sql").write_text("CREATE TABLE second_table (id int);")
    with pytest.raises(MigrationError, match="001_first.sql changed after it was applied"):
        apply_migrations(fresh_db, str(folder))
    assert not table_exists(fresh_db, "second_table")


def test_badly_named_file_is_an_error_and_nothing_runs(fresh_db, tmp_path):
    for bad_name in ["1_short.sql", "001-dash.sql", "001_.sql", "abc_init.sql", "001_init.SQL", "002_a b.sql"]:
        folder = write_migrations(tmp_path / bad_name, {"001_ok.sql": "CREATE TABLE ok_table (id int);",
                                                        bad_name: "SELECT 1;"})
        with pytest.raises(MigrationError, match=bad_name.replace(".", r"\.")):
            apply_migrations(fresh_db, str(folder))
        assert not table_exists(fresh_db, "ok_table")


def test_two_files_with_one_version_are_an_error(tmp_path):
    folder = write_migrations(tmp_path / "m", {"002_a.sql": "SELECT 1;", "002_b.sql": "SELECT 1;"})
    with pytest.raises(MigrationError, match="same version"):
        load_migrations(str(folder))


def test_other_files_in_the_folder_are_ignored(tmp_path):
    folder = write_migrations(tmp_path / "m", {"001_a.sql": "SELECT 1;", "README.md": "notes", ".#001_a.sql": "x"})
    (folder / "__init__.py").write_text("")
    assert [m.file_name for m in load_migrations(str(folder))] == ["001_a.sql"]


def test_failing_migration_rolls_back_entirely_and_is_not_recorded(fresh_db, tmp_path):
    folder = write_migrations(tmp_path / "m", {
        "001_good.sql": "CREATE TABLE good_table (id int);",
        "002_broken.sql": "CREATE TABLE half_done (id int);\nSELECT no_such_function();",
        "003_later.sql": "CREATE TABLE later_table (id int);",
    })
    with pytest.raises(MigrationError, match="002_broken.sql failed") as raised:
        apply_migrations(fresh_db, str(folder))
    assert isinstance(raised.value.__cause__, errors.UndefinedFunction)
    assert table_exists(fresh_db, "good_table")
    assert not table_exists(fresh_db, "half_done")
    assert not table_exists(fresh_db, "later_table")
    assert [name for _, name, _ in applied_rows(fresh_db)] == ["001_good.sql"]

    (folder / "002_broken.sql").write_text("CREATE TABLE half_done (id int);")
    assert apply_migrations(fresh_db, str(folder)) == ["002_broken.sql", "003_later.sql"]


def test_missing_or_older_files_are_errors_but_newer_applied_ones_are_tolerated(fresh_db, tmp_path):
    folder = write_migrations(tmp_path / "m", {"001_a.sql": "SELECT 1;", "003_c.sql": "SELECT 1;"})
    apply_migrations(fresh_db, str(folder))
    (folder / "002_b.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="002_b.sql is older than 003_c.sql"):
        apply_migrations(fresh_db, str(folder))
    (folder / "002_b.sql").unlink()
    (folder / "001_a.sql").unlink()
    with pytest.raises(MigrationError, match="001_a.sql is recorded as applied but its file is missing"):
        apply_migrations(fresh_db, str(folder))
    (folder / "001_a.sql").write_text("SELECT 1;")
    (folder / "003_c.sql").unlink()  # as an older release sees a database that a newer one migrated
    assert apply_migrations(fresh_db, str(folder)) == []


# -- the schema of 001_init.sql ------------------------------------------------------------------

def insert_model(conn, product="fraud_score", version="v1", status="validated", **overrides) -> uuid.UUID:
    row = dict(name="sira-fraud", version=version, product=product, status=status,
               storage_key="models/" + "ab" * 32, sha256="ab" * 32, size_bytes=1024, threshold=0.5)
    row.update(overrides)
    columns = ", ".join(row)
    placeholders = ", ".join(["%s"] * len(row))
    return conn.execute(f"INSERT INTO siramodel_registry ({columns}) VALUES ({placeholders}) RETURNING model_id",
                        list(row.values())).fetchone()[0]


def insert_prediction(conn, model_id, role="production", decision="allow", score=0.1, latency_ms=1.0,
                      cached=False, product="fraud_score", age_hours=0.0, prediction_id=None) -> uuid.UUID:
    prediction_id = prediction_id or uuid.uuid4()
    conn.execute(
        "INSERT INTO siramodel_predictions (prediction_id, event_id, product, model_id, model_role, score,"
        " decision, explanation, latency_ms, cached, request_id, created_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, '[]', %s, %s, 'req', now() - make_interval(secs => %s))",
        (prediction_id, f"evt-{uuid.uuid4().hex[:8]}", product, model_id, role, score, decision,
         latency_ms, cached, age_hours * 3600))
    return prediction_id


@pytest.fixture
def db(migrated_db):
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        yield conn


def test_prediction_log_refuses_update_delete_and_truncate(db):
    model = insert_model(db)
    kept = insert_prediction(db, model)
    for statement, op in [("UPDATE siramodel_predictions SET score = 0.9", "UPDATE"),
                          ("DELETE FROM siramodel_predictions", "DELETE"),
                          ("TRUNCATE siramodel_predictions", "TRUNCATE"),
                          ("DELETE FROM siramodel_predictions WHERE false", "DELETE")]:
        with pytest.raises(errors.RaiseException, match=f"siramodel_predictions is append-only: {op} refused"):
            db.execute(statement)
    assert db.execute("SELECT prediction_id, score FROM siramodel_predictions").fetchall() == [(kept, 0.1)]


def test_prediction_log_takes_a_replayed_batch_once_through_copy_and_on_conflict(db):
    model = insert_model(db)
    already = insert_prediction(db, model)
    (made,) = db.execute("SELECT created_at FROM siramodel_predictions WHERE prediction_id = %s",
                         (already,)).fetchone()
    # a replayed record carries the created_at it was made with: it meets its first copy
    batch = [(already, "evt-1", made), (uuid.uuid4(), "evt-2", made), (uuid.uuid4(), "evt-3", made)]
    for _ in range(2):  # the second pass is the replay of the same spool
        with db.transaction():
            db.execute("CREATE TEMP TABLE incoming (LIKE siramodel_predictions INCLUDING DEFAULTS) ON COMMIT DROP")
            with db.cursor().copy("COPY incoming (prediction_id, event_id, product, model_id, model_role, score,"
                                  " decision, created_at) FROM STDIN") as copy:
                for prediction_id, event_id, created_at in batch:
                    copy.write_row((prediction_id, event_id, "fraud_score", model, "canary", 0.5, "review",
                                    created_at))
            db.execute("INSERT INTO siramodel_predictions SELECT * FROM incoming"
                       " ON CONFLICT (prediction_id, created_at) DO NOTHING")
    rows = db.execute("SELECT prediction_id, model_role FROM siramodel_predictions").fetchall()
    assert sorted(rows) == sorted([(already, "production"), (batch[1][0], "canary"), (batch[2][0], "canary")])


def test_prediction_with_an_unknown_decision_or_role_is_refused(db):
    model = insert_model(db)
    with pytest.raises(errors.CheckViolation, match="siramodel_predictions_decision_check"):
        insert_prediction(db, model, decision="deny")
    with pytest.raises(errors.CheckViolation, match="siramodel_predictions_model_role_check"):
        insert_prediction(db, model, role="champion")
    insert_prediction(db, model, role="shadow", decision="review")
    assert db.execute("SELECT count(*) FROM siramodel_predictions").fetchone() == (1,)


def test_at_most_one_production_model_per_product(db):
    insert_model(db, version="v1", status="production")
    insert_model(db, product="other_product", version="v1", status="production")
    with pytest.raises(errors.UniqueViolation, match="siramodel_registry_one_production"):
        insert_model(db, version="v2", status="production")
    second = insert_model(db, version="v2", status="validated")
    with db.transaction():  # promotion: archive the old one, then promote, in one transaction
        db.execute("UPDATE siramodel_registry SET status = 'archived'"
                   " WHERE product = 'fraud_score' AND status = 'production'")
        db.execute("UPDATE siramodel_registry SET status = 'production' WHERE model_id = %s", (second,))
    assert db.execute("SELECT model_id FROM siramodel_registry WHERE product = 'fraud_score'"
                      " AND status = 'production'").fetchall() == [(second,)]


def test_registry_refuses_malformed_models(db):
    for overrides, constraint in [({"sha256": "AB" * 32}, "sha256"), ({"sha256": "ab" * 31}, "sha256"),
                                  ({"threshold": 1.5}, "threshold"), ({"threshold": float("nan")}, "threshold"),
                                  ({"status": "live"}, "status"), ({"size_bytes": 0}, "size_bytes")]:
        with pytest.raises(errors.CheckViolation, match=f"siramodel_registry_{constraint}_check"):
            insert_model(db, **overrides)
    assert db.execute("SELECT count(*) FROM siramodel_registry").fetchone() == (0,)


def test_registry_refuses_a_second_model_with_the_same_product_and_version(db):
    insert_model(db, version="v7")
    with pytest.raises(errors.UniqueViolation, match="siramodel_registry_product_version_key"):
        insert_model(db, version="v7")


def test_registry_update_moves_updated_at(db):
    model = insert_model(db)
    with db.transaction():  # now() is the transaction's start: set the old time in an earlier one
        db.execute("UPDATE siramodel_registry SET updated_at = now() - interval '1 day' WHERE model_id = %s", (model,))
    db.execute("UPDATE siramodel_registry SET status = 'canary' WHERE model_id = %s", (model,))
    created, updated = db.execute("SELECT created_at, updated_at FROM siramodel_registry").fetchone()
    assert updated >= created


def test_compare_canary_performance_returns_figures_per_role(db):
    production = insert_model(db, version="v1", status="production")
    canary = insert_model(db, version="v2", status="canary")
    production_rows = [(0.1, "allow", 2.0, False), (0.2, "allow", 4.0, False), (0.6, "review", 6.0, False),
                       (0.9, "block", 8.0, False), (0.1, "allow", 0.01, True)]
    canary_rows = [(0.3, "allow", 10.0, False), (0.95, "block", 30.0, False)]
    for score, decision, latency, cached in production_rows:
        insert_prediction(db, production, "production", decision, score, latency, cached)
    for score, decision, latency, cached in canary_rows:
        insert_prediction(db, canary, "canary", decision, score, latency, cached)
    insert_prediction(db, canary, "canary", "block", 1.0, 999.0, age_hours=3)  # outside the window
    insert_prediction(db, canary, "canary", "block", 1.0, 999.0, product="other")  # another product
    insert_prediction(db, insert_model(db, version="v0"), "shadow", "block", 1.0, 999.0)  # another model

    rows = db.execute("SELECT * FROM compare_canary_performance('fraud_score', %s, %s, 1)",
                      (canary, production)).fetchall()

    def expected(role, model, samples):
        latencies = [latency for _, _, latency, cached in samples if not cached]
        decisions = [decision for _, decision, _, _ in samples]
        return (role, model, len(samples), pytest.approx(np.mean([s[0] for s in samples])),
                *(pytest.approx(np.percentile(latencies, q)) for q in (50, 95, 99)),
                *(pytest.approx(decisions.count(d) / len(samples)) for d in ("block", "review", "allow")))

    assert rows == [expected("production", production, production_rows), expected("canary", canary, canary_rows)]
    assert db.execute("SELECT count(*) FROM compare_canary_performance('fraud_score', %s, %s, 1)",
                      (uuid.uuid4(), uuid.uuid4())).fetchone()[0] == 0


def test_canary_config_history_records_every_change_in_order(db):
    production = insert_model(db, version="v1", status="production")
    canary = insert_model(db, version="v2", status="canary")
    db.execute("INSERT INTO sira_canary_config (product, canary_model_id, production_model_id, canary_percent,"
               " started_at, updated_by) VALUES ('fraud_score', %s, %s, 10, now(), 'ops_ana')", (canary, production))
    db.execute("UPDATE sira_canary_config SET canary_percent = 25, updated_by = 'ops_bo' WHERE product = 'fraud_score'")
    db.execute("UPDATE sira_canary_config SET mode = 'shadow' WHERE product = 'fraud_score'")
    history = db.execute("SELECT operation, canary_model_id, production_model_id, canary_percent, mode, updated_by"
                         " FROM sira_canary_config_history ORDER BY history_id").fetchall()
    assert [(op, float(percent), mode, by) for op, _, _, percent, mode, by in history] == [
        ("INSERT", 10.0, "canary", "ops_ana"),
        ("UPDATE", 25.0, "canary", "ops_bo"),
        ("UPDATE", 25.0, "shadow", "ops_bo"),
    ]
    assert {(c, p) for _, c, p, _, _, _ in history} == {(canary, production)}
    with pytest.raises(errors.RaiseException, match="append-only"):
        db.execute("DELETE FROM sira_canary_config_history")


def test_canary_config_refuses_impossible_settings(db):
    production = insert_model(db, version="v1", status="production")
    canary = insert_model(db, version="v2")
    for canary_id, production_id, percent, constraint in [
            (canary, production, 101, "canary_percent"), (canary, production, -1, "canary_percent"),
            (None, production, 10, "sira_canary_config_traffic_needs_model"),
            (production, production, 10, "sira_canary_config_two_models")]:
        with pytest.raises(errors.CheckViolation, match=constraint):
            db.execute("INSERT INTO sira_canary_config (product, canary_model_id, production_model_id, canary_percent)"
                       " VALUES ('fraud_score', %s, %s, %s)", (canary_id, production_id, percent))
    assert db.execute("SELECT count(*) FROM sira_canary_config").fetchone() == (0,)


def test_canary_config_refuses_an_unknown_model(db):
    with pytest.raises(errors.ForeignKeyViolation):
        db.execute("INSERT INTO sira_canary_config (product, canary_model_id, canary_percent)"
                   " VALUES ('fraud_score', %s, 5)", (uuid.uuid4(),))


def test_config_changes_are_notified_to_listeners(migrated_db):
    with psycopg.connect(migrated_db, autocommit=True) as listener, \
            psycopg.connect(migrated_db, autocommit=True) as writer:
        listener.execute("LISTEN sira_config_changed")
        model = insert_model(writer, status="production")
        writer.execute("INSERT INTO sira_canary_config (product, production_model_id) VALUES ('fraud_score', %s)",
                       (model,))
        payloads = []
        for notify in listener.notifies(timeout=5):
            payloads.append(json.loads(notify.payload))
            if len(payloads) == 2:
                break
    assert payloads == [{"table": "siramodel_registry", "op": "INSERT", "product": "fraud_score"},
                        {"table": "sira_canary_config", "op": "INSERT", "product": "fraud_score"}]


def test_rollback_log_and_metrics_accept_the_rows_the_runbook_shows(db):
    production = insert_model(db, version="v1", status="production")
    canary = insert_model(db, version="v2", status="canary")
    db.execute("INSERT INTO sira_canary_rollback_log (product, canary_model_id, production_model_id, reason, metrics)"
               " VALUES ('fraud_score', %s, %s, 'high_error_rate', '{\"error_rate\": 0.2}')", (canary, production))
    db.execute("INSERT INTO sira_inference_metrics (window_start, window_seconds, product, model_id, model_role,"
               " requests, errors, p50_ms, p95_ms, p99_ms, allow_count, review_count, block_count)"
               " VALUES (date_trunc('minute', now()), 60, 'fraud_score', %s, 'canary', 100, 2, 1, 5, 9, 90, 6, 4)",
               (canary,))
    assert db.execute("SELECT reason, triggered_by FROM sira_canary_rollback_log"
                      " WHERE product = 'fraud_score' ORDER BY created_at DESC LIMIT 1").fetchone() == (
        "high_error_rate", "auto")
    assert db.execute("SELECT requests FROM sira_inference_metrics WHERE model_role = 'canary'"
                      " AND window_start >= now() - interval '1 hour'").fetchall() == [(100,)]
    with pytest.raises(errors.UniqueViolation):
        db.execute("INSERT INTO sira_inference_metrics (window_start, window_seconds, product, model_id, model_role)"
                   " VALUES (date_trunc('minute', now()), 60, 'fraud_score', %s, 'canary')", (canary,))
