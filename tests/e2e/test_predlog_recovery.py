"""Where production breaks the prediction log: a whole server SIGKILLed, a master killed alone, a
second instance on a data dir in use. Every answered prediction still reaches Postgres exactly once.

Each kill leaves predictions in all three places they wait: the writer's spool (Postgres was away),
the queue rings and the workers' overflow files (the writer was frozen). The next `sira serve` on the
same data dir takes them over, and /dev/shm holds one instance's segments again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid

import httpx
import psycopg
import pytest

from tests.fixtures.metrics import scrape, total
from tests.fixtures.server import (
    TEST_INTERNAL_TOKEN,
    TEST_JWT_SECRET,
    SiraServer,
    bearer,
    free_port,
    is_zombie,
    process_tree,
    run_sira,
    sira_env,
)
from tests.fixtures.waiting import wait_for
from workers.metrics import metrics_dir

pytestmark = pytest.mark.timeout(600)

BATCH = 100


def new_server(data_dir: str, database_url: str, **env_overrides: str) -> SiraServer:
    port = free_port()
    env = sira_env(**{"SIRA_DATA_DIR": data_dir, "SIRA_BIND": f"127.0.0.1:{port}", "SIRA_WORKERS": "2",
                      "DATABASE_URL": database_url, "JWT_SECRET": TEST_JWT_SECRET,
                      "INTERNAL_SERVICE_TOKEN": TEST_INTERNAL_TOKEN, "LOG_LEVEL": "info", **env_overrides})
    return SiraServer(data_dir, env, port)


def events(count: int) -> list[dict]:
    return [{"event_id": str(uuid.uuid4()), "product": "fraud_score",
             "payload": {"amount": 10.0 + i, "currency": "USD", "country": "US", "payment_method": "card"}}
            for i in range(count)]


def score(server: SiraServer, count: int) -> list[str]:
    """``count`` predictions in batches of BATCH, each over a new connection (both workers answer)."""
    ids = []
    for start in range(0, count, BATCH):
        with httpx.Client(base_url=server.url, headers=bearer(), timeout=30) as client:
            response = client.post("/v1/infer/batch", json={"events": events(min(BATCH, count - start))})
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert all("prediction_id" in result for result in results), results
        ids += [result["prediction_id"] for result in results]
    return ids


def logged(dsn: str) -> tuple[int, set[str]]:
    """(rows, distinct ids) of the prediction log."""
    with psycopg.connect(dsn) as conn:
        ids = [row[0] for row in conn.execute("SELECT prediction_id::text FROM siramodel_predictions")]
    return len(ids), set(ids)


def pid_in(data_dir: str, name: str) -> int | None:
    with contextlib.suppress(OSError, ValueError), open(os.path.join(data_dir, name), encoding="ascii") as handle:
        return int(handle.read().strip())
    return None


def alive(pid: int | None) -> bool:
    return bool(pid) and os.path.exists(f"/proc/{pid}") and not is_zombie(pid)


def kill_whole_group(server: SiraServer) -> None:
    """What an OOM kill of the container does: SIGKILL to every process of the server at once."""
    tree = process_tree(server.master_pid)
    os.killpg(server.master_pid, signal.SIGKILL)
    server.returncode = server.process.wait(10)
    wait_for(lambda: not [pid for pid in tree if alive(pid)], "every process of the killed server to go")


def files_in(folder: str) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return [name for name in os.listdir(folder) if not name.startswith(".")]
    return []


def on_disk(samples) -> float:
    """Predictions the writer spooled plus those the workers spilled to overflow files."""
    return total(samples, "sira_prediction_rows_spooled_total") + total(samples, "sira_prediction_queue_overflow_total")


def fill_spool_rings_and_overflow(server: SiraServer, own_postgres) -> list[str]:
    """Predictions in the spool (Postgres away), then in the rings and overflow files (writer frozen)."""
    spool = os.path.join(server.data_dir, "spool")
    own_postgres.close()
    spooled = score(server, 1000)
    wait_for(lambda: on_disk(scrape(server.url)) >= len(spooled), "the writer to spool what Postgres could not take")
    writer = pid_in(server.data_dir, "writer.pid")
    os.kill(writer, signal.SIGSTOP)  # killed below while stopped: SIGKILL needs no SIGCONT
    waiting = score(server, 1500)
    assert files_in(os.path.join(spool, "batches")), "nothing was spooled"
    assert files_in(os.path.join(spool, "overflow")), "nothing was spilled to overflow files"
    samples = scrape(server.url)
    assert total(samples, "sira_prediction_queue_depth") > 0, "the rings are empty"
    print(f"at the kill: {len(spooled) + len(waiting)} answered; spooled "
          f"{total(samples, 'sira_prediction_rows_spooled_total'):.0f}, overflow files "
          f"{total(samples, 'sira_prediction_queue_overflow_total'):.0f}, rings "
          f"{total(samples, 'sira_prediction_queue_depth'):.0f}")
    return spooled + waiting


def test_whole_server_sigkilled_three_times_loses_nothing_and_leaks_no_segment(tmp_path, own_postgres):
    data_dir = str(tmp_path / "data")
    dsn = own_postgres.url
    answered: list[str] = []
    spool = os.path.join(data_dir, "spool")
    server = new_server(data_dir, dsn, SIRA_QUEUE_RING_BYTES="65536").start(timeout=90)
    try:
        for cycle in range(3):
            answered += fill_spool_rings_and_overflow(server, own_postgres)
            kill_whole_group(server)
            left = server.segments()
            assert any(name.endswith("-predlog") for name in left), left  # the rings outlived the kill
            with open(os.path.join(data_dir, "sira.pid"), "w", encoding="ascii") as handle:
                handle.write(f"{os.getpid()}\n")  # the dead master's pid, reused by a live process
            own_postgres.open()
            server = new_server(data_dir, dsn, SIRA_QUEUE_RING_BYTES="65536").start(timeout=90)
            wait_for(lambda answered=answered: logged(dsn)[1] == set(answered),
                     f"cycle {cycle}: every answer in Postgres", 120)
            rows, ids = logged(dsn)
            assert rows == len(answered) == len(ids), f"cycle {cycle}: {rows} rows for {len(answered)} answers"
            print(f"cycle {cycle}: {rows} rows in Postgres for {len(answered)} answers")
            wait_for(lambda server=server: server.segments() == server.segments(server.master_pid),
                     f"cycle {cycle}: the dead instance's segments to go")
            assert not server.segments() & left
            wait_for(lambda: not files_in(os.path.join(spool, "batches")) and
                     not files_in(os.path.join(spool, "overflow")), "the spool and overflow files replayed")
    finally:
        with contextlib.suppress(RuntimeError):  # already open
            own_postgres.open()
        server.stop()
    assert server.returncode == 0
    assert server.segments() == set()  # a clean stop removes its own segments too


def test_master_killed_alone_takes_its_children_along_and_the_next_start_drains_its_rings(tmp_path, own_postgres):
    data_dir = str(tmp_path / "data")
    server = new_server(data_dir, own_postgres.url).start(timeout=90)
    writer = pid_in(data_dir, "writer.pid")
    supervisor = pid_in(data_dir, "supervisor.pid")
    os.kill(writer, signal.SIGSTOP)  # predictions wait in the rings when the master dies
    answered = score(server, 300)
    tree = process_tree(server.master_pid)
    os.kill(server.master_pid, signal.SIGKILL)
    server.returncode = server.process.wait(10)
    time.sleep(2.0)
    assert not alive(writer) and not alive(supervisor), "a sidecar outlived its master by 2 s"
    wait_for(lambda: not [pid for pid in tree if alive(pid)], "the workers to notice their master is gone", 10)
    successor = new_server(data_dir, own_postgres.url).start(timeout=90)
    try:
        wait_for(lambda: logged(own_postgres.url)[1] == set(answered), "the orphaned rings drained")
        assert logged(own_postgres.url)[0] == len(answered)
        print(f"master killed alone: {len(answered)} answers in its rings, {len(answered)} rows in Postgres")
        wait_for(lambda: successor.segments() == successor.segments(successor.master_pid), "old segments removed")
        assert "taking over the prediction rings" in successor.log()
    finally:
        assert successor.stop() == 0


def metric_lines(server: SiraServer) -> list[str]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return [line for line in text.splitlines() if line.startswith("sira")]


def test_a_second_serve_on_a_data_dir_in_use_exits_2_and_changes_nothing(tmp_path, fresh_db):
    data_dir = str(tmp_path / "data")
    server = new_server(data_dir, fresh_db).start(timeout=90)
    try:
        score(server, 5)
        before = metric_lines(server)
        segments, pidfile = server.segments(), pid_in(data_dir, "sira.pid")
        metrics_files = sorted(os.listdir(metrics_dir(data_dir)))
        env = {**server.env, "SIRA_BIND": f"127.0.0.1:{free_port()}"}
        second = run_sira("serve", env=env, timeout=60)
        assert second.returncode == 2, second
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and str(server.master_pid) in lines[0] and "in use" in lines[0], second.stderr
        assert server.segments() == segments and pid_in(data_dir, "sira.pid") == pidfile
        assert set(metrics_files) <= set(os.listdir(metrics_dir(data_dir)))  # nothing emptied
        after = metric_lines(server)
        assert len(after) >= len(before) > 18, (len(before), len(after))
    finally:
        assert server.stop() == 0


def test_usr2_is_refused_with_one_line_and_the_server_keeps_serving(tmp_path, fresh_db):
    server = new_server(str(tmp_path / "data"), fresh_db).start(timeout=90)
    try:
        tree = set(process_tree(server.master_pid))
        os.kill(server.master_pid, signal.SIGUSR2)
        wait_for(lambda: "SIGUSR2 ignored" in server.log(), "the refusal in the log", 10)
        time.sleep(1.0)
        assert set(process_tree(server.master_pid)) == tree  # no new master was exec'd
        assert score(server, 3)
        assert server.log().count("SIGUSR2 ignored") == 1
    finally:
        assert server.stop() == 0
