"""Swap: a new model version published, promoted and SIGHUP sent while k6 holds a fixed request rate.

The window runs from the moment `sira models publish` starts until the last answer made by the old
model (every worker has swapped) or the end of the commands, whichever is later, plus a margin on
both sides. Every request is placed inside or outside it by k6's own timestamps (its JSON output),
and the two sides are compared: requests, errors, p50, p99, max.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from bench.runner.cpus import CpuPlan, pinned
from bench.runner.k6 import read_samples, run_k6
from bench.runner.scenarios import LoadOptions
from bench.runner.targets import REPO, Target


def sira_cli(target: Target, plan: CpuPlan, *args: str) -> str:
    """A `sira` command against the target's data dir and database; its stdout."""
    done = subprocess.run(pinned([sys.executable, "-m", "workers.cli", *args], plan.load), env=target.env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"sira {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout.strip()


def publish_promote_reload(target: Target, plan: CpuPlan, marks: dict) -> None:
    """What ops do to ship a model: the demo model again under a new version (a new model id, so every
    worker opens new sessions over it), promoted to production, then SIGHUP to the master."""
    from workers.bootstrap import demo_files

    path, spec = demo_files()
    spec_path = os.path.splitext(path)[0] + ".spec.json"
    marks["start"] = time.time()
    try:
        marks["model_id"] = sira_cli(target, plan, "models", "publish", path, "--product", spec["product"],
                                     "--version", f"bench-swap-{int(marks['start'] * 1000)}",
                                     "--threshold", str(spec["threshold"]), "--spec", spec_path).splitlines()[-1]
        marks["published"] = time.time()
        sira_cli(target, plan, "models", "promote", marks["model_id"], "--to", "production")
        marks["promoted"] = time.time()
        sira_cli(target, plan, "reload")
        marks["reloaded"] = time.time()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:  # reported; the load run goes on
        marks["error"] = str(exc)


def figures_of(durations: list[float], errors: int) -> dict:
    ordered = sorted(durations)

    def pick(q: float) -> float | None:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

    return {"requests": len(ordered) + errors, "errors": errors, "p50_ms": pick(0.50), "p99_ms": pick(0.99),
            "max_ms": ordered[-1] if ordered else None}


def split_by_window(samples: list[dict], marks: dict, margin_s: float) -> dict:
    """The window from the samples and the command marks; figures inside it and outside it."""
    start = marks["start"]
    new_id = marks.get("model_id")
    served = [s for s in samples if s["kind"] == "served"]
    old_after = [s["t"] for s in served if s["t"] >= start and s["model_id"] != new_id]
    new_seen = [s["t"] for s in served if s["model_id"] == new_id]
    end = max([marks.get("reloaded", start), *old_after[-1:]])
    window = (start - margin_s, end + margin_s)
    sides = {"inside": ([], 0), "outside": ([], 0)}
    for sample in samples:
        if sample["kind"] != "request":
            continue
        side = "inside" if window[0] <= sample["t"] <= window[1] else "outside"
        durations, errors = sides[side]
        if sample["ok"]:
            durations.append(sample["ms"])
        else:
            sides[side] = (durations, errors + 1)
    return {
        "window_s": round(window[1] - window[0], 3),
        "first_new_answer_after_s": round(min(new_seen) - start, 3) if new_seen else None,
        "last_old_answer_after_s": round(old_after[-1] - start, 3) if old_after else None,
        "inside": figures_of(*sides["inside"]),
        "outside": figures_of(*sides["outside"]),
        "new_model_answers": len(new_seen),
    }


def run_swap(target: Target, plan: CpuPlan, options: LoadOptions, seconds: float, workdir: str,
             margin_s: float = 0.5) -> dict:
    """k6 at the uncached rate for `seconds`; the swap starts 40% of the way in."""
    raw_path = os.path.join(workdir, "swap-k6.jsonl")
    marks: dict = {}

    def swap_later() -> None:
        time.sleep(seconds * 0.4)
        publish_promote_reload(target, plan, marks)

    swapper = threading.Thread(target=swap_later, daemon=True)
    swapper.start()
    overall = run_k6("uncached", target.url, options.rate, seconds, target.token, plan.load, raw_path=raw_path,
                     extra_env={"SERVED_BY": "1"})
    swapper.join(120)
    if "error" in marks or "start" not in marks:
        raise RuntimeError(f"the swap did not complete: {marks.get('error', 'never started')}")
    with open(raw_path, encoding="utf-8") as handle:
        samples = list(read_samples(handle))
    os.remove(raw_path)
    split = split_by_window(samples, marks, margin_s)
    start = marks["start"]
    return {"rate": options.rate, "seconds": seconds, "new_model_id": marks["model_id"],
            "publish_s": round(marks["published"] - start, 3),
            "promote_s": round(marks["promoted"] - marks["published"], 3),
            "reload_s": round(marks["reloaded"] - marks["promoted"], 3), **split,
            "errors": split["inside"]["errors"] + split["outside"]["errors"],
            "overall": overall}
