"""app/store/canary_config.py against a real PostgreSQL: checks, started_at, history, rollbacks and stops."""

from __future__ import annotations

import asyncio
import decimal
import json
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from app.store import canary_config, registry
from app.store.canary_config import (
    CanaryConfigConflict,
    CanaryModelNotRegistered,
    CanaryNotConfigured,
    InvalidCanaryValue,
)


def add_model(conn: psycopg.Connection, product: str = "fraud_score", status: str = "candidate") -> str:
    return registry.register_model(
        conn, name=f"test-{product}", version=f"v-{uuid.uuid4().hex[:8]}", product=product, status=status,
        storage_key=f"{uuid.uuid4().hex}.onnx", sha256="0" * 64, size_bytes=1, feature_spec={}, threshold=0.5)


@pytest.fixture
def db(migrated_db):
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        yield conn


@pytest.fixture
def models(db) -> dict[str, str]:
    """fraud_score's production model and a candidate; an archived one; another product's two."""
    return {"production": add_model(db, status="production"), "canary": add_model(db),
            "archived": add_model(db, status="archived"), "validated": add_model(db, status="validated"),
            "other_production": add_model(db, "risk_score", "production"), "other": add_model(db, "risk_score")}


def run(dsn: str, action, *args, **kwargs):
    """One async canary_config function on its own connection, as the API calls it."""
    async def scenario():
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            result = await action(conn, *args, **kwargs)
            await conn.commit()
            return result
    return asyncio.run(scenario())


def set_canary(dsn: str, models: dict, percent=10, mode="canary", canary: str | None = None,
               production: str | None = None, product: str = "fraud_score", subject: str = "ops_ana"):
    return run(dsn, canary_config.set_canary, product=product, canary_model_id=canary or models["canary"],
               production_model_id=production or models["production"], canary_percent=percent, mode=mode,
               subject=subject)


def history(db) -> list[tuple]:
    return db.execute("SELECT operation, canary_model_id::text, canary_percent::float, mode, updated_by"
                      " FROM sira_canary_config_history ORDER BY history_id").fetchall()


def log_rows(db) -> list[tuple]:
    return db.execute("SELECT product, canary_model_id::text, production_model_id::text, reason, metrics,"
                      " triggered_by FROM sira_canary_rollback_log ORDER BY id").fetchall()


def test_set_canary_stores_the_config_and_the_trigger_writes_its_history(migrated_db, db, models):
    config = set_canary(migrated_db, models, percent=12.5)
    assert (config.product, config.canary_model_id, config.production_model_id) == \
        ("fraud_score", models["canary"], models["production"])
    assert (config.canary_percent, config.basis_points, config.mode, config.updated_by) == \
        (12.5, 1250, "canary", "ops_ana")
    assert config.started_at is not None and config.updated_at is not None
    assert run(migrated_db, canary_config.get_canary, "fraud_score") == config
    assert history(db) == [("INSERT", models["canary"], 12.5, "canary", "ops_ana")]
    statuses = dict(db.execute("SELECT model_id::text, status FROM siramodel_registry").fetchall())
    assert statuses[models["canary"]] == "candidate", "the registry status is left as it was"


def test_get_canary_of_an_unconfigured_product_is_none(migrated_db):
    assert run(migrated_db, canary_config.get_canary, "fraud_score") is None


def test_a_change_notifies_sira_config_changed(migrated_db, models):
    with psycopg.connect(migrated_db, autocommit=True) as listener:
        listener.execute("LISTEN sira_config_changed")
        set_canary(migrated_db, models)
        notes = [json.loads(note.payload) for note in listener.notifies(timeout=10, stop_after=1)]
    assert notes == [{"table": "sira_canary_config", "op": "INSERT", "product": "fraud_score"}]


@pytest.mark.parametrize("canary, production, error, field", [
    (None, "unknown", CanaryModelNotRegistered, "production_model_id"),
    ("unknown", None, CanaryModelNotRegistered, "canary_model_id"),
    ("other", None, CanaryConfigConflict, "canary_model_id"),
    ("archived", None, CanaryConfigConflict, "canary_model_id"),
    ("production", None, CanaryConfigConflict, "canary_model_id"),
    (None, "validated", CanaryConfigConflict, "production_model_id"),
    (None, "other_production", CanaryConfigConflict, "production_model_id"),
])
def test_refused_model_pairs_write_nothing(migrated_db, db, models, canary, production, error, field):
    ids = dict(models, unknown=str(uuid.uuid4()))
    with pytest.raises(error) as refused:
        set_canary(migrated_db, models, canary=ids[canary] if canary else None,
                   production=ids[production] if production else None)
    assert refused.value.field == field
    assert "\n" not in str(refused.value)
    assert db.execute("SELECT count(*) FROM sira_canary_config").fetchone()[0] == 0
    assert history(db) == []


def test_a_stale_production_id_is_refused(migrated_db, db, models):
    new_production = add_model(db, status="validated")
    run(migrated_db, registry.promote_model, new_production, "production")  # archives models["production"]
    with pytest.raises(CanaryConfigConflict, match="not the current production model") as refused:
        set_canary(migrated_db, models)
    assert refused.value.field == "production_model_id"
    assert set_canary(migrated_db, models, production=new_production).production_model_id == new_production


@pytest.mark.parametrize("percent", [101, -1, 10.123, 0.001, "ten", True, None, float("nan"), float("inf")])
def test_bad_percents_are_refused(migrated_db, models, percent):
    with pytest.raises(InvalidCanaryValue) as refused:
        set_canary(migrated_db, models, percent=percent)
    assert refused.value.field == "canary_percent"


@pytest.mark.parametrize("percent, stored", [(0, 0.0), (100, 100.0), (0.01, 0.01), (33.33, 33.33),
                                             (0.35000000000000003, 0.35), (decimal.Decimal("7.5"), 7.5)])
def test_percents_of_two_decimals_are_stored_exactly(migrated_db, models, percent, stored):
    config = set_canary(migrated_db, models, percent=percent)
    assert config.canary_percent == stored
    assert config.basis_points == round(stored * 100)


@pytest.mark.parametrize("values, field", [({"mode": "blue"}, "mode"), ({"canary": "not-a-uuid"}, "canary_model_id"),
                                           ({"production": "123"}, "production_model_id")])
def test_bad_mode_or_model_id_is_refused(migrated_db, models, values, field):
    with pytest.raises(InvalidCanaryValue) as refused:
        set_canary(migrated_db, models, **values)
    assert refused.value.field == field


def test_started_at_restarts_for_a_new_model_or_a_restart_only(migrated_db, db, models):
    first = set_canary(migrated_db, models, percent=5)
    assert set_canary(migrated_db, models, percent=20).started_at == first.started_at
    assert set_canary(migrated_db, models, percent=20, mode="shadow").started_at == first.started_at
    second_model = set_canary(migrated_db, models, percent=20, canary=models["validated"])
    assert second_model.started_at > first.started_at
    zero = set_canary(migrated_db, models, percent=0, canary=models["validated"])
    assert zero.started_at == second_model.started_at
    restarted = set_canary(migrated_db, models, percent=1, canary=models["validated"])
    assert restarted.started_at > zero.started_at
    stopped = run(migrated_db, canary_config.stop_canary, "fraud_score", "ops_bo")
    shadow = set_canary(migrated_db, models, percent=0, mode="shadow", canary=models["validated"])
    assert shadow.started_at > stopped.started_at, "a stopped canary put back in shadow restarts"
    assert [row[0] for row in history(db)] == ["INSERT"] + ["UPDATE"] * 7


def test_the_routing_seed_is_new_for_each_canary_and_kept_while_it_runs(migrated_db, db, models):
    first = set_canary(migrated_db, models, percent=5)
    assert len(first.seed_bytes) == 16 and first.seed_bytes != bytes(16)
    assert first.routing_seed not in repr(first)
    raised = set_canary(migrated_db, models, percent=25)
    shadow = set_canary(migrated_db, models, percent=25, mode="shadow")
    assert raised.routing_seed == shadow.routing_seed == first.routing_seed, "the same canary keeps its buckets"
    assert canary_config.active_canaries(db)[0].routing_seed == first.routing_seed  # what the supervisor mirrors
    second_model = set_canary(migrated_db, models, percent=25, canary=models["validated"])
    assert second_model.routing_seed != first.routing_seed
    canary_config.roll_back(db, "fraud_score", models["validated"], "latency_p95", {})
    stopped = run(migrated_db, canary_config.get_canary, "fraud_score")
    assert stopped.routing_seed == second_model.routing_seed  # a stop changes nothing but the share
    restarted = set_canary(migrated_db, models, percent=10, canary=models["validated"])
    assert restarted.routing_seed not in (first.routing_seed, second_model.routing_seed)
    columns = db.execute("SELECT column_name FROM information_schema.columns"
                         " WHERE table_name = 'sira_canary_config_history'").fetchall()
    assert ("routing_seed",) not in columns, "the history keeps no copy of the seed"


def test_migration_003_gives_existing_configs_distinct_seeds(fresh_db, tmp_path):
    """A database at 002 with canary configs: 003 adds a 16-byte seed to each, all different."""
    from workers.migrate import apply_migrations

    shipped, folder = Path(__file__).resolve().parents[2] / "migrations", tmp_path / "migrations"
    folder.mkdir()
    for name in ("001_init.sql", "002_trace_id.sql"):
        (folder / name).write_text((shipped / name).read_text())
    apply_migrations(fresh_db, str(folder))
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        for product in ("fraud_score", "risk_score", "chargeback"):
            conn.execute("INSERT INTO sira_canary_config (product) VALUES (%s)", (product,))
        (folder / "003_canary_seed.sql").write_text((shipped / "003_canary_seed.sql").read_text())
        assert apply_migrations(fresh_db, str(folder)) == ["003_canary_seed.sql"]
        seeds = [row[0] for row in conn.execute("SELECT routing_seed FROM sira_canary_config").fetchall()]
        assert len(seeds) == 3 and len(set(seeds)) == 3 and all(len(seed) == 16 for seed in seeds)
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE sira_canary_config SET routing_seed = %s", (b"\x00",))


def test_active_canaries_are_those_with_traffic_or_in_shadow(migrated_db, db, models):
    set_canary(migrated_db, models, percent=0)
    assert canary_config.active_canaries(db) == []
    set_canary(migrated_db, models, percent=0, mode="shadow")
    set_canary(migrated_db, models, percent=2.5, product="risk_score", canary=models["other"],
               production=models["other_production"])
    active = canary_config.active_canaries(db)
    assert [(c.product, c.mode, c.basis_points) for c in active] == [("fraud_score", "shadow", 0),
                                                                     ("risk_score", "canary", 250)]
    assert all(config.active for config in active)


def test_roll_back_stops_once_and_logs_the_figures(migrated_db, db, models):
    set_canary(migrated_db, models, percent=10)
    figures = {"canary_error_rate": 0.2, "production_error_rate": 0.01}
    assert canary_config.roll_back(db, "fraud_score", models["canary"], "error rate", figures) is True
    assert canary_config.roll_back(db, "fraud_score", models["canary"], "error rate", figures) is False
    config = run(migrated_db, canary_config.get_canary, "fraud_score")
    assert (config.canary_percent, config.mode, config.updated_by, config.active) == (0.0, "canary",
                                                                                       "auto-rollback", False)
    assert config.canary_model_id == models["canary"], "a stopped config still says which canary ran"
    assert log_rows(db) == [("fraud_score", models["canary"], models["production"], "error rate", figures, "auto")]
    assert history(db)[-1] == ("UPDATE", models["canary"], 0.0, "canary", "auto-rollback")


def test_roll_back_of_another_canary_or_product_changes_nothing(migrated_db, db, models):
    set_canary(migrated_db, models, percent=10)
    assert canary_config.roll_back(db, "fraud_score", models["validated"], "stale", {}) is False
    assert canary_config.roll_back(db, "risk_score", models["canary"], "stale", {}) is False
    assert run(migrated_db, canary_config.get_canary, "fraud_score").canary_percent == 10.0
    assert log_rows(db) == []


def test_roll_back_stops_a_shadow_canary(migrated_db, db, models):
    set_canary(migrated_db, models, percent=0, mode="shadow")
    assert canary_config.roll_back(db, "fraud_score", models["canary"], "latency", {"p95_ms": 40}) is True
    assert canary_config.active_canaries(db) == []


def test_two_instances_rolling_back_at_once_log_one_rollback(migrated_db, db, models):
    """The second instance waits on the row lock, then finds the canary stopped: False, no second row."""
    set_canary(migrated_db, models, percent=10)
    results = {}
    with psycopg.connect(migrated_db) as first, psycopg.connect(migrated_db, autocommit=True) as second:
        with first.transaction():
            results["first"] = canary_config.roll_back(first, "fraud_score", models["canary"], "first", {})
            waiter = threading.Thread(target=lambda: results.update(
                second=canary_config.roll_back(second, "fraud_score", models["canary"], "second", {})))
            waiter.start()
            wait_until_blocked(db, second.info.backend_pid)
        waiter.join(30)
    assert results == {"first": True, "second": False}
    assert [row[3] for row in log_rows(db)] == ["first"]


def wait_until_blocked(db, pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = db.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
        if row and row[0] == "Lock":
            return
        time.sleep(0.02)
    raise TimeoutError(f"backend {pid} never waited on a lock")


def test_stop_logs_a_manual_rollback_once(migrated_db, db, models):
    set_canary(migrated_db, models, percent=25, mode="shadow")
    stopped = run(migrated_db, canary_config.stop_canary, "fraud_score", "ops_bo")
    assert (stopped.canary_percent, stopped.mode, stopped.updated_by) == (0.0, "canary", "ops_bo")
    again = run(migrated_db, canary_config.stop_canary, "fraud_score", "ops_cy")
    assert again == stopped, "stopping a stopped canary changes nothing"
    assert log_rows(db) == [("fraud_score", models["canary"], models["production"], "manual stop",
                             {"canary_percent": 25.0, "mode": "shadow"}, "manual:ops_bo")]


def test_stop_of_an_unconfigured_product_is_refused(migrated_db):
    with pytest.raises(CanaryNotConfigured) as refused:
        run(migrated_db, canary_config.stop_canary, "fraud_score", "ops_bo")
    assert refused.value.field == "product"


def test_rollback_log_is_newest_first_and_limited(migrated_db, db, models):
    for reason in ("one", "two", "three"):
        set_canary(migrated_db, models, percent=10)
        assert canary_config.roll_back(db, "fraud_score", models["canary"], reason, {"n": reason})
    entries = run(migrated_db, canary_config.rollback_log, "fraud_score", 2)
    assert [entry["reason"] for entry in entries] == ["three", "two"]
    assert set(entries[0]) == {"id", "canary_model_id", "production_model_id", "reason", "metrics",
                               "triggered_by", "created_at"}
    assert run(migrated_db, canary_config.rollback_log, "risk_score") == []
