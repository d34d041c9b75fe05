"""docs/runbook.md stays true: its commands run, and the ones that cannot run here name real things.

The runbook's commands are its ```bash blocks. The first line of a block says how it is checked:

- ``# cluster``: needs a Kubernetes cluster or a Docker daemon. Not run; every resource
  (kind/name), label selector, container, Secret and Secret key, patched field, Service port and
  repository path its kubectl/docker commands name must exist in deploy/ (PyYAML), and
  ``docker build`` must build deploy/Dockerfile from the repository root.
- ``# not run: <why>``: placeholders, or it deletes things. Not run.
- anything else: run for real, in document order, each block by bash with ``set -euo pipefail``,
  in the repository root, against one real ``sira serve`` started here; shell variables carry
  from block to block as in one operator's shell. Each block must exit 0, and each curl in it must
  use ``-f``/``--fail``/``--fail-with-body`` so that an HTTP status of 400 or more fails it. The
  test sets what the runbook's setup block would: SIRA_URL, DATABASE_URL, JWT_SECRET,
  SIRA_DATA_DIR, MODEL_FILE/MODEL_SPEC (a dense model built by tests/fixtures/models.py) ...
  Blocks that call promtool run in their own test (skipped without promtool, failed under CI or
  SIRA_REQUIRE_TOOLS=1, tests/fixtures/tools.py). Without psql, a psycopg stand-in runs the
  ``psql URL [-A] [-t] -c SQL`` commands.

Every block, run or not, may name only ``sira`` subcommands and flags that exist (``sira ... --help``),
metrics of deploy/metrics.txt, alerts of deploy/prometheus/alerts.yml, and environment variables
that are settings (conf/settings.py) or one of RUNBOOK_VARIABLES, which the runbook documents.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml

from conf.settings import SETTINGS_BY_ENV
from tests.fixtures.models import build_dense_model, demo_spec, write_spec
from tests.fixtures.server import REPO, SIRA, sira_env
from tests.fixtures.tools import promtool, require_tool

RUNBOOK = os.path.join(REPO, "docs", "runbook.md")
DEPLOY = os.path.join(REPO, "deploy")
BLOCK_PATTERN = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
CLUSTER_MARK, NOT_RUN_MARK = "# cluster", "# not run:"

# Shell variables the runbook may use besides the settings; its "Variables" table documents each.
RUNBOOK_VARIABLES = {"SIRA_URL", "METRICS_URL", "ML_OPS_TOKEN", "SERVICE_TOKEN", "NAMESPACE", "IMAGE", "REGISTRY",
                     "MODEL_FILE", "MODEL_SPEC", "MODEL_VERSION", "MODEL_THRESHOLD", "NEW_MODEL_ID",
                     "PROD_MODEL_ID", "DB_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                     "GRAFANA_URL", "GRAFANA_API_KEY"}
METRIC_SUFFIXES = ("_bucket", "_sum", "_count", "_created")
KIND_ALIASES = {"deployment": "Deployment", "deployments": "Deployment", "deploy": "Deployment",
                "service": "Service", "services": "Service", "svc": "Service",
                "hpa": "HorizontalPodAutoscaler", "horizontalpodautoscaler": "HorizontalPodAutoscaler",
                "pdb": "PodDisruptionBudget", "poddisruptionbudget": "PodDisruptionBudget",
                "configmap": "ConfigMap", "configmaps": "ConfigMap", "cm": "ConfigMap",
                "secret": "Secret", "secrets": "Secret", "pod": "Pod", "pods": "Pod"}
KUBECTL_VALUE_FLAGS = {"-n", "--namespace", "-l", "--selector", "-c", "--container", "-o", "--output",
                       "-f", "--filename", "-k", "--kustomize", "-p", "--patch", "--type", "--since",
                       "--tail", "--timeout", "--sort-by", "--field-selector", "--replicas"}
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", "(", ")", "$", "`"}


@dataclasses.dataclass(frozen=True)
class Block:
    line: int  # line of the opening fence in docs/runbook.md
    code: str

    @property
    def mode(self) -> str:
        first = self.code.lstrip().split("\n", 1)[0].strip()
        if first == CLUSTER_MARK:
            return "cluster"
        return "not_run" if first.startswith(NOT_RUN_MARK) else "run"

    @property
    def uses_promtool(self) -> bool:
        return any(command[0] == "promtool" for command in commands(self.code))

    def where(self) -> str:
        return f"docs/runbook.md:{self.line}"


# -- reading the runbook ------------------------------------------------------------------------

@functools.cache
def runbook_text() -> str:
    with open(RUNBOOK, encoding="utf-8") as handle:
        return handle.read()


@functools.cache
def blocks() -> tuple[Block, ...]:
    text = runbook_text()
    return tuple(Block(text.count("\n", 0, match.start()) + 1, match.group(1))
                 for match in BLOCK_PATTERN.finditer(text))


def commands(code: str) -> list[list[str]]:
    """The simple commands of shell code, as words (quotes removed): split at newlines outside
    quotes, |, ||, &&, ;, &, parentheses and $( ... ); continuations joined, comment lines dropped
    (a comment after a command on the same line is not supported)."""
    code = "\n".join(line for line in code.split("\n") if not line.lstrip().startswith("#"))
    lexer = shlex.shlex(re.sub(r"\\\n", " ", code), posix=True, punctuation_chars="|&;()\n")
    lexer.whitespace, lexer.commenters = " \t\r", ""  # comment lines are dropped above; `${x#y}` stays
    lexer.wordchars += "$:@%+,^!{}[]#"  # `$VAR`, `8080:80`, `@-`, `${x#y}` stay words; `$(` gives `$` and `(`
    found, current = [], []
    for word in lexer:
        if word in SHELL_OPERATORS or set(word) <= set("|&;()\n"):
            if current:
                found.append(current)
            current = []
        else:
            current.append(word)
    if current:
        found.append(current)
    return found


# -- what the repository defines ----------------------------------------------------------------

@functools.cache
def manifests() -> dict[tuple[str, str], dict]:
    """(kind, name) -> the object, from every YAML document of deploy/k8s."""
    found = {}
    for path in sorted(glob.glob(os.path.join(DEPLOY, "k8s", "*.yaml"))):
        with open(path, encoding="utf-8") as handle:
            for doc in yaml.safe_load_all(handle):
                if isinstance(doc, dict) and "kind" in doc and "metadata" in doc:
                    found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def deployment() -> dict:
    (doc,) = [doc for (kind, _), doc in manifests().items() if kind == "Deployment"]
    return doc


def pod_labels() -> dict:
    return deployment()["spec"]["template"]["metadata"]["labels"]


def containers() -> set[str]:
    return {c["name"] for c in deployment()["spec"]["template"]["spec"]["containers"]}


def secret_keys() -> dict[str, set[str]]:
    """Secret name -> the keys the Deployment reads from it."""
    keys: dict[str, set[str]] = {}
    for container in deployment()["spec"]["template"]["spec"]["containers"]:
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                keys.setdefault(ref["name"], set()).add(ref["key"])
    return keys


@functools.cache
def known_metrics() -> frozenset[str]:
    with open(os.path.join(DEPLOY, "metrics.txt"), encoding="utf-8") as handle:
        return frozenset(line.strip() for line in handle if line.strip() and not line.startswith("#"))


@functools.cache
def database_names() -> frozenset[str]:
    """sira_* names of tables, functions, triggers and channels in the migrations, and the roles."""
    from app.auth.roles import KNOWN_ROLES

    names = set(KNOWN_ROLES)
    for path in glob.glob(os.path.join(REPO, "migrations", "*.sql")):
        with open(path, encoding="utf-8") as handle:
            names.update(re.findall(r"\bsira\w*", handle.read()))
    return frozenset(names)


@functools.cache
def alert_names() -> frozenset[str]:
    with open(os.path.join(DEPLOY, "prometheus", "alerts.yml"), encoding="utf-8") as handle:
        rules = yaml.safe_load(handle)
    return frozenset(rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule)


@functools.cache
def error_codes() -> frozenset[str]:
    import app.errors as errors

    return frozenset(value.code for value in vars(errors).values()
                     if isinstance(value, type) and isinstance(getattr(value, "code", None), str))


@functools.cache
def sira_help(subcommand: tuple[str, ...]) -> str | None:
    """`sira SUB --help`, or None when SUB is not a sira subcommand."""
    result = subprocess.run([*SIRA, *subcommand, "--help"], env=sira_env(), cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    return result.stdout if result.returncode == 0 else None


# -- static checks ------------------------------------------------------------------------------

def sira_invocations() -> list[tuple[Block, list[str]]]:
    """Every `sira ...` command of every block, as its words."""
    found = []
    for block in blocks():
        for command in commands(block.code):
            if "sira" in command:
                start = command.index("sira")
                if start == 0 or command[start - 1] == "--":  # `sira ...` or `kubectl exec ... -- sira ...`
                    found.append((block, command[start:]))
    return found


def test_the_runbook_has_blocks_of_every_kind():
    modes = [block.mode for block in blocks()]
    assert modes.count("run") >= 20 and "cluster" in modes and "not_run" in modes, modes
    assert not re.search(r"molam\.com|inference\.molam|localhost:3000|#sira-alerts", runbook_text())


def test_every_sira_subcommand_and_flag_exists():
    invocations = sira_invocations()
    assert {tuple(command[1:2]) for _, command in invocations} >= {("migrate",), ("token",), ("reload",),
                                                               ("config",), ("models",)}
    for block, command in invocations:
        sub = tuple(command[1:3]) if command[1:2] == ["models"] else tuple(command[1:2])
        help_text = sira_help(sub)
        assert help_text is not None, f"{block.where()}: `sira {' '.join(sub)}` is not a sira subcommand"
        for flag in (word.split("=", 1)[0] for word in command if word.startswith("--")):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), \
                f"{block.where()}: `sira {' '.join(sub)}` has no flag {flag}"


def test_every_metric_named_is_in_deploy_metrics_txt():
    named = set(re.findall(r"\bsira_[a-z0-9_]*", runbook_text())) - database_names()
    assert named, "the runbook names no metric"
    for name in sorted(named):
        base = next((name[:-len(s)] for s in METRIC_SUFFIXES if name.endswith(s) and name[:-len(s)] in
                     known_metrics()), name)
        if name.endswith("_"):  # a prefix such as `sira_prediction_`
            assert any(metric.startswith(name) for metric in known_metrics()), f"no metric starts with {name}"
        else:
            assert base in known_metrics(), f"docs/runbook.md names {name}, not in deploy/metrics.txt"


def test_every_alert_named_exists():
    named = set(re.findall(r"\bSIRA[A-Z][A-Za-z]+\b", runbook_text()))
    assert named and named <= alert_names(), named - alert_names()


def test_every_variable_is_a_setting_or_documented():
    text = runbook_text()
    section = text.split("## Variables", 1)[1].split("\n## ", 1)[0]
    documented = {name for line in section.splitlines() if line.startswith("| `")
                  for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", line.split("|")[1])}
    assert RUNBOOK_VARIABLES <= documented, f"not in the Variables table: {RUNBOOK_VARIABLES - documented}"
    allowed = set(SETTINGS_BY_ENV) | RUNBOOK_VARIABLES
    named = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", text))
    for block in blocks():
        named.update(re.findall(r"(?:^|[\s;(])(?:export\s+)?([A-Z][A-Z0-9_]*)=", block.code, re.M))
    prose = BLOCK_PATTERN.sub("", text)
    named.update(name for name in re.findall(r"`([A-Z][A-Z0-9]*_[A-Z0-9_]+)(?:=[^`]*)?`", prose)
                 if name not in error_codes())
    assert named - allowed == set(), f"neither settings nor documented variables: {sorted(named - allowed)}"


def test_every_repository_path_named_exists():
    for block in blocks():
        for path in re.findall(r"(?<![\w/$.-])((?:deploy|docs|migrations|workers|app|conf)/[\w./-]*)", block.code):
            assert os.path.exists(os.path.join(REPO, path)), f"{block.where()}: no {path} in the repository"


def test_cluster_blocks_name_what_deploy_defines():
    cluster = [block for block in blocks() if block.mode == "cluster"]
    checked = 0
    for block in cluster:
        for command in commands(block.code):
            where = f"{block.where()}: {' '.join(command)}"
            if command[0] == "kubectl":
                check_kubectl(command, where)
                checked += 1
            elif command[0] == "docker" and command[1:2] == ["build"]:
                assert "-f" in command and command[command.index("-f") + 1] == "deploy/Dockerfile", where
                assert command[-1] == ".", f"{where}: the build context must be the repository root"
    assert checked >= 20


def check_kubectl(command: list[str], where: str) -> None:
    args = command[1:command.index("--")] if "--" in command else command[1:]
    positional, options = [], {}
    index = 0
    while index < len(args):
        word = args[index]
        if word in KUBECTL_VALUE_FLAGS:
            options.setdefault(word, []).append(args[index + 1])
            index += 2
            continue
        if word.startswith("-"):
            flag, _, value = word.partition("=")
            options.setdefault(flag, []).append(value)
        else:
            positional.append(word)
        index += 1
    verb, rest = positional[0], positional[1:]
    if verb in ("rollout", "set", "top") or rest[:2] == ["secret", "generic"]:
        rest = rest[1:]
    if verb == "create" and rest[:1] == ["generic"]:
        check_secret(rest[1], options.get("--from-literal", []), where)
        return
    for label in options.get("-l", []):
        for pair in label.split(","):
            key, _, value = pair.partition("=")
            assert pod_labels().get(key) == value, f"{where}: no pod label {pair}"
    for container in options.get("-c", []):
        assert container in containers(), f"{where}: no container {container}"
    for path in options.get("-f", []) + options.get("-k", []):
        assert path.startswith("$") or os.path.exists(os.path.join(REPO, path)), f"{where}: no {path}"
    resources = resource_refs(verb, rest)
    for kind, name in resources:
        if not name.startswith("$") and kind != "Pod":
            assert (kind, name) in manifests(), f"{where}: deploy/k8s has no {kind} {name}"
    if verb == "patch":
        (kind, name), patch = resources[0], json.loads(options["-p"][0])
        check_patch(manifests()[(kind, name)], patch, where)
    if verb == "set" and positional[1] == "image":
        for assignment in rest[1:]:
            assert assignment.split("=", 1)[0] in containers(), f"{where}: no container in {assignment}"
    if verb == "port-forward" and resources and resources[0][0] == "Service":
        ports = {str(port["port"]) for port in manifests()[resources[0]]["spec"]["ports"]}
        for mapping in rest[1:]:
            assert mapping.rsplit(":", 1)[-1] in ports, f"{where}: the Service has no port {mapping}"


def resource_refs(verb: str, rest: list[str]) -> list[tuple[str, str]]:
    """(Kind, name) pairs named as kind/name or `kind name`; names may be $variables."""
    if verb in ("apply", "create", "exec", "logs", "port-forward") and rest and "/" not in rest[0] \
            and not rest[0].startswith("$"):
        rest = rest[:1] if verb in ("exec", "logs") else []  # a bare pod name
    refs = []
    for index, word in enumerate(rest):
        if "/" in word:
            kind, _, name = word.partition("/")
            if kind.lower() in KIND_ALIASES:
                refs.append((KIND_ALIASES[kind.lower()], name))
        elif word.lower() in KIND_ALIASES and index + 1 < len(rest) and "/" not in rest[index + 1] \
                and "=" not in rest[index + 1]:
            refs.append((KIND_ALIASES[word.lower()], rest[index + 1]))
    return refs


def check_secret(name: str, literals: list[str], where: str) -> None:
    assert name in secret_keys(), f"{where}: deployment.yaml reads no Secret {name}"
    for literal in literals:
        key = literal.split("=", 1)[0]
        assert key in secret_keys()[name], f"{where}: deployment.yaml reads no key {key} of {name}"
    assert {literal.split("=", 1)[0] for literal in literals} == secret_keys()[name], \
        f"{where}: the Secret must have every key deployment.yaml reads"


def check_patch(resource: dict, patch: dict, where: str, path: str = "") -> None:
    """Every field of the patch exists in the resource; a ConfigMap's data keys are settings."""
    for key, value in patch.items():
        if resource.get("kind") == "ConfigMap" and path == "" and key == "data":
            unknown = set(value) - set(SETTINGS_BY_ENV)
            assert not unknown, f"{where}: {unknown} are not settings"
            continue
        assert key in resource, f"{where}: {path}{key} is not a field of {resource.get('kind', path)}"
        if isinstance(value, dict):
            check_patch(resource[key], value, where, f"{path}{key}.")


def test_every_curl_that_runs_fails_on_http_errors():
    for block in blocks():
        if block.mode != "run":
            continue
        for command in commands(block.code):
            if command[0] == "curl":
                assert any(w in ("--fail", "--fail-with-body") or re.fullmatch(r"-[a-zA-Z]*f[a-zA-Z]*", w)
                           for w in command), f"{block.where()}: {' '.join(command)} needs -f"


# -- running the runbook ------------------------------------------------------------------------

PSQL_STAND_IN = """\
#!{python}
# psql stand-in for machines without it: psql URL [-X] [-A] [-t] -c SQL (what docs/runbook.md uses).
import sys, psycopg
args, url, sql, aligned, tuples_only = sys.argv[1:], None, None, True, False
while args:
    word = args.pop(0)
    if word.startswith("-") and "c" in word:
        sql = args.pop(0)
    if word.startswith("-"):
        aligned = aligned and "A" not in word
        tuples_only = tuples_only or "t" in word
    elif url is None:
        url = word
with psycopg.connect(url, autocommit=True) as conn:
    cursor = conn.execute(sql)
    if cursor.description:
        if not tuples_only:
            print("|".join(column.name for column in cursor.description))
        for row in cursor.fetchall():
            print("|".join("" if value is None else str(value) for value in row))
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, pg_url):
    from tests.fixtures.server import module_server

    with module_server(tmp_path_factory, pg_url, "runbook") as sira:
        yield sira


@pytest.fixture(scope="module")
def runbook_env(server, tmp_path_factory) -> dict[str, str]:
    """The operator's environment: the server's settings, its URL, a new model, sira/psql on PATH."""
    require_tool("curl", "apt-get install curl")
    require_tool("jq", "apt-get install jq")
    folder = tmp_path_factory.mktemp("runbook-model")
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    if shutil.which("psql") is None:
        (bin_dir / "psql").write_text(PSQL_STAND_IN.format(python=sys.executable))
        (bin_dir / "psql").chmod(0o755)
    model = str(folder / "fraud_score_v2.onnx")
    build_dense_model(model, features=13, hidden=16, layers=1, seed=7)
    path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return {**server.env, "PATH": path, "SIRA_URL": server.url, "METRICS_URL": server.url, "MODEL_FILE": model,
            "MODEL_SPEC": write_spec(str(folder), demo_spec()), "MODEL_VERSION": "v-runbook-2",
            "MODEL_THRESHOLD": "0.5"}


def run_block(block: Block, env: dict[str, str], state: str) -> subprocess.CompletedProcess:
    """One block in bash, after the variables the earlier blocks left; saves its own for the next."""
    script = "\n".join(["set -euo pipefail", "set -a", f"source {shlex.quote(state)}", block.code,
                        f"export -p > {shlex.quote(state)}"])
    return subprocess.run(["bash", "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_runbook_commands_run_against_a_real_server(runbook_env, tmp_path):
    state = tmp_path / "state.sh"
    state.write_text("")
    ran = []
    for block in blocks():
        if block.mode != "run" or block.uses_promtool:
            continue
        result = run_block(block, runbook_env, str(state))
        assert result.returncode == 0, (f"{block.where()} exited {result.returncode}:\n"
                                        f"{textwrap.indent(block.code, '    ')}\nstdout:\n{result.stdout}\n"
                                        f"stderr:\n{result.stderr}")
        ran.append(block.line)
    assert len(ran) >= 20
    variables = dict(re.findall(r'^declare -x (\w+)="(.*)"$', state.read_text(), re.M))
    assert variables["NEW_MODEL_ID"] and variables["PROD_MODEL_ID"] != variables["NEW_MODEL_ID"]
    # Where the runbook leaves the server: the promotion undone, the canary stopped, both logged.
    listing = subprocess.run([*SIRA, "models", "list", "--product", "fraud_score", "--json"], env=runbook_env,
                             cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    status = {model["model_id"]: model["status"] for model in json.loads(listing.stdout)}
    assert status[variables["PROD_MODEL_ID"]] == "production" and status[variables["NEW_MODEL_ID"]] == "archived"


def test_promtool_commands_run():
    tool = promtool()
    promtool_blocks = [block for block in blocks() if block.mode == "run" and block.uses_promtool]
    assert promtool_blocks
    env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(tool), os.environ.get("PATH", "")])}
    for block in promtool_blocks:
        result = subprocess.run(["bash", "-c", "set -euo pipefail\n" + block.code], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{block.where()}:\n{result.stdout}\n{result.stderr}"


def test_readme_links_the_runbook():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        assert "docs/runbook.md" in handle.read()
