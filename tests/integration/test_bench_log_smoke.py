"""The prediction log's scale benchmarks run end to end on tiny inputs, so they never rot.

Only what a run must get right whatever the machine: it exits 0, prints a line for every case and
every row it wrote arrived (the benchmarks assert their own counts). No figure is asserted.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.fixtures.server import REPO

pytestmark = pytest.mark.timeout(300)


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_bench_pods_runs_each_count_of_writers():
    out = run("bench.bench_pods", "--writers", "1,2", "--rows-per-writer", "2000", "--no-fsync")
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "2"]


def test_bench_sizing_measures_postgres_and_the_archive():
    out = run("bench.bench_sizing", "--rows", "3000")
    assert "Postgres in all" in out and "Parquet archive" in out


def test_bench_partition_migration_converts_every_row():
    assert "3,000 rows" in run("bench.bench_partition_migration", "--rows", "3000", "--days", "3", "--no-fsync")
