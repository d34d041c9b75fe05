"""A full disk under the prediction log: 503s rather than unlogged answers, no crash loop, and every
answered prediction in Postgres once space returns.

The data dir sits on a small tmpfs that the test mounts (as root, as CI runs) and fills; Postgres is
away, so the writer must keep everything on that disk until it is full.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

import httpx
import pytest

from tests.e2e.test_predlog_recovery import events, logged, new_server, pid_in
from tests.fixtures.metrics import scrape, total
from tests.fixtures.server import bearer
from tests.fixtures.waiting import wait_for

pytestmark = pytest.mark.timeout(600)

DISK_BYTES = 24 * 1024 * 1024


@contextlib.contextmanager
def small_tmpfs(path: str):
    os.makedirs(path)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0700", "tmpfs", path],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def fill(path: str) -> str:
    """Fill the filesystem of ``path`` to the last byte with one file; returns the file."""
    filler = os.path.join(path, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (65536, 512, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * chunk):
                    pass
    finally:
        os.close(fd)
    return filler


def post_batches(server, batches: int) -> tuple[list[str], int]:
    """(ids of scored events, count of 503 entries) over ``batches`` batches of 100."""
    scored, refused = [], 0
    with httpx.Client(base_url=server.url, headers=bearer(), timeout=30) as client:
        for _ in range(batches):
            response = client.post("/v1/infer/batch", json={"events": events(100)})
            assert response.status_code == 200, response.text
            for result in response.json()["results"]:
                if "prediction_id" in result:
                    assert "score" in result
                    scored.append(result["prediction_id"])
                else:
                    assert result["error_code"] == "SERVICE_UNAVAILABLE", result
                    refused += 1
    return scored, refused


def test_a_full_disk_refuses_new_predictions_and_loses_none(tmp_path, own_postgres):
    with small_tmpfs(str(tmp_path / "disk")) as disk:
        data_dir = os.path.join(disk, "data")
        server = new_server(data_dir, own_postgres.url, SIRA_WORKERS="1", SIRA_QUEUE_RING_BYTES="65536")
        server.log_path = str(tmp_path / "server.log")  # the log must not fill (or need) the small disk
        server.start(timeout=90)
        try:
            writer = pid_in(data_dir, "writer.pid")
            answered, _ = post_batches(server, 2)
            own_postgres.close()
            filler = fill(disk)
            scored, refused = post_batches(server, 30)
            answered += scored
            assert refused > 0, "nothing was refused on a full disk"
            samples = scrape(server.url)
            assert total(samples, "sira_prediction_refused_total") == refused
            assert total(samples, "sira_prediction_disk_errors_total", reason="ENOSPC") > 0
            assert pid_in(data_dir, "writer.pid") == writer and os.path.exists(f"/proc/{writer}")
            assert "crashed" not in server.log() and "exited with code" not in server.log()
            errors = [line for line in server.log().splitlines() if "failed (ENOSPC" in line]
            assert 1 <= len(errors) <= 6, errors  # once per process and change of state, not per record
            os.unlink(filler)  # space returns, then Postgres
            own_postgres.open()
            wait_for(lambda: logged(own_postgres.url)[1] >= set(answered), "every answer in Postgres", 120)
            rows, ids = logged(own_postgres.url)
            assert ids == set(answered) and rows == len(answered)
            wait_for(lambda: "the disk works again" in server.log(), "the recovery in the log")
            after, refused_after = post_batches(server, 3)
            assert refused_after == 0
            wait_for(lambda: logged(own_postgres.url)[1] == set(answered + after), "new answers logged")
            print(f"full disk: {len(answered)} answered and {refused} refused while full, "
                  f"{len(errors)} ENOSPC log lines; then {len(after)} more; {rows} rows once space returned")
            assert pid_in(data_dir, "writer.pid") == writer
            done = scrape(server.url)
            assert total(done, "sira_prediction_rows_rejected_total") == 0  # every record read back whole
            assert total(done, "sira_prediction_damage_total") == 0
        finally:
            with contextlib.suppress(RuntimeError):  # already open
                own_postgres.open()
            server.stop()
