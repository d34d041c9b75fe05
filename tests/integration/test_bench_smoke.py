"""`python -m bench` end to end, briefly: a real `sira serve`, k6 and wrk, the JSON report complete.

Asserts what a run must get right whatever the machine's speed: every request answered without an
error, and every field of the report present. The figures themselves are never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.runner.report import missing_fields
from tests.fixtures.server import REPO
from tests.fixtures.tools import require_tool, tool_missing

pytestmark = pytest.mark.timeout(180)


def test_a_short_uncached_run_answers_every_request_and_writes_every_field(tmp_path):
    require_tool("wrk", "Debian/Ubuntu: apt-get install -y wrk")
    from bench.runner.k6 import k6_path

    try:
        k6_path()
    except RuntimeError as exc:
        tool_missing(str(exc))
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--scenarios", "uncached", "--targets", "sira", "--seconds", "2",
         "--warmup", "1", "--rate", "100", "--connections", "4", "--max-minutes", "2", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=150, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads(out.read_text())
    assert missing_fields(document) == []
    assert document["failures"] == []
    runs = {(r["scenario"], r["target"], r["mode"]): r for r in document["results"]}
    assert set(runs) == {("uncached", "sira", "rate"), ("uncached", "sira", "max")}
    for run in runs.values():
        assert run["requests"] > 0
        assert run["errors"] == 0, run
    assert runs[("uncached", "sira", "rate")]["tool"] == "k6"
    assert "uncached" in done.stdout and "goals" in done.stdout
