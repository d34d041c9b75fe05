"""A data dir others could write into is refused at start: what sits in its spool becomes rows of
the immutable prediction log, so only the server's user may write there."""

from __future__ import annotations

import os

import pytest

from tests.fixtures.server import TEST_JWT_SECRET, free_port, run_sira, sira_env


def serve(data_dir: str, database_url: str):
    env = sira_env(SIRA_DATA_DIR=data_dir, SIRA_BIND=f"127.0.0.1:{free_port()}", SIRA_WORKERS="1",
                   DATABASE_URL=database_url, JWT_SECRET=TEST_JWT_SECRET)
    return run_sira("serve", env=env, timeout=60)


@pytest.mark.parametrize("folder, mode", [("", 0o777), ("", 0o770), ("spool", 0o757), ("spool/overflow", 0o775),
                                          ("spool/batches", 0o722)])
def test_a_folder_of_the_log_writable_by_others_stops_the_server_before_anything_starts(tmp_path, fresh_db,
                                                                                        folder, mode):
    data_dir = tmp_path / "data"
    os.makedirs(data_dir / "spool" / "overflow", mode=0o700)
    os.makedirs(data_dir / "spool" / "batches", mode=0o700)
    target = data_dir / folder
    os.chmod(target, mode)
    result = serve(str(data_dir), fresh_db)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{os.path.abspath(target)} is writable by group or others (mode {mode:04o})" in lines[0]
    assert "chmod go-w" in lines[0]
    assert not (data_dir / "sira.lock").exists() and not (data_dir / "sira.pid").exists()  # nothing was touched
