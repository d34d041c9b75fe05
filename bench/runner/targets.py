"""The servers under load: a real `sira serve`, or one given by URL, and the two peers on the same model.

Every local server listens on a free port of 127.0.0.1, runs in its own session (process group), is
pinned where the CPU plan says, and is stopped (SIGTERM, then SIGKILL of the group) by `stop()`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from bench.runner.cpus import pinned
from bench.worker_classes import CLASSES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH_JWT_SECRET = "bench-secret-0123456789abcdef-0123456789"
PEERS = ("fastapi", "bare_falcon")
EXTRA_PEERS = ("fastapi_h11",)  # FastAPI on uvicorn's pure-Python h11 parser (plain `pip install uvicorn`)
# The runner's roles are never throttled (sira_service already is not, by default).
UNLIMITED_ROLES = "sira_service=unlimited,fraud_analyst=unlimited,ml_ops=unlimited,pay_admin=unlimited"


@dataclass
class Target:
    """A server to load: its base URL, a sira_service token (None for the peers) and how to stop it."""

    name: str
    url: str
    token: str | None = None
    workers: int | None = None
    process: subprocess.Popen | None = None
    data_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)  # role -> token, for the locust mix

    def worker_pids(self) -> list[int]:
        """The processes that serve HTTP: the master's children less SIRA's sidecars."""
        return self.processes()["workers"]

    def pid_in_file(self, *path: str) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError), \
                open(os.path.join(self.data_dir or "", *path), encoding="ascii") as handle:
            return int(handle.readline().strip())
        return None

    def processes(self) -> dict[str, list[int]]:
        """The server's processes by job: master, workers, and for SIRA its sidecars and embedded Postgres."""
        if self.process is None:
            return {"workers": []}
        master = self.process.pid
        sidecars = {name: self.pid_in_file(f"{name}.pid") for name in ("supervisor", "writer")}
        groups = {"master": [master],
                  "workers": [pid for pid in children(master) if pid not in sidecars.values()]}
        for name, pid in sidecars.items():
            if pid is not None:
                groups[name] = process_tree(pid)
        postmaster = self.pid_in_file("pg", "postmaster.pid")
        if postmaster is not None:
            groups["postgres"] = process_tree(postmaster)
        return groups

    def cpu_by_job(self) -> dict[str, float] | None:
        """CPU seconds (user + system) each job's processes have used so far; None for --url."""
        if self.process is None:
            return None
        return {job: sum(process_cpu_seconds(pid) for pid in pids) for job, pids in self.processes().items()}

    def stop(self) -> None:
        """SIGTERM to the master (SIRA drains its rings), then SIGKILL to whatever of the group is left."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as handle:
            return [int(child) for child in handle.read().split()]
    except OSError:
        return []


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children(current))
    return tree


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one live process (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sira_env(data_dir: str, port: int, workers: int, secret: str) -> dict[str, str]:
    """This interpreter's environment without the caller's SIRA settings, plus the bench server's."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SIRA_", "JWT_", "CACHE_", "MODEL_", "INTERNAL_SERVICE", "S3_", "DATABASE_URL"))}
    env.update(PYTHONPATH=REPO, SIRA_DATA_DIR=data_dir, SIRA_BIND=f"127.0.0.1:{port}",
               SIRA_WORKERS=str(workers), JWT_SECRET=secret, LOG_LEVEL="warning",
               SIRA_RATE_LIMITS=UNLIMITED_ROLES)
    return env


def mint(role: str, secret: str) -> str:
    from app.auth.keys import mint_token

    return mint_token(role=role, subject=f"bench-{role}", ttl_s=6 * 3600, secret=secret, kid="default")


def start_sira(data_dir: str, workers: int, cpus: tuple[int, ...] | None, secret: str = BENCH_JWT_SECRET,
               timeout: float = 180.0) -> Target:
    """`sira serve` with its own data dir (embedded Postgres, demo model), ready when /readyz says so."""
    os.makedirs(data_dir, exist_ok=True)
    port = free_port()
    env = sira_env(data_dir, port, workers, secret)
    with open(os.path.join(data_dir, "server.log"), "ab") as log:
        process = subprocess.Popen(pinned([sys.executable, "-m", "workers.cli", "serve"], cpus), env=env, cwd=REPO,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    target = Target("sira", f"http://127.0.0.1:{port}", mint("sira_service", secret), workers, process, data_dir, env,
                    {role: mint(role, secret) for role in ("sira_service", "fraud_analyst", "ml_ops")})
    try:
        wait_ready(target, "/readyz", timeout)
    except (RuntimeError, TimeoutError) as exc:
        target.stop()
        raise RuntimeError(f"{exc}; end of {data_dir}/server.log:\n{log_tail(data_dir)}") from None
    except BaseException:
        target.stop()
        raise
    return target


def log_tail(data_dir: str, lines: int = 15) -> str:
    try:
        with open(os.path.join(data_dir, "server.log"), encoding="utf-8", errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def external_sira(url: str, token: str, tokens: dict[str, str] | None = None) -> Target:
    """A server someone else started (--url, --token): loaded, never started or stopped here."""
    return Target("sira", url.rstrip("/"), token, tokens=tokens or {"sira_service": token})


def peer_command(name: str, workers: int, port: int) -> list[str]:
    """FastAPI on uvicorn (its default loop and parser: uvloop and httptools when installed, as with
    uvicorn[standard]), or the bare Falcon app on gunicorn's asgi worker; access logs off in both."""
    if name in ("fastapi", "fastapi_h11"):
        parser = ["--http", "h11"] if name == "fastapi_h11" else []
        return [sys.executable, "-m", "uvicorn", "bench.peers.fastapi_app:app", "--host", "127.0.0.1",
                "--port", str(port), "--workers", str(workers), "--log-level", "warning", "--no-access-log", *parser]
    if name == "bare_falcon":
        return [sys.executable, "-m", "gunicorn", "--workers", str(workers), "--bind", f"127.0.0.1:{port}",
                "--log-level", "warning", *CLASSES["asgi (uvloop, C parser)"]]
    raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS + EXTRA_PEERS)}")


def start_peer(name: str, workers: int, cpus: tuple[int, ...] | None, log_dir: str,
               timeout: float = 60.0) -> Target:
    """A peer app serving the demo model on POST /v1/infer: no auth, cache or log."""
    port = free_port()
    with open(os.path.join(log_dir, f"{name}.log"), "ab") as log:
        process = subprocess.Popen(pinned(peer_command(name, workers, port), cpus), cwd=REPO,
                                   env={**os.environ, "PYTHONPATH": REPO}, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    target = Target(name, f"http://127.0.0.1:{port}", None, workers, process)
    try:
        wait_ready(target, "/v1/infer", timeout)
    except BaseException:
        target.stop()
        raise
    return target


def wait_ready(target: Target, path: str, timeout: float) -> None:
    """Until `path` answers 200 (or any HTTP status for the peers' POST-only route)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if target.process is not None and target.process.poll() is not None:
            raise RuntimeError(f"{target.name} exited with {target.process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(target.url + path, timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError:
            if target.name != "sira":
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{target.name} not ready on {target.url}{path} after {timeout:.0f}s")
