"""The benchmark's output: a table on stdout and one JSON document with every figure and verdict."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from collections.abc import Callable

ROW_FIELDS = ("scenario", "target", "mode", "tool", "rate", "connections", "seconds", "requests", "rps",
              "p50_ms", "p95_ms", "p99_ms", "max_ms", "errors", "slo", "verdict")
TOP_FIELDS = ("schema", "date", "machine", "cpu_plan", "options", "command", "results", "ratios", "goals",
              "swap", "scaling", "memory", "locust", "notes", "failures", "elapsed_s")


def missing_fields(document: dict) -> list[str]:
    """Fields the report promises that `document` lacks (the smoke test's check)."""
    missing = [field for field in TOP_FIELDS if field not in document]
    for index, item in enumerate(document.get("results", [])):
        missing += [f"results[{index}].{field}" for field in ROW_FIELDS if field not in item]
    return missing


def tool_version(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[0] if text else None


def machine(wrk: str | None, k6: str | None) -> dict:
    """What the figures were measured on."""
    model = None
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), None)
    except OSError:
        pass
    import onnxruntime

    return {"cpu_model": model, "cpus_online": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "load_average_at_start": os.getloadavg(),
            "wrk": wrk and tool_version([wrk, "-v"]), "k6": k6 and tool_version([k6, "version"])}


def new_document(command: list[str], options: dict, cpu_plan: str, machine_info: dict) -> dict:
    return {"schema": "sira-bench/1", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine_info, "cpu_plan": cpu_plan, "options": options, "command": command,
            "results": [], "ratios": {}, "goals": [], "swap": None, "scaling": [], "memory": None, "locust": [],
            "notes": [], "failures": [], "elapsed_s": 0.0}


def write_json(document: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2)
        handle.write("\n")


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def mode_label(item: dict) -> str:
    return f"{item['rate']} req/s (k6)" if item["mode"] == "rate" else f"max, {item['connections']} conn (wrk)"


def print_report(document: dict, out: Callable[[str], None] = print) -> None:
    out(f"\nSIRA benchmark, {document['date']}; {document['cpu_plan']}")
    out(f"{'scenario':<9} {'target':<12} {'load':<21} {'req/s':>8} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
        f"{'max ms':>7} {'errors':>6} {'cpu us':>6}  SLO")
    for item in document["results"]:
        failed = "; ".join(c["name"] for c in item["slo"] if c["pass"] is False)
        out(f"{item['scenario']:<9} {item['target']:<12} {mode_label(item):<21} {fmt(item['rps'], 0):>8} "
            f"{fmt(item['p50_ms']):>7} {fmt(item['p95_ms']):>7} {fmt(item['p99_ms']):>7} {fmt(item['max_ms']):>7} "
            f"{item['errors']:>6} {fmt(item.get('server_cpu_us_per_request'), 0):>6}  "
            f"{item['verdict']}{f' ({failed})' if failed else ''}"
            f"{'  dropped ' + str(item['dropped']) if item.get('dropped') else ''}")
    out("(cpu us: the server's CPU time per request in the closed-loop run, its Postgres included)")
    for item in document["results"]:
        if item.get("server_cpu_us_by_job"):
            out(f"  cpu us by job, {item['scenario']} on {item['target']}: " + ", ".join(
                f"{job} {value:.0f}" for job, value in item["server_cpu_us_by_job"].items()))
    for peer, entry in document["ratios"].items():
        out(f"SIRA / {peer}: " + ", ".join(f"{key} {value:.2f}x" for key, value in entry.items()))
    print_sections(document, out)
    out("\ngoals (issue 10):")
    for goal in document["goals"]:
        state = {True: "PASS", False: "FAIL", None: "not measured"}[goal["pass"]]
        out(f"  {state:<12} {goal['name']} (measured {fmt(goal['value'])})")
    for note in document["notes"]:
        out(f"note: {note}")
    for failure in document["failures"]:
        out(f"FAILED STEP: {failure}")


def print_sections(document: dict, out: Callable[[str], None]) -> None:
    swap = document["swap"]
    if swap:
        out(f"\nswap at {swap['rate']} req/s: publish {swap['publish_s']} s, promote {swap['promote_s']} s, "
            f"reload {swap['reload_s']} s; first answer of the new model {fmt(swap['first_new_answer_after_s'])} s "
            f"and last of the old {fmt(swap['last_old_answer_after_s'])} s after the publish began; "
            f"window {swap['window_s']} s")
        for side in ("inside", "outside"):
            f = swap[side]
            out(f"  {side:<8} requests {f['requests']:>6}  errors {f['errors']}  p50 {fmt(f['p50_ms'])} ms  "
                f"p99 {fmt(f['p99_ms'])} ms  max {fmt(f['max_ms'])} ms")
    if document["scaling"]:
        out("\nscaling (uncached, wrk closed loop):")
        for item in document["scaling"]:
            out(f"  {item['workers']:>3} workers  {fmt(item['rps'], 0):>8} req/s  x{fmt(item['speedup'])}  "
                f"p50 {fmt(item['p50_ms'])} ms  p99 {fmt(item['p99_ms'])} ms  errors {item['errors']}  "
                f"worker PSS MiB {item['worker_pss_mib']}")
    memory = document["memory"]
    if memory:
        out(f"\nmemory (dense model {memory['dense_weights_mib']} MiB of weights; PSS in MiB):")
        for item in memory["rows"]:
            out(f"  {item['model']:<11} {item['route']:<7} {item['workers']} workers  "
                f"total {item['total_pss_mib']:>7}  "
                f"per worker {item['per_worker_mib']:>7}  no-model floor {item['floor_mib']:>6}  "
                f"model cost {item['model_cost_mib']:>7}")
    if document["locust"]:
        out("\nlocust mix (per endpoint):")
        for item in document["locust"]:
            out(f"  {item['endpoint']:<32} {item['requests']:>6} req  {fmt(item['rps'], 1):>7} req/s  "
                f"p50 {fmt(item['p50_ms'], 0)}  p95 {fmt(item['p95_ms'], 0)}  p99 {fmt(item['p99_ms'], 0)} ms  "
                f"errors {item['errors']}")
