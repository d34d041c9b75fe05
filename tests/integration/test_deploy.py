"""deploy/ stays true: Dockerfile, Kubernetes manifests, Grafana dashboard, Prometheus rules.

Nothing here needs docker or a cluster. The manifests are validated against the Kubernetes JSON
schemas shipped by kubernetes-validate, the alert rules by `promtool check rules` and their unit
tests (`promtool test rules`), every PromQL expression may name only the metrics of
deploy/metrics.txt, and the pieces must agree with each other and with conf/settings.py (ports,
uid, data dir, settings, Secret keys). promtool or kubernetes-validate missing: skipped locally,
failed under CI (tests/fixtures/tools.py).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shlex
import subprocess
import sys
import threading

import pytest
import yaml

from conf.settings import SETTINGS_BY_ENV, load_settings
from tests.fixtures.server import REPO, free_port
from tests.fixtures.tools import promtool, require_module

DEPLOY = os.path.join(REPO, "deploy")
K8S = os.path.join(DEPLOY, "k8s")
DOCKERFILE = os.path.join(DEPLOY, "Dockerfile")
DOCKERIGNORE = os.path.join(DEPLOY, "Dockerfile.dockerignore")
DASHBOARD = os.path.join(DEPLOY, "grafana", "dashboard.json")
ALERTS = os.path.join(DEPLOY, "prometheus", "alerts.yml")
ALERTS_TEST = os.path.join(DEPLOY, "prometheus", "alerts_test.yml")
METRICS_FILE = os.path.join(DEPLOY, "metrics.txt")

# The oldest Kubernetes these manifests promise to work on, and the newest kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30", "1.37")
KUBERNETES_VALIDATE_HINT = "pip install 'kubernetes-validate~=1.37'"
SEED_ALERTS = {"SIRAHighErrorRate", "SIRAHighLatency", "SIRACanaryPerformanceDegraded", "SIRANoModelsLoaded"}
SEED_PANELS = ("Requests/sec", "P95 Latency", "Error Rate", "Request Rate by Product", "Latency Percentiles",
               "Canary vs Production Traffic", "Decisions Distribution")
# Variables the manifests may set that are not SIRA settings: the AWS SDK reads them itself.
AWS_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"}


# -- loading ------------------------------------------------------------------------------------

def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


@functools.cache
def kustomization() -> dict:
    return yaml.safe_load(read_text(os.path.join(K8S, "kustomization.yaml")))


@functools.cache
def manifest_files() -> tuple[str, ...]:
    """Every Kubernetes manifest under deploy/k8s (the kustomization itself excluded)."""
    return tuple(sorted(name for name in os.listdir(K8S)
                        if name.endswith((".yaml", ".yml")) and name != "kustomization.yaml"))


@functools.cache
def documents(name: str) -> tuple[dict, ...]:
    return tuple(doc for doc in yaml.safe_load_all(read_text(os.path.join(K8S, name))) if doc)


def applied_resources() -> list[dict]:
    """The resources `kubectl apply -k deploy/k8s` creates."""
    return [doc for name in kustomization()["resources"] for doc in documents(name)]


def resource(kind: str) -> dict:
    matches = [doc for doc in applied_resources() if doc["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind} in the kustomization, found {len(matches)}"
    return matches[0]


def pod_spec() -> dict:
    return resource("Deployment")["spec"]["template"]["spec"]


def container() -> dict:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    return containers[0]


def config_map_data() -> dict[str, str]:
    return resource("ConfigMap")["data"]


def port_of(bind: str) -> int:
    return int(bind.rpartition(":")[2])


@functools.cache
def metrics_listed() -> tuple[str, ...]:
    return tuple(line.strip() for line in read_text(METRICS_FILE).splitlines() if line.strip())


@functools.cache
def dashboard() -> dict:
    return json.loads(read_text(DASHBOARD))


@functools.cache
def alert_rules() -> tuple[dict, ...]:
    groups = yaml.safe_load(read_text(ALERTS))["groups"]
    return tuple(rule for group in groups for rule in group["rules"])


@functools.cache
def alert_tests() -> dict:
    return yaml.safe_load(read_text(ALERTS_TEST))


def run_promtool(*args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


# -- PromQL ---------------------------------------------------------------------------------------

PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                   "bool", "offset", "inf", "nan", "atan2"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$product": ".*"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects, histogram suffixes removed.

    Strings, label matchers, ranges and grouping label lists are blanked first; what remains are
    functions (followed by '('), keywords, numbers and metric names.
    """
    assert "__name__" not in expr, f"selecting by __name__ hides the metric name: {expr}"
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', " ", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        if word.lower() in PROMQL_KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue
        for suffix in HISTOGRAM_SUFFIXES:
            if word.endswith(suffix):
                word = word[: -len(suffix)]
                break
        names.add(word)
    return names


def without_grafana_variables(expr: str) -> str:
    """The expression with Grafana's variables replaced by plain values, so promtool can parse it."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}; add it to GRAFANA_VARIABLES"
    return expr


def dashboard_panels() -> list[dict]:
    """Every panel, those nested in collapsed rows included."""
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_expressions() -> list[str]:
    """The PromQL of every panel target and every query variable of the dashboard."""
    exprs = [target["expr"] for panel in dashboard_panels() for target in panel.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            exprs.append(re.fullmatch(r"label_values\((.+),\s*\w+\)", query).group(1)
                         if query.startswith("label_values(") else query)
    return exprs


def alert_test_series_names() -> set[str]:
    return {metric_names(series["series"].split("{", 1)[0]).pop()
            for case in alert_tests()["tests"] for series in case.get("input_series", [])}


# -- Dockerfile -----------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical, pending = [], ""
    for raw in read_text(DOCKERFILE).splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in logical]


def dockerfile_stages() -> list[dict]:
    """Each stage: its image, its alias, and its instructions."""
    stages = []
    for instruction, args in dockerfile_instructions():
        if instruction == "FROM":
            words = [word for word in args.split() if not word.startswith("--")]
            alias = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append({"image": words[0], "alias": alias, "instructions": []})
        else:
            assert stages, f"{instruction} before the first FROM"
            stages[-1]["instructions"].append((instruction, args))
    return stages


def stage_values(stage: dict, instruction: str) -> list[str]:
    return [args for name, args in stage["instructions"] if name == instruction]


def dockerfile_env(stage: dict) -> dict[str, str]:
    env = {}
    for args in stage_values(stage, "ENV"):
        for word in shlex.split(args):
            name, sep, value = word.partition("=")
            assert sep, f"use ENV NAME=value, not the legacy form: ENV {args}"
            env[name] = value
    return env


def healthcheck_command() -> list[str]:
    """The final stage's HEALTHCHECK command, run by this interpreter (the image runs its own python)."""
    final = dockerfile_stages()[-1]
    (args,) = stage_values(final, "HEALTHCHECK")
    command = json.loads(args[args.index("CMD") + 3:].strip())
    assert command[0] == "python", "exec form with the image's python: slim images have no curl"
    return [sys.executable, *command[1:]]


def dockerignore_keeps(path: str) -> bool:
    """Whether Docker sends `path` (relative to the context root) given Dockerfile.dockerignore."""
    keep = True
    for line in read_text(DOCKERIGNORE).splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = re.sub(r"\\\[(.*?)\\\]", r"[\1]", regex)
        parts = path.split("/")
        prefixes = ["/".join(parts[: index + 1]) for index in range(len(parts))]
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            keep = negate
    return keep


# -- PromQL name parsing: the check below is only as good as this ---------------------------------

@pytest.mark.parametrize("expr, expected", [
    ('sum by (le) (rate(foo_bucket{a="b", c=~"x|y"}[5m]))', {"foo"}),
    ("histogram_quantile(0.95, sum by (product, le) (rate(lat_seconds_bucket[$__rate_interval]))) > 0.1",
     {"lat_seconds"}),
    ("a_total / on (product) group_left (x) b_total offset 5m > bool 1e-9", {"a_total", "b_total"}),
    ('(sum(rate(err_total{p=~"$product"}[5m])) or vector(0)) / sum without (pid) (req_total)',
     {"err_total", "req_total"}),
    ("sira_models_loaded == 0 and ignoring(instance) up", {"sira_models_loaded", "up"}),
])
def test_metric_names_reads_selectors_not_functions_labels_or_keywords(expr, expected):
    assert metric_names(expr) == expected


# -- metrics.txt ----------------------------------------------------------------------------------

def test_metrics_file_lists_unique_well_formed_names():
    names = metrics_listed()
    assert names, "deploy/metrics.txt is empty"
    assert len(set(names)) == len(names), "duplicate names in deploy/metrics.txt"
    for name in names:
        assert re.fullmatch(r"sira_[a-z0-9_]+", name), name
        assert not name.endswith(HISTOGRAM_SUFFIXES), f"{name}: list histograms by their base name"


def test_dashboard_and_alerts_name_only_listed_metrics():
    listed = set(metrics_listed())
    for expr in dashboard_expressions() + [rule["expr"] for rule in alert_rules()]:
        unknown = metric_names(expr) - listed
        assert not unknown, f"{sorted(unknown)} not in deploy/metrics.txt, used by: {expr}"


def test_every_listed_metric_is_used_by_the_dashboard_or_the_alerts():
    used = set()
    for expr in dashboard_expressions() + [rule["expr"] for rule in alert_rules()]:
        used |= metric_names(expr)
    assert set(metrics_listed()) - used == set(), "deploy/metrics.txt lists metrics nothing relies on"


def test_alert_unit_tests_feed_only_listed_metrics():
    unknown = alert_test_series_names() - set(metrics_listed())
    assert not unknown, f"alerts_test.yml feeds series that no SIRA server exports: {sorted(unknown)}"


# -- Prometheus rules -----------------------------------------------------------------------------

def test_promtool_check_rules_accepts_the_alerts():
    result = run_promtool("check", "rules", os.path.basename(ALERTS), cwd=os.path.dirname(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_of_the_alerts_pass():
    result = run_promtool("test", "rules", os.path.basename(ALERTS_TEST), cwd=os.path.dirname(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_seed_alerts_are_all_present_with_severity_and_summary():
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert SEED_ALERTS <= set(names)
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_every_alert_has_a_unit_test_where_it_fires_and_one_where_it_must_not():
    fires, silent = set(), set()
    for case in alert_tests()["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), "alerts without a case where they fire"
    assert names - silent == set(), "alerts without a case where they must stay silent"
    assert (fires | silent) - names == set(), "alerts_test.yml tests alerts that alerts.yml lacks"


def test_ratio_alerts_require_traffic_before_judging():
    """A ratio over no traffic is NaN or +Inf: each ratio alert also requires a request rate."""
    for rule in alert_rules():
        if "/" in rule["expr"]:
            assert re.search(r"\band on \(product\)\s*sum by \(product\) \(rate\(", rule["expr"]), rule["alert"]


def test_promtool_parses_every_dashboard_expression(tmp_path):
    rules = [{"record": f"sira:dashboard:expr{index}", "expr": without_grafana_variables(expr)}
             for index, expr in enumerate(dashboard_expressions())]
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", "dashboard_rules.yml", cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


# -- Grafana dashboard ----------------------------------------------------------------------------

def test_dashboard_has_the_seed_panels_and_a_datasource_variable():
    board = dashboard()
    assert board["uid"] == "sira-inference"  # the runbook links /d/sira-inference
    titles = [panel["title"] for panel in dashboard_panels()]
    for title in SEED_PANELS:
        assert any(candidate.startswith(title) for candidate in titles), f"no panel {title!r}"
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_every_dashboard_query_uses_the_datasource_variable():
    panels = dashboard_panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for item in [panel, *panel["targets"]]:
            assert item["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


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


# -- Dockerfile -----------------------------------------------------------------------------------

def test_dockerfile_images_are_pinned_and_multi_stage():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "build in one stage, run in another"
    aliases = set()
    for stage in stages:
        image = stage["image"]
        if image not in aliases:
            assert "@sha256:" in image or re.fullmatch(r"[\w./-]+:[\w.-]+", image), f"untagged image {image}"
            assert not image.endswith(":latest"), image
        if stage["alias"]:
            aliases.add(stage["alias"])
    assert stages[-1]["image"].startswith("python:3.11-slim")


def test_dockerfile_runtime_stage_has_no_compiler():
    compilers = re.compile(r"(?<![\w.-])(gcc|g\+\+|cc|clang|build-essential|libc6-dev|python3-dev|make)(?![\w.-])")
    builder, final = dockerfile_stages()[0], dockerfile_stages()[-1]
    assert any(compilers.search(args) for args in stage_values(builder, "RUN")), "the builder must compile"
    for args in stage_values(final, "RUN"):
        assert not compilers.search(args), f"compiler in the runtime stage: RUN {args}"
    for args in stage_values(final, "COPY"):
        if "--from=" in args:
            sources = [word for word in args.split() if not word.startswith("--")][:-1]
            assert all(source.startswith("/opt/") for source in sources), f"COPY {args}"


def test_dockerfile_runs_as_the_numeric_non_root_user_of_the_deployment():
    final = dockerfile_stages()[-1]
    users = stage_values(final, "USER")
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric uid lets Kubernetes verify runAsNonRoot"
    assert gid.isdigit() and int(gid) != 0
    security = pod_spec()["securityContext"]
    assert (int(uid), int(gid)) == (security["runAsUser"], security["runAsGroup"])


def test_dockerfile_entrypoint_env_and_ports():
    final = dockerfile_stages()[-1]
    assert [json.loads(args) for args in stage_values(final, "ENTRYPOINT")] == [["sira"]]
    assert [json.loads(args) for args in stage_values(final, "CMD")] == [["serve"]]
    assert "8080" in " ".join(stage_values(final, "EXPOSE")).split()
    env = dockerfile_env(final)
    assert env["SIRA_BIND"] == "0.0.0.0:8080"
    assert env["SIRA_DATA_DIR"] == "/var/lib/sira"  # created 0750 by the image; in Kubernetes a folder below it
    assert config_map_data()["SIRA_DATA_DIR"].startswith(env["SIRA_DATA_DIR"] + "/")
    settings = load_settings({name: value for name, value in env.items() if name in SETTINGS_BY_ENV})
    assert settings.bind == env["SIRA_BIND"]


def test_dockerignore_sends_the_packages_and_nothing_private():
    assert not os.path.exists(os.path.join(DEPLOY, ".dockerignore")), \
        "docker ignores deploy/.dockerignore for a repo-root context; use deploy/Dockerfile.dockerignore"
    config = read_text(os.path.join(REPO, "setup.cfg"))
    include = re.search(r"\[options\.packages\.find\]\s*include\s*=\s*((?:\n[ \t]+\S+)+)", config).group(1)
    packages = {name for name in include.split() if "*" not in name and "." not in name}
    assert {"app", "workers", "shm", "conf", "migrations"} <= packages
    for path in ["setup.cfg", "pyproject.toml", *(f"{name}/__init__.py" for name in packages)]:
        assert dockerignore_keeps(path), f"the build context lacks {path}"
    for path in [".venv/bin/python", ".git/HEAD", "var/jwt_secret", "tests/conftest.py",
                 "app/__pycache__/main.cpython-311.pyc"]:
        assert not dockerignore_keeps(path), f"the build context would carry {path}"


class HealthStandIn(http.server.BaseHTTPRequestHandler):
    """Answers GET /healthz with the status the test chose; anything else 404."""

    status = 200

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, expected_rc", [(200, 0), (503, 1)])
def test_dockerfile_healthcheck_command_follows_healthz(status, expected_rc):
    handler = type("Handler", (HealthStandIn,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = dict(os.environ, SIRA_BIND=f"0.0.0.0:{server.server_address[1]}")
        result = subprocess.run(healthcheck_command(), env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == expected_rc, result.stderr
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_dockerfile_healthcheck_fails_when_nothing_listens():
    env = dict(os.environ, SIRA_BIND=f"0.0.0.0:{free_port()}")
    result = subprocess.run(healthcheck_command(), env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
