"""`sira models publish | list | promote` as real processes against real Postgres (and a real S3 API)."""

from __future__ import annotations

import json
import os
import re
import subprocess

import psycopg
import pytest

from app.store.buckets import sha256_of, storage_key
from tests.fixtures.server import REPO, SIRA, free_port, run_sira, sira_env

pytestmark = pytest.mark.timeout(180)

DEMO_MODEL = os.path.join(REPO, "workers", "demo", "fraud_score.onnx")
DEMO_SPEC = os.path.join(REPO, "workers", "demo", "fraud_score.spec.json")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@pytest.fixture
def env(tmp_path, migrated_db):
    return sira_env(SIRA_DATA_DIR=str(tmp_path / "data"), DATABASE_URL=migrated_db)


def publish(env, version="v2", *extra, file=DEMO_MODEL, spec=DEMO_SPEC, product="fraud_score", threshold="0.5"):
    args = ["models", "publish", file, "--product", product, "--version", version, "--threshold", threshold]
    if spec is not None:
        args += ["--spec", spec]
    return run_sira(*args, *extra, env=env)


def published_id(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    model_id = result.stdout.strip()
    assert UUID.fullmatch(model_id), result.stdout
    return model_id


def registry_rows(dsn: str) -> dict[str, dict]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("""SELECT model_id::text, version, product, status, storage_key, sha256, size_bytes,
                                      feature_spec, threshold, updated_at FROM siramodel_registry""").fetchall()
    names = ("model_id", "version", "product", "status", "storage_key", "sha256", "size_bytes",
             "feature_spec", "threshold", "updated_at")
    return {row[0]: dict(zip(names, row)) for row in rows}


def one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


# publish ----------------------------------------------------------------------------------------

def test_publish_checks_uploads_registers_and_prints_the_id(env, migrated_db, tmp_path):
    model_id = published_id(publish(env))
    row = registry_rows(migrated_db)[model_id]
    sha256, size = sha256_of(DEMO_MODEL)
    assert (row["version"], row["product"], row["status"], row["threshold"]) == ("v2", "fraud_score", "candidate", 0.5)
    assert (row["sha256"], row["size_bytes"], row["storage_key"]) == (sha256, size, storage_key(sha256))
    assert row["feature_spec"]["threshold"] == 0.5, "the spec carries the registry's threshold"
    stored = tmp_path / "data" / "store" / storage_key(sha256)
    assert sha256_of(str(stored)) == (sha256, size)


def test_publish_as_validated(env, migrated_db):
    model_id = published_id(publish(env, "v3", "--status", "validated"))
    assert registry_rows(migrated_db)[model_id]["status"] == "validated"


def test_publish_to_s3_puts_the_object_in_the_bucket(env, migrated_db, s3_bucket, tmp_path):
    model_id = published_id(publish({**env, **s3_bucket.sira_env()}))
    key = registry_rows(migrated_db)[model_id]["storage_key"]
    assert s3_bucket.keys() == [key]
    assert not (tmp_path / "data" / "store").exists(), "with MODEL_BUCKET the local store is not used"


def test_publish_with_s3_unreachable_fails_and_registers_nothing(env, migrated_db, s3_credentials):
    unreachable = {**env, "MODEL_BUCKET": "sira-models", "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
                   **s3_credentials}
    one_line_error(publish(unreachable), 1, "sira models publish:", "cannot connect to the endpoint")
    assert registry_rows(migrated_db) == {}


def write(tmp_path, name: str, data: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def demo_spec() -> dict:
    with open(DEMO_SPEC, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.mark.parametrize("case, fragment", [
    ("missing file", "does not exist"),
    ("directory", "not a regular file"),
    ("empty file", "is empty"),
    ("spec missing", "--spec: cannot read"),
    ("spec not json", "is not valid JSON"),
    ("spec invalid", "spec_version must be 1"),
    ("spec of another product", "is a spec of product 'fraud_score', not 'card_score'"),
])
def test_publish_usage_errors_exit_2_with_one_line(env, migrated_db, tmp_path, case, fragment):
    file, spec, product = DEMO_MODEL, DEMO_SPEC, "fraud_score"
    if case == "missing file":
        file = str(tmp_path / "nope.onnx")
    elif case == "directory":
        file = str(tmp_path)
    elif case == "empty file":
        file = write(tmp_path, "empty.onnx", b"")
    elif case == "spec missing":
        spec = str(tmp_path / "nope.json")
    elif case == "spec not json":
        spec = write(tmp_path, "spec.json", "{not json")
    elif case == "spec invalid":
        spec = write(tmp_path, "spec.json", json.dumps({**demo_spec(), "spec_version": 2}))
    elif case == "spec of another product":
        product = "card_score"
    one_line_error(publish(env, file=file, spec=spec, product=product), 2, "sira models publish:", fragment)
    assert registry_rows(migrated_db) == {}


@pytest.mark.parametrize("args, fragment", [
    (["--threshold", "1.5"], "argument --threshold: expected a number in (0, 1], got '1.5'"),
    (["--threshold", "0"], "argument --threshold"),
    (["--threshold", "nan"], "argument --threshold"),
    (["--threshold", "high"], "argument --threshold"),
    (["--status", "production"], "argument --status: invalid choice: 'production'"),
    (["--product", "Fraud Score"], "argument --product"),
    (["--version", "v 1"], "argument --version"),
])
def test_publish_bad_flags_exit_2(env, migrated_db, args, fragment):
    base = {"--product": "fraud_score", "--version": "v9", "--threshold": "0.5", "--spec": DEMO_SPEC}
    base.update(dict(zip(args[::2], args[1::2])))
    flags = [item for pair in base.items() for item in pair]
    result = run_sira("models", "publish", DEMO_MODEL, *flags, env=env)
    assert result.returncode == 2
    assert fragment in result.stderr.strip().splitlines()[-1]
    assert registry_rows(migrated_db) == {}


@pytest.mark.parametrize("missing", ["--product", "--version", "--threshold", "--spec"])
def test_publish_without_a_required_flag_exits_2(env, missing):
    base = {"--product": "fraud_score", "--version": "v9", "--threshold": "0.5", "--spec": DEMO_SPEC}
    del base[missing]
    result = run_sira("models", "publish", DEMO_MODEL, *[item for pair in base.items() for item in pair], env=env)
    assert result.returncode == 2
    assert missing in result.stderr.strip().splitlines()[-1]


def test_publish_of_a_file_that_is_not_onnx_fails(env, migrated_db, tmp_path):
    file = write(tmp_path, "model.onnx", os.urandom(4096))
    one_line_error(publish(env, file=file), 1, "model check failed", "cannot load ONNX model")
    assert registry_rows(migrated_db) == {}
    assert not (tmp_path / "data" / "store").exists(), "nothing is uploaded before the checks pass"


def test_publish_of_a_model_unlike_its_spec_fails(env, migrated_db, tmp_path):
    spec = demo_spec()
    spec["features"] = spec["features"][:-1]
    one_line_error(publish(env, spec=write(tmp_path, "spec.json", json.dumps(spec))), 1,
                   "model check failed", "features")
    assert registry_rows(migrated_db) == {}


def test_publish_of_a_duplicate_version_fails(env, migrated_db):
    first = published_id(publish(env, "v2"))
    one_line_error(publish(env, "v2"), 1, "product 'fraud_score' already has a model with version 'v2'")
    assert list(registry_rows(migrated_db)) == [first]


# list -------------------------------------------------------------------------------------------

def test_list_shows_models_as_a_table_and_as_json(env, tmp_path):
    v2 = published_id(publish(env, "v2"))
    v3 = published_id(publish(env, "v3", "--status", "validated"))
    other_spec = write(tmp_path, "card.json", json.dumps({**demo_spec(), "product": "card_score"}))
    card = published_id(publish(env, "c1", spec=other_spec, product="card_score"))

    table = run_sira("models", "list", env=env)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert lines[0].split() == ["MODEL_ID", "PRODUCT", "VERSION", "STATUS", "THRESHOLD", "CREATED"]
    assert [line.split()[0] for line in lines[1:]] == [card, v3, v2], "by product, newest first"

    as_json = run_sira("models", "list", "--json", "--product", "fraud_score", env=env)
    assert as_json.returncode == 0, as_json.stderr
    models = json.loads(as_json.stdout)
    assert [(m["model_id"], m["version"], m["status"]) for m in models] == [(v3, "v3", "validated"),
                                                                            (v2, "v2", "candidate")]
    assert set(models[0]) >= {"model_id", "name", "version", "product", "status", "threshold", "sha256",
                              "size_bytes", "storage_key", "created_at", "updated_at"}

    validated = json.loads(run_sira("models", "list", "--json", "--status", "validated", env=env).stdout)
    assert [m["model_id"] for m in validated] == [v3]


def test_list_of_an_empty_registry_prints_the_header(env):
    result = run_sira("models", "list", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["MODEL_ID", "PRODUCT", "VERSION", "STATUS", "THRESHOLD", "CREATED"]


# promote ----------------------------------------------------------------------------------------

def promote(env, model_id: str, target: str) -> subprocess.CompletedProcess:
    return run_sira("models", "promote", model_id, "--to", target, env=env)


def statuses(dsn: str) -> dict[str, str]:
    return {model_id: row["status"] for model_id, row in registry_rows(dsn).items()}


def test_promote_to_production_archives_the_old_one_in_the_same_transaction(env, migrated_db):
    old = published_id(publish(env, "v1"))
    assert promote(env, old, "production").returncode == 0
    new = published_id(publish(env, "v2"))

    with psycopg.connect(migrated_db, autocommit=True) as listener:
        listener.execute("LISTEN sira_config_changed")
        result = promote(env, new, "production")
        assert result.returncode == 0, result.stderr
        notes = [json.loads(note.payload) for note in listener.notifies(timeout=10, stop_after=1)]

    assert f"{new} (fraud_score v2): candidate -> production; archived {old}" in result.stdout
    assert statuses(migrated_db) == {old: "archived", new: "production"}
    rows = registry_rows(migrated_db)
    # updated_at is now() of the changing transaction: equal stamps mean one transaction.
    assert rows[old]["updated_at"] == rows[new]["updated_at"]
    # Postgres folds the transaction's two identical notifications into one.
    assert notes == [{"table": "siramodel_registry", "op": "UPDATE", "product": "fraud_score"}]


def test_promote_to_the_current_status_changes_nothing(env, migrated_db):
    model_id = published_id(publish(env, "v1", "--status", "validated"))
    before = registry_rows(migrated_db)[model_id]["updated_at"]
    with psycopg.connect(migrated_db, autocommit=True) as listener:
        listener.execute("LISTEN sira_config_changed")
        result = promote(env, model_id, "validated")
        assert list(listener.notifies(timeout=1)) == []
    assert result.returncode == 0 and "already validated; nothing changed" in result.stdout
    assert registry_rows(migrated_db)[model_id]["updated_at"] == before


@pytest.mark.parametrize("target", ["validated", "canary", "archived"])
def test_promote_through_the_other_statuses(env, migrated_db, target):
    model_id = published_id(publish(env, "v1"))
    result = promote(env, model_id, target)
    assert result.returncode == 0, result.stderr
    assert statuses(migrated_db) == {model_id: target}


def test_demoting_the_production_model_is_refused(env, migrated_db):
    model_id = published_id(publish(env, "v1"))
    promote(env, model_id, "production")
    one_line_error(promote(env, model_id, "archived"), 1, "is the production model of 'fraud_score'")
    assert statuses(migrated_db) == {model_id: "production"}


def test_promote_of_an_unknown_model_fails(env):
    one_line_error(promote(env, "00000000-0000-4000-8000-000000000000", "production"), 1,
                   "no model 00000000-0000-4000-8000-000000000000 in the registry")


def test_promote_of_a_malformed_id_exits_2(env):
    one_line_error(promote(env, "not-a-uuid", "production"), 2, "MODEL_ID: expected a UUID")


@pytest.mark.parametrize("target", ["candidate", "live"])
def test_promote_to_an_unknown_target_exits_2(env, target):
    result = promote(env, "00000000-0000-4000-8000-000000000000", target)
    assert result.returncode == 2
    assert "argument --to: invalid choice" in result.stderr.strip().splitlines()[-1]


def test_two_simultaneous_promotions_leave_one_production_model(env, migrated_db):
    first = published_id(publish(env, "v1"))
    second = published_id(publish(env, "v2"))
    processes = [subprocess.Popen([*SIRA, "models", "promote", model_id, "--to", "production"], env=env, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for model_id in (first, second)]
    try:
        results = [process.communicate(timeout=60) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert [process.returncode for process in processes] == [0, 0], results
    assert sorted(statuses(migrated_db).values()) == ["archived", "production"]


def test_models_help_exits_0(env):
    for args in (["models", "--help"], ["models", "publish", "--help"], ["models", "list", "--help"],
                 ["models", "promote", "--help"]):
        result = run_sira(*args, env=env)
        assert result.returncode == 0 and "usage: sira models" in result.stdout


@pytest.mark.parametrize("args, fragment", [
    (["models"], "the following arguments are required: ACTION"),
    (["models", "delete"], "invalid choice: 'delete'"),
    (["models", "list", "--status", "live"], "argument --status: invalid choice: 'live'"),
    (["models", "list", "--product", "Fraud Score"], "argument --product"),
    (["models", "promote", "00000000-0000-4000-8000-000000000000"], "the following arguments are required: --to"),
])
def test_bad_models_arguments_exit_2(env, args, fragment):
    result = run_sira(*args, env=env)
    assert result.returncode == 2
    assert fragment in result.stderr.strip().splitlines()[-1]
