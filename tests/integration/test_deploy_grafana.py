"""deploy/grafana/dashboard.json: the seed panels, the datasource variable, and panels that use it.

(That the dashboard's PromQL parses and names only listed metrics: tests/integration/test_deploy_prometheus.py.)
"""

from __future__ import annotations

from tests.fixtures.deploy import dashboard, dashboard_panels

SEED_PANELS = ("Requests/sec", "P95 Latency", "Error Rate", "Request Rate by Product", "Latency Percentiles",
               "Canary vs Production Traffic", "Decisions Distribution")


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
