"""deploy/k8s/archive/cronjob.yaml: the nightly retention example is valid, runs a real sira command,
and matches the server's Deployment; it is not applied unless asked (the default keeps every row)."""

from __future__ import annotations

import os

import pytest
import yaml

from tests.fixtures.deploy import K8S, kustomization, read_text, resource
from tests.fixtures.tools import require_module
from tests.integration.test_deploy_k8s import KUBERNETES_VALIDATE_HINT, KUBERNETES_VERSIONS
from workers.cli import build_parser

CRONJOB = os.path.join(K8S, "archive", "cronjob.yaml")


def cronjob() -> dict:
    (doc,) = [doc for doc in yaml.safe_load_all(read_text(CRONJOB)) if doc]
    return doc


def container() -> dict:
    (only,) = cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return only


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_archive_cronjob_validates_against_the_kubernetes_schema(version):
    kubernetes_validate = require_module("kubernetes_validate", KUBERNETES_VALIDATE_HINT)
    kubernetes_validate.validate(cronjob(), version, strict=True)


def test_the_cronjob_runs_a_sira_archive_command_one_at_a_time():
    args = build_parser().parse_args(container()["args"])
    assert (args.command, args.predictions_command) == ("predictions", "archive")
    assert args.older_than or args.before
    assert cronjob()["spec"]["concurrencyPolicy"] == "Forbid"


def test_the_cronjob_uses_the_servers_image_config_and_database_secret():
    server = resource("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container()["image"] == server["image"]
    assert container()["envFrom"] == server["envFrom"]
    secret_env = {item["name"]: item["valueFrom"] for item in server["env"] if "valueFrom" in item}
    for item in container()["env"]:
        assert secret_env[item["name"]] == item["valueFrom"]


def test_the_cronjob_is_not_applied_with_the_server():
    assert not any(name.startswith("archive") for name in kustomization()["resources"])
