"""EmbeddedPostgres and open_database: a real server under a data dir, shared by processes, gone after."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest

from workers.postgres import EmbeddedPostgres, open_database

REPO_ROOT = Path(__file__).resolve().parents[2]

# A child process: open the server on argv[1], print its URL and the postmaster pid, then answer
# one query per "query" line on stdin and leave (closing the handle) on "exit".
HOLD_IN_CHILD = """
import sys
import psycopg
from workers.postgres import EmbeddedPostgres
with EmbeddedPostgres(sys.argv[1], durable=False) as server:
    with open(sys.argv[1] + "/postmaster.pid") as handle:
        print(server.url, handle.readline().strip(), flush=True)
    for line in sys.stdin:
        if line.strip() == "exit":
            break
        with psycopg.connect(server.url) as conn:
            print(conn.execute("SELECT count(*) FROM pg_stat_activity").fetchone()[0] > 0, flush=True)
"""


def processes_working_in(folder: Path) -> list[int]:
    """Pids of the processes whose working directory is inside folder (every postgres process chdirs to pgdata)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd == str(folder) or cwd.startswith(str(folder) + "/"):
            found.append(int(entry))
    return found


def postmaster_pid(pgdata: Path) -> int:
    with open(pgdata / "postmaster.pid", encoding="ascii") as handle:
        return int(handle.readline())


def answers(url: str) -> bool:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return conn.execute("SELECT 1").fetchone() == (1,)


def kill_leftovers(folder: Path) -> list[int]:
    """Kill any process still working in folder (only after a test failed half-way) and return their pids."""
    leftovers = processes_working_in(folder)
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    return leftovers


@pytest.fixture
def new_pgdata():
    """A data dir that does not exist yet, straight under /tmp (the server's user must reach it when we
    are root), removed after the test."""
    folder = Path(tempfile.mkdtemp(prefix="sira-embedded-"))
    try:
        yield folder / "pg"
    finally:
        leftovers = kill_leftovers(folder)
        shutil.rmtree(folder, ignore_errors=True)
        assert leftovers == [], "a postgres was left running"


@pytest.fixture(scope="module")
def initialized_pgdata():
    """One initialised, stopped cluster that the tests below reuse, as successive runs of sira do."""
    folder = Path(tempfile.mkdtemp(prefix="sira-embedded-"))
    try:
        EmbeddedPostgres(folder / "pg", durable=False).open().close()
        yield folder / "pg"
    finally:
        kill_leftovers(folder)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pgdata(initialized_pgdata):
    """The shared cluster; the test must leave no server running on it."""
    yield initialized_pgdata
    assert kill_leftovers(initialized_pgdata) == [], "a postgres was left running"


def is_running(pid: int) -> bool:
    """Whether pid is a live process (a zombie waiting for init to reap it is not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


class Child:
    """A python child that holds an EmbeddedPostgres on pgdata until told to exit."""

    def __init__(self, pgdata: Path):
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLD_IN_CHILD, str(pgdata)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})

    def started(self) -> tuple[str, int]:
        url, pid = self.process.stdout.readline().split()
        return url, int(pid)

    def query(self) -> bool:
        self.process.stdin.write("query\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip() == "True"

    def exit(self) -> int:
        self.process.stdin.write("exit\n")
        self.process.stdin.flush()
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def children():
    made: list[Child] = []
    yield lambda pgdata: made.append(Child(pgdata)) or made[-1]
    for child in made:
        child.kill()


def test_starts_answers_and_leaves_no_process_after_close(new_pgdata):
    pgdata = new_pgdata
    server = EmbeddedPostgres(pgdata)  # durable, as sira serve runs it
    with server:
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT current_database(), current_setting('server_version_num')::int / 10000"
                                ).fetchone() == ("sira", 16)
            assert conn.execute("SELECT current_setting('listen_addresses'), current_setting('fsync')"
                                ).fetchone() == ("", "on")
        pid = postmaster_pid(pgdata)
        assert pid in processes_working_in(pgdata)
    assert processes_working_in(pgdata) == []
    assert not is_running(pid)
    server.close()  # idempotent
    with pytest.raises(RuntimeError, match="not open"):
        _ = server.url


def test_second_open_reuses_the_data(pgdata):
    with EmbeddedPostgres(pgdata, durable=False) as server, psycopg.connect(server.url) as conn:
        conn.execute("CREATE TABLE kept (note text)")
        conn.execute("INSERT INTO kept VALUES ('still here')")
    assert processes_working_in(pgdata) == []
    with EmbeddedPostgres(pgdata, durable=False) as server, psycopg.connect(server.url) as conn:
        assert conn.execute("SELECT note FROM kept").fetchall() == [("still here",)]
        conn.execute("DROP TABLE kept")


def test_two_handles_in_one_process_share_the_server_until_the_last_closes(pgdata):
    first = EmbeddedPostgres(pgdata, durable=False).open()
    second = EmbeddedPostgres(pgdata, durable=False).open()
    try:
        assert first.url == second.url
        pid = postmaster_pid(pgdata)
        first.close()
        assert answers(second.url)
        assert postmaster_pid(pgdata) == pid
    finally:
        first.close()
        second.close()
    assert processes_working_in(pgdata) == []


def test_two_processes_started_at_once_share_one_server_that_stops_after_both(new_pgdata, children):
    pgdata = new_pgdata
    one, two = children(pgdata), children(pgdata)  # both race to initdb and start
    (url_one, pid_one), (url_two, pid_two) = one.started(), two.started()
    assert url_one == url_two and pid_one == pid_two
    assert one.query() and two.query()
    assert one.exit() == 0
    assert two.query(), "the server stopped while a process still used it"
    assert postmaster_pid(pgdata) == pid_one
    assert two.exit() == 0
    assert processes_working_in(pgdata) == []
    assert not is_running(pid_one)


def test_a_killed_user_does_not_keep_the_server_alive_for_good(pgdata, children):
    holder = children(pgdata)
    _, pid = holder.started()
    holder.kill()  # SIGKILL: no close(), no atexit
    assert pid in processes_working_in(pgdata)
    with EmbeddedPostgres(pgdata, durable=False) as server:
        assert postmaster_pid(pgdata) == pid, "the running server is joined, not restarted"
        assert answers(server.url)
    assert processes_working_in(pgdata) == []


def test_a_forked_child_closing_its_copy_does_not_stop_the_parents_server(pgdata):
    with EmbeddedPostgres(pgdata, durable=False) as server:
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            server.close()
            os._exit(0)
        assert os.waitpid(child, 0)[1] == 0
        assert answers(server.url)
    assert processes_working_in(pgdata) == []


def test_open_database_passes_a_url_through_and_starts_nothing(tmp_path):
    url = "postgresql://sira:secret@db.example.com:5432/sira"
    with open_database(url, str(tmp_path / "data")) as dsn:
        assert dsn == url
    assert not (tmp_path / "data").exists()


def test_open_database_without_url_runs_the_embedded_server_under_data_dir_pg(new_pgdata):
    data_dir = new_pgdata.parent / "data"
    EmbeddedPostgres(data_dir / "pg", durable=False).open().close()  # initdb without fsync: faster
    with open_database(None, str(data_dir)) as dsn:
        assert answers(dsn)
        assert (data_dir / "pg" / "postmaster.pid").exists()
    assert processes_working_in(data_dir) == []
