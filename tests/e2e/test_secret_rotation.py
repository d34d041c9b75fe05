"""Secret files rotated under a real two-worker `sira serve`: SIGHUP (`sira reload`) puts them in force.

The secret folder is laid out as Kubernetes mounts a Secret: the files are symlinks through `..data`
to a timestamped folder, and a rotation writes a new folder and swaps the `..data` link atomically.
After each `sira reload` the test waits for the master's and both workers' "secret files reloaded"
lines, then opens fresh connections until both workers have answered, and checks every token on
each connection (/readyz names the worker that answered).
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import subprocess
import time

import httpx
import pytest

from app.auth.keys import mint_token
from tests.fixtures.server import SiraServer, free_port, run_sira, sira_env

S1 = "jwt-secret-one-" + secrets.token_hex(20)
S2 = "jwt-secret-two-" + secrets.token_hex(20)
T1 = "internal-one-" + secrets.token_hex(12)
T2 = "internal-two-" + secrets.token_hex(12)
MAX_ROUNDS = 400  # fresh connections tried before giving up on reaching both workers
RELOADED = "secret files reloaded"
_versions = itertools.count()


def mount(folder, files: dict[str, str]) -> None:
    """Write `files` as Kubernetes' atomic writer does: a new folder, then one rename of the ..data link."""
    version = folder / f"..{next(_versions):04d}"
    version.mkdir(mode=0o755)
    for name, text in files.items():
        (version / name).write_text(text)
        (version / name).chmod(0o400)
        if not (folder / name).is_symlink():
            os.symlink(f"..data/{name}", folder / name)
    os.symlink(version.name, folder / "..data_tmp")
    os.replace(folder / "..data_tmp", folder / "..data")


def log_lines(server: SiraServer) -> list[dict]:
    lines = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def reload_and_wait(server: SiraServer, expect_lines: int, text: str = RELOADED,
                    timeout: float = 30.0) -> subprocess.CompletedProcess:
    """`sira reload`, then wait until `expect_lines` more log lines contain `text`."""
    before = sum(text in line.get("message", "") for line in log_lines(server))
    result = run_sira("reload", env=server.env)
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(text in line.get("message", "") for line in log_lines(server)) >= before + expect_lines:
            return result
        time.sleep(0.1)
    pytest.fail(f"no {expect_lines} new {text!r} lines after SIGHUP:\n{server.log()[-3000:]}")


def statuses_on_every_worker(server: SiraServer, credentials: dict[str, str]) -> dict[int, dict[str, int]]:
    """worker pid -> {name: status of GET /v1/models with that bearer}, each worker on a fresh connection."""
    seen: dict[int, dict[str, int]] = {}
    for _ in range(MAX_ROUNDS):
        with httpx.Client(base_url=server.url, timeout=15) as client:  # one connection: one worker
            ready = client.get("/readyz")
            if ready.status_code != 200:  # a worker still loading its model
                continue
            pid = ready.json()["worker_pid"]
            if pid not in seen:
                seen[pid] = {name: client.get("/v1/models", headers={"Authorization": f"Bearer {value}"}).status_code
                             for name, value in credentials.items()}
        if len(seen) >= 2:
            return seen
    pytest.fail(f"{MAX_ROUNDS} fresh connections all reached the same worker {list(seen)}")


def assert_everywhere(server: SiraServer, credentials: dict[str, str], expected: dict[str, int]) -> None:
    by_worker = statuses_on_every_worker(server, credentials)
    assert all(statuses == expected for statuses in by_worker.values()), by_worker


@pytest.fixture
def rotating_server(tmp_path, fresh_db):
    folder = tmp_path / "secrets"
    folder.mkdir(mode=0o700)
    mount(folder, {"jwt": json.dumps({"k1": S1}) + "\n", "tokens": T1 + "\n"})
    port = free_port()
    data_dir = str(tmp_path / "data")
    env = sira_env(SIRA_DATA_DIR=data_dir, SIRA_BIND=f"127.0.0.1:{port}", SIRA_WORKERS="2", DATABASE_URL=fresh_db,
                   JWT_SECRET_FILE=str(folder / "jwt"), INTERNAL_SERVICE_TOKEN_FILE=str(folder / "tokens"),
                   LOG_LEVEL="info", SIRA_RATE_LIMITS="anonymous=unlimited,ml_ops=unlimited")
    server = SiraServer(data_dir, env, port)
    try:
        yield server.start(), folder
    finally:
        server.stop()


def test_rotated_secrets_are_in_force_on_every_worker_after_sighup(rotating_server):
    server, folder = rotating_server
    minted = run_sira("token", "--role", "ml_ops", "--sub", "rotation", env=server.env)  # signs with k1, the first
    assert minted.returncode == 0, minted.stderr
    credentials = {"k1": minted.stdout.strip(), "T1": T1, "T2": T2,
                   "k2": mint_token(role="ml_ops", subject="rotation", ttl_s=600, secret=S2, kid="k2")}
    assert_everywhere(server, credentials, {"k1": 200, "k2": 401, "T1": 200, "T2": 401})

    mount(folder, {"jwt": json.dumps({"k1": S1, "k2": S2}), "tokens": f"{T1}\n{T2}\n"})
    reload_and_wait(server, expect_lines=3)  # the master and both workers
    assert_everywhere(server, credentials, {"k1": 200, "k2": 200, "T1": 200, "T2": 200})
    by_kid = run_sira("token", "--role", "ml_ops", "--sub", "rotation", "--kid", "k2", env=server.env)
    assert by_kid.returncode == 0, by_kid.stderr
    assert_everywhere(server, {"sira token --kid k2": by_kid.stdout.strip()}, {"sira token --kid k2": 200})

    mount(folder, {"jwt": json.dumps({"k2": S2}), "tokens": T2})
    reload_and_wait(server, expect_lines=3)
    assert_everywhere(server, credentials, {"k1": 401, "k2": 200, "T1": 401, "T2": 200})

    # A rotation caught with an empty file: one error line, and every process keeps its keys.
    mount(folder, {"jwt": "", "tokens": T2})
    reloaded = reload_and_wait(server, expect_lines=1, text="secret files not reloaded")
    assert "warning: JWT_SECRET_FILE" in reloaded.stderr and "is empty" in reloaded.stderr  # SIGHUP sent anyway
    assert_everywhere(server, credentials, {"k1": 401, "k2": 200, "T1": 401, "T2": 200})
    errors = [line for line in log_lines(server) if line.get("level") == "error"]
    assert len(errors) == 1 and "is empty" in errors[0]["message"], errors

    assert server.stop() == 0
    log = server.log()
    assert [name for name, value in {"S1": S1, "S2": S2, "T1": T1, "T2": T2}.items() if value in log] == []


@pytest.mark.parametrize("variable", ["JWT_SECRET_FILE", "INTERNAL_SERVICE_TOKEN_FILE", "DATABASE_URL_FILE"])
def test_a_world_readable_secret_file_stops_serve_with_one_line(tmp_path, fresh_db, variable):
    path = tmp_path / "secret"
    path.write_text({"JWT_SECRET_FILE": S1, "INTERNAL_SERVICE_TOKEN_FILE": T1, "DATABASE_URL_FILE": fresh_db}[variable])
    path.chmod(0o644)
    env = sira_env(SIRA_DATA_DIR=str(tmp_path / "data"), SIRA_BIND=f"127.0.0.1:{free_port()}", **{variable: str(path)})
    if variable != "DATABASE_URL_FILE":
        env["DATABASE_URL"] = fresh_db
    result = run_sira("serve", env=env, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        (f"sira: configuration error: {variable}: {path} has mode 0644: a secret file must not be readable by others "
         "nor writable by its group or others (make it 0400 or 0440)")]
    assert not (tmp_path / "data").exists(), "nothing may start before the secret files are checked"


def test_a_worker_that_gets_sighup_while_it_boots_reloads_once_running(rotating_server):
    """A new worker holds SIGHUP from its fork until its event loop handles it: not lost, and not its
    default action (which would kill it)."""
    server, folder = rotating_server
    victim = server.worker_pids()[0]
    before = set(server.worker_pids())
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not set(server.worker_pids()) - before:  # the replacement is forked; it boots for a while
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.005)
    mount(folder, {"jwt": json.dumps({"k1": S1}), "tokens": f"{T1}\n{T2}\n"})
    os.kill(server.master_pid, signal.SIGHUP)
    while True:
        workers = server.worker_pids()
        reloaded = {line.get("pid") for line in log_lines(server) if RELOADED in line.get("message", "")}
        if len(workers) == 2 and set(workers) <= reloaded:
            break
        assert time.monotonic() < deadline, f"workers {workers}, reloaded {reloaded}:\n{server.log()[-3000:]}"
        time.sleep(0.1)
    assert "was sent SIGHUP" not in server.log()
    assert_everywhere(server, {"T1": T1, "T2": T2}, {"T1": 200, "T2": 200})
