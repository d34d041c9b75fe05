"""`sira models publish | list | promote`: check a model, store it, register it, move it through its life.

Exit codes as for every sira command: 0 done; 2 usage, for a flag or file that is wrong before
anything runs (missing file, unreadable or invalid spec, threshold out of range, a spec of another
product); 1 failed, for a model that fails its checks (not ONNX, inputs unlike its spec, a smoke
row that does not score), a store or database that fails, or a registry that refuses (duplicate
version, unknown model id). Every error is one line on stderr; stdout carries only the result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterator

import psycopg

from app.db import connect, connect_async
from app.scoring.features import FeatureSpec
from app.store import registry
from app.store.buckets import ModelStoreError, open_model_store
from conf.settings import Settings
from workers.cli_usage import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError

PRODUCT_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")  # the API's product names (app/http/requests.py)
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,63}")
MODEL_ID_PATTERN = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def matching(pattern: re.Pattern, what: str):
    """An argparse type that accepts values matching pattern."""
    def check(value: str) -> str:
        if pattern.fullmatch(value) is None:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return value

    check.__name__ = what
    return check


def threshold(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0.0 < number <= 1.0:  # also false for nan
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value!r}")
    return number


def add_models_parser(commands: argparse._SubParsersAction) -> None:
    """Register `sira models` and its subcommands on the sira parser."""
    models = commands.add_parser("models", help="publish, list and promote models of the registry",
                                 description="Publish, list and promote models of the registry.")
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    publish = actions.add_parser(
        "publish", help="check a model, upload it to the model store and register it",
        description="Check that FILE loads, matches its feature spec and scores a smoke row; upload it "
                    "to the model store (MODEL_BUCKET, else $SIRA_DATA_DIR/store); register it. "
                    "Prints the new model id.")
    publish.add_argument("file", metavar="FILE", help="the ONNX model")
    publish.add_argument("--product", required=True, type=matching(PRODUCT_PATTERN, "a product such as fraud_score"),
                         help="the product it scores, such as fraud_score (must match the spec's)")
    publish.add_argument("--version", required=True,
                         type=matching(VERSION_PATTERN, "a version of letters, digits, '.', '_', '-' (1-64)"),
                         help="unique within the product, such as v20260115_1430")
    publish.add_argument("--threshold", required=True, type=threshold,
                         help="block threshold in (0, 1]; review starts at 0.7 times it")
    publish.add_argument("--spec", required=True, metavar="SPEC.json", help="the model's feature spec")
    publish.add_argument("--status", choices=registry.PUBLISH_STATUSES, default="candidate",
                         help="initial status (default candidate)")

    listing = actions.add_parser("list", help="list registered models",
                                 description="List registered models by product, newest first.")
    listing.add_argument("--product", type=matching(PRODUCT_PATTERN, "a product such as fraud_score"))
    listing.add_argument("--status", choices=registry.STATUSES)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")

    promote = actions.add_parser(
        "promote", help="move a model to validated, canary, production or archived",
        description="Move a model to another status. Promoting to production archives the product's "
                    "production model in the same transaction; every instance is notified.")
    promote.add_argument("model_id", metavar="MODEL_ID", help="the model's id (a UUID)")
    promote.add_argument("--to", required=True, choices=registry.PROMOTION_TARGETS, dest="target")


class ModelCheckFailed(Exception):
    """The model does not load, does not match its spec, or does not score its smoke row."""


def command_models(settings: Settings, args: argparse.Namespace) -> int:
    """Run one `sira models` action; every error the user can act on is one line."""
    action = {"publish": publish_model, "list": list_models, "promote": promote_model}[args.models_command]
    try:
        return action(settings, args)
    except UsageError as exc:
        print(f"sira models {args.models_command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (registry.RegistryError, ModelStoreError, ModelCheckFailed) as exc:
        print(f"sira models {args.models_command}: {flattened(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    except psycopg.OperationalError as exc:
        print(f"sira models {args.models_command}: database: {flattened(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE


def flattened(message: str) -> str:
    """A message on one line, its whitespace runs (a psycopg error's newlines) made single spaces."""
    return " ".join(message.split())


def read_spec(path: str) -> dict:
    """The spec file as a validated dict; UsageError naming the file and the problem."""
    try:
        with open(path, "rb") as handle:
            raw = json.load(handle)
    except OSError as exc:
        raise UsageError(f"--spec: cannot read {path!r} ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--spec: {path!r} is not valid JSON ({exc})") from None
    try:
        FeatureSpec.from_dict(raw)
    except ValueError as exc:
        raise UsageError(f"--spec: {path!r}: {flattened(str(exc))}") from None
    return raw


def check_model_file(path: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"FILE: {path!r} does not exist")
    if not os.path.isfile(path):
        raise UsageError(f"FILE: {path!r} is not a regular file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"FILE: {path!r} is not readable")
    if os.path.getsize(path) == 0:
        raise UsageError(f"FILE: {path!r} is empty")


def smoke_test(path: str, spec: dict) -> float:
    """Load the model as a worker would, check it against its spec and score the baseline row."""
    from app.scoring.runner import ModelLoadError, ModelRunner  # onnxruntime: only publish needs it

    try:
        return ModelRunner(path, FeatureSpec.from_dict(spec)).smoke_check()
    except ModelLoadError as exc:
        raise ModelCheckFailed(f"model check failed: {exc}") from None


def publish_model(settings: Settings, args: argparse.Namespace) -> int:
    check_model_file(args.file)
    spec = read_spec(args.spec)
    if spec["product"] != args.product:
        raise UsageError(f"--spec: {args.spec!r} is a spec of product {spec['product']!r}, not {args.product!r}")
    spec = {**spec, "threshold": args.threshold}  # one threshold: the registry's
    score = smoke_test(args.file, spec)
    store = open_model_store(settings)
    with registry_database(settings) as dsn, connect(dsn, "cli") as conn:
        if registry.version_exists(conn, args.product, args.version):
            raise registry.DuplicateModelVersion(
                f"product {args.product!r} already has a model with version {args.version!r}")
        key, sha256, size = store.put_file(args.file)
        model_id = registry.register_model(
            conn, name=spec["name"], version=args.version, product=args.product, status=args.status,
            storage_key=key, sha256=sha256, size_bytes=size, feature_spec=spec, threshold=args.threshold)
    print(f"published {args.product} {args.version} as {args.status} ({size} bytes, sha256 {sha256[:12]}, "
          f"smoke score {score:.4f}) in {store.describe()}", file=sys.stderr)
    print(model_id)
    return EXIT_OK


def list_models(settings: Settings, args: argparse.Namespace) -> int:
    with registry_database(settings) as dsn:
        models = asyncio.run(fetch_models(dsn, args.product, args.status))
    if args.json:
        print(json.dumps([model_facts(model) for model in models], indent=2))
        return EXIT_OK
    print_table(models)
    return EXIT_OK


async def fetch_models(dsn: str, product: str | None, status: str | None) -> list[registry.RegistryModel]:
    async with await connect_async(dsn, "cli") as conn:
        return await registry.list_models(conn, product=product, status=status)


def model_facts(model: registry.RegistryModel) -> dict:
    """A model as JSON, without its feature spec."""
    facts = dataclasses.asdict(model)
    del facts["feature_spec"]
    for name in ("created_at", "updated_at"):
        facts[name] = facts[name].isoformat() if facts[name] else None
    return facts


def print_table(models: list[registry.RegistryModel]) -> None:
    header = ("MODEL_ID", "PRODUCT", "VERSION", "STATUS", "THRESHOLD", "CREATED")
    rows = [(m.model_id, m.product, m.version, m.status, f"{m.threshold:g}",
             m.created_at.strftime("%Y-%m-%d %H:%M:%S") if m.created_at else "") for m in models]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def promote_model(settings: Settings, args: argparse.Namespace) -> int:
    if MODEL_ID_PATTERN.fullmatch(args.model_id) is None:
        raise UsageError(f"MODEL_ID: expected a UUID such as 3f2c1a9e-8b7d-4c6e-9f10-2a3b4c5d6e7f, "
                         f"got {args.model_id!r}")
    with registry_database(settings) as dsn:
        promotion = asyncio.run(run_promotion(dsn, args.model_id.lower(), args.target))
    model = promotion.model
    if not promotion.changed:
        print(f"model {model.model_id} ({model.product} {model.version}) is already {model.status}; nothing changed")
        return EXIT_OK
    archived = f"; archived {', '.join(promotion.archived_model_ids)}" if promotion.archived_model_ids else ""
    print(f"model {model.model_id} ({model.product} {model.version}): "
          f"{promotion.previous_status} -> {model.status}{archived}")
    return EXIT_OK


async def run_promotion(dsn: str, model_id: str, target: str) -> registry.Promotion:
    async with await connect_async(dsn, "cli") as conn:
        return await registry.promote_model(conn, model_id, target)


@contextlib.contextmanager
def registry_database(settings: Settings) -> Iterator[str]:
    """The database as `sira serve` uses it (DATABASE_URL or the embedded one), migrated."""
    from workers.migrate import apply_migrations  # as in workers/cli.py: imported by the command that runs
    from workers.postgres import open_database

    with open_database(settings.database_url, settings.data_dir) as dsn:
        apply_migrations(dsn)
        yield dsn
