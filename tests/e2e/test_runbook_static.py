"""docs/runbook.md, read without running it: every sira subcommand and flag, metric, alert, variable and path it names.

Also: it has blocks of every kind (run, # cluster, # not run), every curl of a block that runs fails on HTTP
errors, and the README links it. How blocks are marked and checked: tests/fixtures/runbook.py.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import subprocess

import yaml

from conf.settings import SETTINGS_BY_ENV
from tests.fixtures.runbook import BLOCK_PATTERN, DEPLOY, Block, blocks, commands, runbook_text
from tests.fixtures.server import REPO, SIRA, sira_env

# Shell variables the runbook may use besides the settings; its "Variables" table documents each.
RUNBOOK_VARIABLES = {"SIRA_URL", "METRICS_URL", "ML_OPS_TOKEN", "SERVICE_TOKEN", "NAMESPACE", "IMAGE", "REGISTRY",
                     "MODEL_FILE", "MODEL_SPEC", "MODEL_VERSION", "MODEL_THRESHOLD", "NEW_MODEL_ID",
                     "PROD_MODEL_ID", "DB_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                     "GRAFANA_URL", "GRAFANA_API_KEY"}
METRIC_SUFFIXES = ("_bucket", "_sum", "_count", "_created")


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
        sub = tuple(command[1:3]) if command[1:2] in (["models"], ["predictions"]) else tuple(command[1:2])
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


def test_every_curl_that_runs_fails_on_http_errors():
    for block in blocks():
        if block.mode != "run":
            continue
        for command in commands(block.code):
            if command[0] == "curl":
                assert any(w in ("--fail", "--fail-with-body") or re.fullmatch(r"-[a-zA-Z]*f[a-zA-Z]*", w)
                           for w in command), f"{block.where()}: {' '.join(command)} needs -f"


def test_readme_links_the_runbook():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        assert "docs/runbook.md" in handle.read()
