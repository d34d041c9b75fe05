"""The tables of bench/RESULTS.md, from a results JSON of `python -m bench`.

    python -m bench.runner.markdown bench/results/bench-20261125-180000.json > tables.md
"""

from __future__ import annotations

import json
import sys

from bench.runner.report import fmt, mode_label


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in cells) + " |" for cells in rows]
    return lines


def load_rows(document: dict) -> list[str]:
    rows = []
    for item in document["results"]:
        failed = "; ".join(c["name"] for c in item["slo"] if c["pass"] is False)
        verdict = item["verdict"] + (f" ({failed})" if failed else "")
        rows.append([item["scenario"], item["target"], mode_label(item), fmt(item["rps"], 0), fmt(item["p50_ms"]),
                     fmt(item["p95_ms"]), fmt(item["p99_ms"]), fmt(item["max_ms"]), item["errors"],
                     item.get("dropped") or 0, fmt(item.get("server_cpu_us_per_request"), 0), verdict])
    return table(["scenario", "target", "load", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "errors",
                  "k6 dropped", "server CPU us/req", "seed SLOs"], rows)


def render(document: dict) -> str:
    out = ["### Latency and throughput", "", *load_rows(document), ""]
    jobs = [item for item in document["results"] if item.get("server_cpu_us_by_job")]
    if jobs:
        names = sorted({job for item in jobs for job in item["server_cpu_us_by_job"]})
        out += ["### Server CPU microseconds per request, by process (closed-loop runs)", ""]
        out += table(["scenario", "target", *names, "all"],
                     [[item["scenario"], item["target"],
                       *(fmt(item["server_cpu_us_by_job"].get(job), 0) for job in names),
                       fmt(item["server_cpu_us_per_request"], 0)] for item in jobs]) + [""]
    if document["ratios"]:
        out += ["### SIRA as a ratio to the peers (same run, same model, same request)", ""]
        out += table(["peer", "max req/s (SIRA / peer)", "server CPU per request", "p50 at fixed rate",
                      "p99 at fixed rate"],
                     [[peer, fmt(r.get("max_rps")), fmt(r.get("cpu_per_request")), fmt(r.get("p50_ms at rate")),
                       fmt(r.get("p99_ms at rate"))]
                      for peer, r in document["ratios"].items()]) + [""]
    out += ["### Goals of issue 10", ""]
    out += table(["goal", "measured", "verdict"],
                 [[g["name"], fmt(g["value"]), {True: "PASS", False: "FAIL", None: "not measured"}[g["pass"]]]
                  for g in document["goals"]]) + [""]
    swap = document["swap"]
    if swap:
        timeline = (f"publish {swap['publish_s']} s, promote {swap['promote_s']} s, "
                    f"`sira reload` {swap['reload_s']} s; "
                    f"the new model's first answer {fmt(swap['first_new_answer_after_s'])} s and the old one's last "
                    f"{fmt(swap['last_old_answer_after_s'])} s after the publish began; window {swap['window_s']} s.")
        out += [f"### Swap at {swap['rate']} req/s (k6, {swap['seconds']:g} s)", "", timeline, ""]
        out += table(["", "requests", "errors", "p50 ms", "p99 ms", "max ms"],
                     [[side, swap[side]["requests"], swap[side]["errors"], fmt(swap[side]["p50_ms"]),
                       fmt(swap[side]["p99_ms"]), fmt(swap[side]["max_ms"])] for side in ("inside", "outside")]) + [""]
    if document["scaling"]:
        out += ["### Scaling (uncached, wrk closed loop)", ""]
        out += table(["workers", "req/s", "speed-up", "p50 ms", "p99 ms", "errors", "PSS per worker MiB"],
                     [[s["workers"], fmt(s["rps"], 0), fmt(s["speedup"]), fmt(s["p50_ms"]), fmt(s["p99_ms"]),
                       s["errors"], ", ".join(f"{v:.0f}" for v in s["worker_pss_mib"])] for s in document["scaling"]])
        out += [""]
    memory = document["memory"]
    if memory:
        out += [f"### Memory (PSS, MiB; dense model of {memory['dense_weights_mib']:g} MiB of weights)", ""]
        out += table(["model", "route", "workers", "total", "per worker", "floor (no model)", "model cost"],
                     [[m["model"], m["route"], m["workers"], m["total_pss_mib"], m["per_worker_mib"], m["floor_mib"],
                       m["model_cost_mib"]] for m in memory["rows"]]) + [""]
    if document["locust"]:
        out += ["### Locust mix", ""]
        out += table(["endpoint", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors"],
                     [[r["endpoint"], r["requests"], fmt(r["rps"], 1), fmt(r["p50_ms"], 0), fmt(r["p95_ms"], 0),
                       fmt(r["p99_ms"], 0), r["errors"]] for r in document["locust"]]) + [""]
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as handle:
        print(render(json.load(handle)))
