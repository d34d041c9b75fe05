"""Where the database is: the server named by DATABASE_URL, or a PostgreSQL of our own under the data dir.

With no DATABASE_URL, `EmbeddedPostgres` runs the PostgreSQL 16 that the `pgserver` wheel ships, so a
fresh machine needs nothing installed by hand. Several processes (`sira serve`, `sira migrate`, tests)
may open the same data dir at once: they share one server, and the last one to close stops it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import logging
import os
import shlex
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from psycopg import sql

from app.db import connect
from workers.processes import process_exists

log = logging.getLogger("sira.database")

DATABASE_NAME = "sira"
SUPERUSER = "postgres"
# PostgreSQL refuses to run as root; as root we run it as this system user (the one pgserver uses).
SYSTEM_USER_WHEN_ROOT = "pgserver"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 60
# Only names the socket file: the embedded server listens on a unix socket and on no TCP port.
SOCKET_PORT = 5432
# sun_path holds 108 bytes with the trailing NUL.
MAX_SOCKET_PATH = 107


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be initialised, started or stopped; the message says why."""


@contextlib.contextmanager
def open_database(database_url: str | None, data_dir: str) -> Iterator[str]:
    """Yield the DSN to use: database_url as given, else the embedded server under data_dir/pg."""
    if database_url:
        yield database_url
        return
    with EmbeddedPostgres(os.path.join(data_dir, "pg")) as server:
        yield server.url


@dataclass(frozen=True)
class _Postmaster:
    """What the running server wrote in pgdata/postmaster.pid."""

    pid: int
    port: int
    socket_dir: str
    status: str


class EmbeddedPostgres:
    """A PostgreSQL server whose data folder is data_dir, shared by every process that opens it.

    data_dir is the cluster itself (initdb), and also holds:
        postmaster.pid     written by the server: its pid, port, socket folder and state
        .s.PGSQL.5432      its unix socket (it listens on no TCP port)
        postgres.log       its log
        sira-users.lock    each open EmbeddedPostgres holds a shared flock on its own open of this file
    and the folder itself is flocked exclusively while a process starts, joins or stops the server
    (a lock that needs no file, so it also guards initdb, which wants an empty folder).

    close() tries to turn its shared users lock into an exclusive one under the folder lock: that
    succeeds only when no other handle, in any process, holds the server, and then it stops it. The
    kernel drops the locks of a process that dies, so a killed user never keeps the server alive for
    good; a server it leaves running is reused by the next open() and stopped by the last close().

    Why not pgserver.get_server(): it keeps one handle per data dir per process, so a second
    get_server() after the first handle stopped the server returns a handle to a stopped server; it
    counts users as pids in pgdata/.handle_pids.json, where a killed process stays forever and the
    server then never stops; and one machine-wide lock serialises every data dir. We use its binaries.

    durable=False skips every fsync (initdb --no-sync, fsync=off), for tests and throwaway servers:
    a machine crash may then corrupt the data. The process that starts the server decides.

    A handle belongs to the process that opened it: a forked child (gunicorn worker) shares the
    parent's lock, and its close() only closes its copy of the descriptor. Not thread safe.
    """

    def __init__(self, data_dir: str | os.PathLike[str], *, durable: bool = True):
        self.pgdata = Path(data_dir).expanduser().absolute()
        self.durable = durable
        self.log_file = self.pgdata / "postgres.log"
        self._users_lock_file = self.pgdata / "sira-users.lock"
        self._users_fd: int | None = None
        self._owner_pid: int | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """The URL of the `sira` database on this server (unix socket, user postgres, trust auth)."""
        if self._url is None:
            raise RuntimeError("EmbeddedPostgres is not open")
        return self._url

    def open(self) -> EmbeddedPostgres:
        """Start the server (or join the running one) and make sure the `sira` database exists."""
        if self._users_fd is not None:
            raise RuntimeError("EmbeddedPostgres is already open")
        self.pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._lifecycle_lock():
            postmaster = self._ensure_running()
            users_fd = os.open(self._users_lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(users_fd, fcntl.LOCK_SH)
            try:
                self._ensure_database(postmaster)
            except BaseException:
                self._release_and_stop_if_last(users_fd)
                raise
        self._users_fd = users_fd
        self._owner_pid = os.getpid()
        self._url = _socket_url(postmaster, DATABASE_NAME)
        atexit.register(self.close)
        return self

    def close(self) -> None:
        """Let go of the server; the last handle of all processes stops it. Idempotent."""
        users_fd, self._users_fd, self._url = self._users_fd, None, None
        if users_fd is None:
            return
        atexit.unregister(self.close)
        if os.getpid() != self._owner_pid:
            os.close(users_fd)  # a forked child: the lock stays with the parent's open file
            return
        with self._lifecycle_lock():
            self._release_and_stop_if_last(users_fd)

    def __enter__(self) -> EmbeddedPostgres:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- lifecycle, always under the lifecycle lock --------------------------------------------

    @contextlib.contextmanager
    def _lifecycle_lock(self) -> Iterator[None]:
        """Serialise the start, join and stop decisions of every process on this data dir."""
        fd = os.open(self.pgdata, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _release_and_stop_if_last(self, users_fd: int) -> None:
        """Drop our shared users lock; stop the server when no other handle holds one."""
        try:
            try:
                fcntl.flock(users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.debug("embedded postgres in %s still in use by others", self.pgdata)
                return
            self._stop()
        finally:
            os.close(users_fd)

    def _ensure_running(self) -> _Postmaster:
        """Return the running server, initialising and starting it first when needed."""
        postmaster = self._wait_for_running_server()
        if postmaster is not None:
            return postmaster
        system_user = _system_user()
        if system_user is not None:
            _prepare_for_system_user(self.pgdata, system_user)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(system_user)
        self._start(system_user)
        postmaster = self._wait_for_running_server()
        if postmaster is None:
            raise EmbeddedPostgresError(f"postgres did not start; see {self.log_file}")
        return postmaster

    def _initdb(self, system_user: str | None) -> None:
        """Create the cluster: trust auth (only its owner reaches the socket), UTF-8, C locale."""
        if system_user is not None:
            _chown_to(self.pgdata, system_user)
        log.info("initialising embedded postgres in %s", self.pgdata)
        _run_pg(
            ["initdb", "-D", str(self.pgdata), "-U", SUPERUSER, "--auth=trust",
             "--encoding=UTF8", "--locale=C", *([] if self.durable else ["--no-sync"])],
            system_user, timeout=START_TIMEOUT_S,
        )

    def _start(self, system_user: str | None) -> None:
        """Start the server on a unix socket only, in its own session so a Ctrl-C here spares it."""
        socket_dir = self._socket_dir(system_user)
        server_options = f"-c listen_addresses='' -p {SOCKET_PORT} -k {shlex.quote(str(socket_dir))}"
        if not self.durable:
            server_options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        log.info("starting embedded postgres in %s", self.pgdata)
        _run_pg(
            ["pg_ctl", "-D", str(self.pgdata), "-l", str(self.log_file), "-w",
             "-t", str(START_TIMEOUT_S), "-o", server_options, "start"],
            system_user, timeout=START_TIMEOUT_S + 10,
        )

    def _stop(self) -> None:
        """Stop the server now (fast mode: open sessions are cut), if it runs, and wait until it is gone."""
        postmaster = _read_postmaster(self.pgdata)
        if postmaster is None:
            return
        log.info("stopping embedded postgres in %s", self.pgdata)
        _run_pg(
            ["pg_ctl", "-D", str(self.pgdata), "-w", "-t", str(STOP_TIMEOUT_S), "-m", "fast", "stop"],
            _system_user(), timeout=STOP_TIMEOUT_S + 10,
        )
        # pg_ctl returns once postmaster.pid is gone, a moment before the process itself exits.
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while postmaster.pid and _is_postgres(postmaster.pid) and time.monotonic() < deadline:
            time.sleep(0.01)

    def _wait_for_running_server(self) -> _Postmaster | None:
        """The running server once it accepts connections; None when none runs."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            postmaster = _read_postmaster(self.pgdata)
            if postmaster is None or postmaster.status == "ready":
                return postmaster
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"postgres in {self.pgdata} stayed {postmaster.status!r}; see {self.log_file}")
            time.sleep(0.05)

    def _socket_dir(self, system_user: str | None) -> Path:
        """pgdata when the socket path fits in sun_path, else a private folder under the temp dir."""
        if len(str(self.pgdata / f".s.PGSQL.{SOCKET_PORT}")) <= MAX_SOCKET_PATH:
            return self.pgdata
        digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:16]
        folder = Path(tempfile.gettempdir()) / f"sira-pg-{digest}"
        folder.mkdir(mode=0o700, exist_ok=True)
        if system_user is not None:
            _chown_to(folder, system_user)
        expected_uid = _uid_of(system_user)
        if folder.stat().st_uid != expected_uid:
            raise EmbeddedPostgresError(f"socket folder {folder} belongs to another user")
        return folder

    def _ensure_database(self, postmaster: _Postmaster) -> None:
        """Create the `sira` database unless it exists (we hold the lifecycle lock: no race)."""
        admin_url = _socket_url(postmaster, "postgres")
        with connect(admin_url, "embedded-postgres", connect_timeout_s=10) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)).fetchone()
            if found is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE_NAME)))
                log.info("created database %s", DATABASE_NAME)


def _socket_url(postmaster: _Postmaster, dbname: str) -> str:
    """A libpq URL to dbname through the server's unix socket: the folder, percent-encoded, is the host."""
    host, database = quote(postmaster.socket_dir, safe=""), quote(dbname, safe="")
    return f"postgresql://{SUPERUSER}@{host}:{postmaster.port}/{database}"


def _read_postmaster(pgdata: Path) -> _Postmaster | None:
    """The server that pgdata/postmaster.pid names, or None when that file is absent or stale."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None
    if len(lines) < 5 or not lines[0].strip().isdigit():
        return _Postmaster(pid=0, port=0, socket_dir="", status="starting")  # being written
    pid = int(lines[0])
    if not _is_postgres(pid):
        return None
    status = lines[7].strip() if len(lines) > 7 else "starting"
    socket_dir = lines[4].strip().split(",")[0]
    return _Postmaster(pid=pid, port=int(lines[3]), socket_dir=socket_dir, status=status)


def _is_postgres(pid: int) -> bool:
    """Whether pid is a live postgres (not a zombie, and not a program that got an old server's pid)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return not Path("/proc/self").exists() and process_exists(pid)
    name, state = stat_line[stat_line.index("(") + 1:stat_line.rindex(")")], stat_line[stat_line.rindex(")") + 2]
    return name == "postgres" and state not in "ZXx"


def _run_pg(args: list[str], system_user: str | None, timeout: float) -> None:
    """Run one of pgserver's PostgreSQL programs; raise EmbeddedPostgresError with its output on failure."""
    command = [str(_pgserver_bin() / args[0]), *args[1:]]
    # As root, drop root's groups too: with gid 0 the server would be denied root-group folders.
    identity = {} if system_user is None else {
        "user": system_user, "group": _gid_of(system_user), "extra_groups": [], "cwd": "/"}
    # Output goes to a file, not a pipe: the server that pg_ctl leaves running must not hold our pipe.
    with tempfile.TemporaryFile() as output:
        try:
            subprocess.run(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                           timeout=timeout, check=True, start_new_session=True, **identity)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            output.seek(0)
            text = output.read().decode(errors="replace").strip()
            raise EmbeddedPostgresError(f"{args[0]} failed ({err}): {text[-2000:]}") from None


def _pgserver_bin() -> Path:
    """The folder of the PostgreSQL programs that the pgserver wheel ships."""
    with warnings.catch_warnings():
        # Importing pgserver warns when XDG_RUNTIME_DIR is unset, for a lock folder we do not use.
        warnings.simplefilter("ignore")
        from pgserver._commands import POSTGRES_BIN_PATH
    return POSTGRES_BIN_PATH


def _system_user() -> str | None:
    """The user the server runs as when we are root; None to run it as ourselves."""
    return SYSTEM_USER_WHEN_ROOT if os.geteuid() == 0 else None


def _uid_of(system_user: str | None) -> int:
    """The uid that owns the server's files."""
    import pwd

    return pwd.getpwnam(system_user).pw_uid if system_user is not None else os.geteuid()


def _gid_of(system_user: str) -> int:
    """The primary group of the server's user."""
    import pwd

    return pwd.getpwnam(system_user).pw_gid


def _chown_to(path: Path, user: str) -> None:
    """Give path to user (and its group)."""
    import pwd

    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def _prepare_for_system_user(pgdata: Path, system_user: str) -> None:
    """As root: create the server's user and let it reach its binaries and its data folder."""
    bin_dir = _pgserver_bin()
    from pgserver.utils import ensure_folder_permissions, ensure_user_exists

    ensure_user_exists(system_user)
    read_execute = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
    ensure_folder_permissions(bin_dir, read_execute)
    ensure_folder_permissions(bin_dir.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
    _grant_traversal(bin_dir.parent)
    _grant_traversal(pgdata.parent)


def _grant_traversal(path: Path) -> None:
    """Add the search bit for others to path and its parents (pgserver adds read too; we need less)."""
    for folder in (path, *path.parents):
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.info("adding o+x to %s so the postgres user can reach its files", folder)
            folder.chmod(mode | stat.S_IXOTH)
