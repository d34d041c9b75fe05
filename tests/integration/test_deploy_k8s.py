"""deploy/k8s: the kustomization's manifests, against the Kubernetes schemas, each other and the server.

Validated against the Kubernetes JSON schemas shipped by kubernetes-validate (missing: skipped locally,
failed under CI, tests/fixtures/tools.py); the Deployment must run hardened and shut down in time, read
the Secrets the template documents, and set only settings conf/settings.py accepts.
"""

from __future__ import annotations

import os
import re

import pytest

from conf.settings import SETTINGS_BY_ENV, load_settings
from tests.fixtures.deploy import (
    K8S,
    applied_resources,
    config_map_data,
    container,
    documents,
    kustomization,
    manifest_files,
    pod_spec,
    resource,
)
from tests.fixtures.tools import require_module

# The oldest Kubernetes these manifests promise to work on, and the newest kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30", "1.37")
KUBERNETES_VALIDATE_HINT = "pip install 'kubernetes-validate~=1.37'"
# Variables the manifests may set that are not SIRA settings: the AWS SDK reads them itself.
AWS_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"}


def port_of(bind: str) -> int:
    return int(bind.rpartition(":")[2])


# -- Kubernetes manifests -------------------------------------------------------------------------

def test_kustomization_lists_every_manifest_but_the_secret_template():
    listed = kustomization()["resources"]
    for name in listed:
        assert os.path.isfile(os.path.join(K8S, name)), f"kustomization lists missing {name}"
    assert "secret.example.yaml" in manifest_files()
    assert "secret.example.yaml" not in listed, "the Secret template must never be applied"
    assert sorted(listed) == [name for name in manifest_files() if name != "secret.example.yaml"]
    assert {doc["kind"] for doc in applied_resources()} == {
        "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schema(version):
    kubernetes_validate = require_module("kubernetes_validate", KUBERNETES_VALIDATE_HINT)
    checked = 0
    for name in manifest_files():
        for doc in documents(name):
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(part) for part in exc.path)
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                pytest.fail(f"{name}: {exc.message}")
            checked += 1
    assert checked >= 7


def test_manifests_are_namespace_agnostic_and_pin_their_image():
    for name in manifest_files():
        for doc in documents(name):
            assert "namespace" not in doc["metadata"], f"{name}: set the namespace at apply time"
    image = container()["image"]
    assert re.fullmatch(r"[\w./:-]+:[\w.-]+", image) and not image.endswith(":latest"), image
    for entry in kustomization().get("images", []):
        assert entry.get("newTag", "x") != "latest" and image.startswith(entry["name"] + ":")


def test_deployment_runs_hardened_non_root_with_writable_emptydirs():
    spec = pod_spec()
    assert resource("Deployment")["spec"]["replicas"] == 2
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in container()["volumeMounts"]}
    assert "emptyDir" in data_volume()
    # Kubernetes makes an emptyDir's root writable by all: the data dir is a folder sira creates in it.
    assert config_map_data()["SIRA_DATA_DIR"] not in mounts
    shm = mounts["/dev/shm"]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"]
    assert "emptyDir" in mounts["/tmp"]
    assert spec.get("topologySpreadConstraints") or spec.get("affinity", {}).get("podAntiAffinity")


def test_deployment_probes_resources_and_shutdown_fit_the_server():
    main = container()
    http_port = {port["name"]: port["containerPort"] for port in main["ports"]}["http"]
    assert http_port == port_of(config_map_data()["SIRA_BIND"])
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert main[probe]["httpGet"]["port"] in ("http", http_port), probe
    resources = main["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]
    # SIRA_WORKERS defaults to the node's cores, not the pod's: it must follow the CPU request.
    assert int(config_map_data()["SIRA_WORKERS"]) == int(resources["requests"]["cpu"])
    command = main["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"


def test_grace_period_covers_prestop_in_flight_requests_and_the_writers_stop():
    """Computed from the code's own constants, so that neither side can drift."""
    from workers.arbiter import STOP_TIMEOUT_S
    from workers.master import GRACEFUL_TIMEOUT_S
    from workers.writer import STOP_DEADLINE_S

    spec = pod_spec()
    pre_stop_s = int(container()["lifecycle"]["preStop"]["exec"]["command"][1])
    assert STOP_DEADLINE_S < STOP_TIMEOUT_S  # the writer ends its drain and handoff before the master kills it
    needed = pre_stop_s + GRACEFUL_TIMEOUT_S + STOP_TIMEOUT_S
    assert spec["terminationGracePeriodSeconds"] >= needed + 5, (spec["terminationGracePeriodSeconds"], needed)


def data_volume() -> dict:
    """The volume whose mount holds SIRA_DATA_DIR."""
    volumes = {volume["name"]: volume for volume in pod_spec()["volumes"]}
    data_dir = config_map_data()["SIRA_DATA_DIR"]
    (mount,) = [m for m in container()["volumeMounts"] if data_dir.startswith(m["mountPath"].rstrip("/") + "/")]
    return volumes[mount["name"]]


def parse_quantity(value: str) -> int:
    """A Kubernetes byte quantity such as 2Gi or 512Mi, in bytes."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9}
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", value)
    return int(match[1]) * units.get(match[2], 1)


def test_a_pods_spool_outlives_it_in_the_bucket():
    """The data dir is an emptyDir (deleted with the pod): the spool must be handed to the bucket."""
    from conf.settings import load_settings

    data = config_map_data()
    settings = load_settings({key: value for key, value in data.items()})
    assert settings.model_bucket and settings.spool_handoff_prefix
    # What can wait on disk must fit the data volume, and upload within the writer's stop at 10 MB/s.
    from workers.writer import STOP_DEADLINE_S

    assert settings.spool_max_bytes < parse_quantity(data_volume()["emptyDir"]["sizeLimit"])
    assert settings.spool_max_bytes <= 10 * 1024 * 1024 * STOP_DEADLINE_S


def test_deployment_reads_secrets_the_template_documents():
    template = {(doc["metadata"]["name"], key): value for doc in documents("secret.example.yaml")
                for key, value in doc["stringData"].items()}
    for value in template.values():
        assert "CHANGE_ME" in value, "secret.example.yaml must hold placeholders only"
    refs = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in container()["env"]
            if "secretKeyRef" in item.get("valueFrom", {})}
    assert {"DATABASE_URL", "JWT_SECRET", "INTERNAL_SERVICE_TOKEN", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY"} <= set(refs)
    for variable, ref in refs.items():
        assert (ref["name"], ref["key"]) in template, f"{variable}: {ref} is not in secret.example.yaml"
    for required in ("DATABASE_URL", "JWT_SECRET"):
        assert not refs[required].get("optional"), f"{required} must not be optional"
    assert not set(refs) & set(config_map_data()), "a secret also set in the ConfigMap"


def test_every_variable_the_manifests_set_is_a_sira_setting():
    variables = set(config_map_data()) | {item["name"] for item in container()["env"]}
    unknown = variables - set(SETTINGS_BY_ENV) - AWS_VARIABLES
    assert not unknown, f"set in deploy/k8s, unknown to conf/settings.py (typo, or not built yet): {sorted(unknown)}"


def test_the_manifests_settings_are_accepted_by_the_server(tmp_path):
    secrets = {(doc["metadata"]["name"], key): value for doc in documents("secret.example.yaml")
               for key, value in doc["stringData"].items()}
    env = dict(config_map_data())
    for item in container()["env"]:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        env[item["name"]] = secrets[(ref["name"], ref["key"])] if ref else item["value"]
    settings = load_settings(env)
    assert settings.bind == "0.0.0.0:8080" and settings.data_dir == "/var/lib/sira/data"
    assert settings.database_url


def test_envfrom_names_the_config_map():
    refs = [source["configMapRef"]["name"] for source in container()["envFrom"]]
    assert refs == [resource("ConfigMap")["metadata"]["name"]]


def test_service_hpa_and_pdb_select_the_deployment():
    deployment = resource("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    service = resource("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {port["name"] for port in container()["ports"]}
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert ports["http"]["port"] == 80 and ports["http"]["targetPort"] in container_ports
    assert ports["metrics"]["targetPort"] in container_ports
    pdb = resource("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable") == 1
    hpa = resource("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 12)
    targets = {metric["resource"]["name"]: metric["resource"]["target"]["averageUtilization"]
               for metric in hpa["metrics"]}
    assert targets == {"cpu": 60, "memory": 70}


def test_prometheus_scrapes_the_port_metrics_bind_opens():
    annotations = resource("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    metrics_port = {port["name"]: port["containerPort"] for port in container()["ports"]}["metrics"]
    assert int(annotations["prometheus.io/port"]) == metrics_port == port_of(config_map_data()["METRICS_BIND"])


def test_the_shipped_config_closes_the_unauthenticated_surface():
    """Every client reaches SIRA_BIND: /metrics only on the ops port, and no feature spec without a token."""
    data = config_map_data()
    assert data["SIRA_METRICS_ON_MAIN_PORT"] == "off" and data["METRICS_BIND"]
    assert data["SIRA_OPENAPI_FEATURE_SPECS"] == "off"  # explicit, though it is the default
    settings = load_settings(data)
    assert settings.metrics_on_main_port is False and settings.openapi_feature_specs is False
