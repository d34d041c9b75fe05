"""docs/runbook.md's blocks run for real, in document order, against one real `sira serve` started here.

Each block runs by bash with `set -euo pipefail` in the repository root, shell variables carrying from block to
block; blocks that call promtool run in their own test. Details: tests/fixtures/runbook.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.fixtures.models import build_dense_model, demo_spec, write_spec
from tests.fixtures.runbook import Block, blocks
from tests.fixtures.server import REPO, SIRA
from tests.fixtures.tools import promtool, require_tool

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
