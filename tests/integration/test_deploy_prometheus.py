"""deploy/metrics.txt and deploy/prometheus: the alert rules, and the metrics every PromQL expression may name.

The alert rules pass `promtool check rules` and their unit tests (`promtool test rules`); every PromQL
expression of the alerts and of the Grafana dashboard names only metrics of deploy/metrics.txt, and
promtool parses the dashboard's. promtool missing: skipped locally, failed under CI (tests/fixtures/tools.py).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess

import pytest
import yaml

from tests.fixtures.deploy import DEPLOY, dashboard, dashboard_panels, read_text
from tests.fixtures.tools import promtool

ALERTS = os.path.join(DEPLOY, "prometheus", "alerts.yml")
ALERTS_TEST = os.path.join(DEPLOY, "prometheus", "alerts_test.yml")
METRICS_FILE = os.path.join(DEPLOY, "metrics.txt")
SEED_ALERTS = {"SIRAHighErrorRate", "SIRAHighLatency", "SIRACanaryPerformanceDegraded", "SIRANoModelsLoaded"}


@functools.cache
def metrics_listed() -> tuple[str, ...]:
    return tuple(line.strip() for line in read_text(METRICS_FILE).splitlines() if line.strip())


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
