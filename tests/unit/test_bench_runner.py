"""The benchmark runner's parts that need no timing: reading wrk, k6 and locust output, the SLO and
goal verdicts, the swap window, the CPU plan and the scaling steps (bench/runner/)."""

from __future__ import annotations

import json

import pytest

from bench.runner import slo
from bench.runner.cpus import pinned, plan_cpus
from bench.runner.k6 import parse_k6_summary, parse_time, read_samples
from bench.runner.locust import parse_locust_stats
from bench.runner.report import missing_fields, new_document
from bench.runner.scaling import worker_counts
from bench.runner.scenarios import LoadOptions, combine, row
from bench.runner.swap import split_by_window
from bench.runner.wrk import parse_wrk

WRK_JSON = {"requests": 10000, "duration_us": 2000000, "socket_errors": 1, "timeouts": 2, "non2xx": 3, "bytes": 1,
            "p50_us": 1500, "p90_us": 4000, "p95_us": 5000, "p99_us": 9000, "max_us": 21000, "mean_us": 1800.5}
WRK_OUTPUT = f"""Running 2s test @ http://127.0.0.1:8080/v1/infer
  2 threads and 32 connections
Requests/sec:   5000.00
JSON {json.dumps(WRK_JSON)}
"""


def figures(**overrides) -> dict:
    base = {"requests": 1000, "seconds": 2.0, "rps": 500.0, "p50_ms": 0.8, "p90_ms": 2.0, "p95_ms": 3.0,
            "p99_ms": 4.0, "max_ms": 9.0, "mean_ms": 1.0, "errors": 0, "dropped": 0}
    return {**base, **overrides}


def test_parse_wrk_reads_the_json_line_in_ms_and_counts_every_error():
    parsed = parse_wrk(WRK_OUTPUT)
    assert parsed["requests"] == 10000
    assert parsed["rps"] == pytest.approx(5000.0)
    assert (parsed["p50_ms"], parsed["p95_ms"], parsed["p99_ms"], parsed["max_ms"]) == (1.5, 5.0, 9.0, 21.0)
    assert parsed["errors"] == 6
    assert parsed["non2xx"] == 3


def test_parse_wrk_without_the_json_line_says_so():
    with pytest.raises(ValueError, match="no JSON line"):
        parse_wrk("Running 2s test\nRequests/sec: 10\n")


def test_parse_k6_summary_takes_percentiles_failures_and_dropped_iterations():
    summary = {"state": {"testRunDurationMs": 10003.5}, "metrics": {
        "http_req_duration": {"values": {"avg": 0.6, "min": 0.3, "med": 0.5, "max": 7.5, "p(90)": 0.9,
                                         "p(95)": 1.1, "p(99)": 2.25}},
        "http_reqs": {"values": {"count": 5001, "rate": 499.9}},
        "http_req_failed": {"values": {"rate": 0.0006, "passes": 3, "fails": 4998}},
        "dropped_iterations": {"values": {"count": 7, "rate": 0.7}}}}
    parsed = parse_k6_summary(summary)
    assert parsed["requests"] == 5001
    assert parsed["rps"] == 499.9
    assert (parsed["p50_ms"], parsed["p95_ms"], parsed["p99_ms"], parsed["max_ms"]) == (0.5, 1.1, 2.25, 7.5)
    assert parsed["errors"] == 3  # k6's http_req_failed counts failed requests as its passes
    assert parsed["dropped"] == 7
    assert parsed["seconds"] == 10.004


def test_parse_k6_summary_without_failures_or_drops_reports_zero():
    summary = {"metrics": {
        "http_req_duration": {"values": {"avg": 1, "min": 1, "med": 1, "max": 1, "p(90)": 1, "p(95)": 1, "p(99)": 1}},
        "http_reqs": {"values": {"count": 10, "rate": 5.0}}}}
    parsed = parse_k6_summary(summary)
    assert (parsed["errors"], parsed["dropped"]) == (0, 0)


def test_parse_time_keeps_nanosecond_timestamps_and_offsets():
    assert parse_time("2026-11-25T17:14:23.5Z") == pytest.approx(1795626863.5)
    assert parse_time("2026-11-25T18:14:23.250000001+01:00") == pytest.approx(1795626863.25, abs=1e-6)
    assert parse_time("2026-11-25T17:14:23Z") == pytest.approx(1795626863.0)
    with pytest.raises(ValueError):
        parse_time("yesterday")


def point(metric: str, time: str, value: float, **tags) -> str:
    return json.dumps({"metric": metric, "type": "Point", "data": {"time": time, "value": value, "tags": tags}})


def test_read_samples_keeps_requests_and_served_points_only():
    lines = [
        json.dumps({"type": "Metric", "data": {"name": "http_req_duration"}, "metric": "http_req_duration"}),
        point("http_req_duration", "2026-11-25T17:14:23.1Z", 0.8, status="200"),
        point("http_req_duration", "2026-11-25T17:14:23.2Z", 12.0, status="0"),
        point("http_req_waiting", "2026-11-25T17:14:23.2Z", 0.5, status="200"),
        point("sira_served", "2026-11-25T17:14:23.3Z", 1, model_id="m-1"),
    ]
    samples = list(read_samples(lines))
    assert [s["kind"] for s in samples] == ["request", "request", "served"]
    assert samples[0]["ok"] is True and samples[1]["ok"] is False
    assert samples[2]["model_id"] == "m-1"


def test_split_by_window_places_requests_by_the_swap_window():
    start = 1000.0
    marks = {"start": start, "reloaded": start + 2.0, "model_id": "new"}
    samples = [{"kind": "request", "t": start + offset, "ms": ms, "ok": ok}
               for offset, ms, ok in [(-5, 1.0, True), (-1, 1.0, True), (0.5, 50.0, True), (2.5, 2.0, False),
                                      (3.4, 3.0, True), (9, 1.0, True)]]
    samples += [{"kind": "served", "t": start + 1.0, "model_id": "old"},
                {"kind": "served", "t": start + 2.9, "model_id": "old"},  # last old answer: the window ends here
                {"kind": "served", "t": start + 1.5, "model_id": "new"}]
    split = split_by_window(samples, marks, margin_s=0.5)
    assert split["window_s"] == pytest.approx(3.9)
    assert split["inside"]["requests"] == 3 and split["inside"]["errors"] == 1
    assert split["inside"]["max_ms"] == 50.0
    assert split["outside"]["requests"] == 3 and split["outside"]["errors"] == 0
    assert split["first_new_answer_after_s"] == 1.5
    assert split["last_old_answer_after_s"] == 2.9


@pytest.mark.parametrize("scenario, p50, expected", [("cached", 1.9, "PASS"), ("cached", 2.0, "FAIL"),
                                                      ("uncached", 9.9, "PASS"), ("uncached", 10.0, "FAIL"),
                                                      ("batch", 5.0, "PASS")])
def test_seed_slo_p50_bound_depends_on_the_scenario(scenario, p50, expected):
    assert slo.verdict(slo.slo_checks(scenario, figures(p50_ms=p50))) == expected


@pytest.mark.parametrize("change", [{"p95_ms": 30.0}, {"p99_ms": 100.0}, {"errors": 1}])
def test_seed_slo_fails_on_tail_latency_or_any_error(change):
    checks = slo.slo_checks("uncached", figures(**change))
    assert slo.verdict(checks) == "FAIL"
    assert sum(1 for c in checks if c["pass"] is False) == 1


def test_verdict_of_nothing_measured_is_not_a_pass():
    assert slo.verdict([slo.check("x", None, 1.0)]) == "n/a"


def rows_for(sira_max: float, fastapi_max: float, falcon_max: float, p50: float, p99: float) -> list[dict]:
    options = LoadOptions()
    out = []
    for target, rps in (("sira", sira_max), ("fastapi", fastapi_max), ("bare_falcon", falcon_max)):
        out.append(row("uncached", target, "max", figures(rps=rps), options))
        out.append(row("uncached", target, "rate", figures(p50_ms=p50 if target == "sira" else 1.0,
                                                           p99_ms=p99 if target == "sira" else 4.0), options))
    out.append(row("cached", "sira", "rate", figures(p50_ms=0.4), options))
    return out


def goals_by_name(goals: list[dict]) -> dict:
    return {goal["name"].split(" at ")[0]: goal["pass"] for goal in goals}


def test_goals_pass_when_every_figure_meets_them():
    rows = rows_for(sira_max=9000, fastapi_max=4000, falcon_max=10000, p50=0.9, p99=4.5)
    goals = goals_by_name(slo.goal_checks(rows, {"errors": 0}))
    assert all(goals.values()), goals
    ratios = slo.ratios(rows)
    assert ratios["fastapi"]["max_rps"] == pytest.approx(2.25)
    assert ratios["bare_falcon"]["p99_ms at rate"] == pytest.approx(4.5 / 4.0)


def test_goals_fail_each_on_its_own_figure():
    rows = rows_for(sira_max=7000, fastapi_max=4000, falcon_max=10000, p50=1.2, p99=6.0)
    goals = goals_by_name(slo.goal_checks(rows, {"errors": 2}))
    assert goals == {"uncached p50 <= 1 ms": False, "uncached p99 <= 5 ms": False, "cached p50 <= 0.5 ms": True,
                     "max throughput >= 2x FastAPI's": False, "max throughput >= 80% of bare Falcon's": False,
                     "zero errors in the swap scenario": False}


def test_goals_without_their_runs_are_not_measured():
    goals = slo.goal_checks([], None)
    assert [goal["pass"] for goal in goals] == [None] * len(goals)


def test_combine_takes_medians_and_adds_up_counts():
    combined = combine([figures(rps=100.0, errors=1, requests=10, by_job={"workers": 1.0}),
                        figures(rps=300.0, errors=0, requests=30, by_job={"workers": 3.0}),
                        figures(rps=200.0, errors=2, requests=20, by_job={"workers": 2.0})])
    assert combined["rps"] == 200.0
    assert combined["by_job"] == {"workers": 2.0}
    assert (combined["errors"], combined["requests"], combined["rounds"]) == (3, 60, 3)


@pytest.mark.parametrize("cpus, expected", [(1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (6, [1, 2, 4, 6]),
                                            (16, [1, 2, 4, 8, 16])])
def test_scaling_steps_double_up_to_the_server_cpus(cpus, expected):
    assert worker_counts(cpus) == expected


def test_cpu_plan_pins_apart_from_four_cpus_and_shares_two():
    shared = plan_cpus("auto", (0, 1))
    assert shared.server is None and shared.server_cpus == 2 and "share" in shared.describe()
    apart = plan_cpus("auto", tuple(range(8)))
    assert (apart.server, apart.load) == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert plan_cpus("on", (0, 1)).server == (0,)
    assert plan_cpus("off", tuple(range(8))).server is None
    assert pinned(["wrk"], None) == ["wrk"]


def test_parse_locust_stats_gives_endpoint_rows_and_a_total():
    entries = [
        {"name": "POST /v1/infer", "start_time": 100.0, "last_request_timestamp": 110.0, "num_requests": 100,
         "num_failures": 1, "max_response_time": 40.2, "response_times": {"1": 90, "5": 9, "40": 1}},
        {"name": "GET /v1/models", "start_time": 101.0, "last_request_timestamp": 109.0, "num_requests": 10,
         "num_failures": 0, "max_response_time": 3.1, "response_times": {"3": 10}},
    ]
    rows = {r["endpoint"]: r for r in parse_locust_stats(entries)}
    assert rows["POST /v1/infer"]["p50_ms"] == 1.0 and rows["POST /v1/infer"]["p99_ms"] == 5.0
    assert rows["POST /v1/infer"]["rps"] == pytest.approx(10.0)
    assert rows["all"]["requests"] == 110 and rows["all"]["errors"] == 1
    assert rows["all"]["max_ms"] == 40.2


def test_missing_fields_names_what_a_report_lacks():
    document = new_document(["bench"], {}, "not pinned", {})
    assert missing_fields(document) == []
    document["results"].append({"scenario": "uncached"})
    assert "results[0].p99_ms" in missing_fields(document)
    del document["goals"]
    assert "goals" in missing_fields(document)


def test_server_cpu_per_request_and_its_ratio_to_a_peer():
    from bench.runner.scenarios import cpu_per_request

    measured = cpu_per_request({"workers": 10.0, "postgres": 1.0}, {"workers": 11.0, "postgres": 1.5}, 5000)
    assert measured == {"server_cpu_us_per_request": 300.0,
                        "server_cpu_us_by_job": {"workers": 200.0, "postgres": 100.0}}
    assert cpu_per_request(None, None, 5000) == {"server_cpu_us_per_request": None}
    assert cpu_per_request({"workers": 1.0}, {"workers": 2.0}, 0) == {"server_cpu_us_per_request": None}
    options = LoadOptions()
    rows = [row("uncached", "sira", "max", figures(rps=4000.0, server_cpu_us_per_request=300.0), options),
            row("uncached", "fastapi", "max", figures(rps=2000.0, server_cpu_us_per_request=600.0), options)]
    assert slo.ratios(rows)["fastapi"] == {"max_rps": 2.0, "cpu_per_request": 0.5}
