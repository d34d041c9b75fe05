"""gunicorn's arbiter, plus the master's own children (supervisor, writer) and SIGHUP as a model re-sync.

gunicorn's `Arbiter` keeps the HTTP workers; `SiraArbiter` adds *sidecars*: long-lived child
processes forked by the master, each with a pidfile in the data dir, restarted with exponential
backoff when they die (their death never stops the HTTP workers), and stopped after the workers on
shutdown, so that the writer drains what the workers appended last.

SIGHUP does not reload gunicorn or restart workers: the master re-reads the secret files and, when
they are all usable, forwards SIGHUP to the workers, which re-read them too (workers/credentials.py);
it is forwarded to the sidecars that asked for it (the supervisor re-syncs models).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable

from gunicorn import util
from gunicorn.arbiter import Arbiter

from conf.datadir import write_atomically
from conf.logs import set_process_role
from workers.metrics import mark_process_dead
from workers.processes import describe_exit, die_with_parent

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # a sidecar that ran this long restarts with the first delay again
STOP_TIMEOUT_S = 30.0       # a sidecar's stop (the writer's drain and handoff), then SIGKILL


@dataclasses.dataclass
class Sidecar:
    """One child process of the master. `run` is called in the child and returns its exit code."""

    name: str
    run: Callable[[], int]
    pidfile: str
    forward_hup: bool = False
    pid: int = 0
    started_at: float = 0.0
    restarts: int = 0
    next_start_at: float = 0.0
    backoff_s: float = BACKOFF_FIRST_S


def write_pidfile(path: str, pid: int) -> None:
    """Atomically, so a reader never sees a half-written pid."""
    write_atomically(path, f"{pid}\n", 0o644)


def remove_pidfile(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def exit_code(status: int | None) -> int | None:
    """A wait status as subprocess's exit code (negative: the signal); None stays None."""
    return None if status is None else os.waitstatus_to_exitcode(status)


class SiraArbiter(Arbiter):
    """The master loop of `sira serve`: gunicorn's workers plus SIRA's sidecars."""

    def __init__(self, app, sidecars: list[Sidecar]):
        super().__init__(app)
        self.sidecars = sidecars

    # lifecycle -----------------------------------------------------------------------------------

    def start(self):
        super().start()
        for sidecar in self.sidecars:
            self.spawn_sidecar(sidecar)

    def manage_workers(self):
        super().manage_workers()
        self.manage_sidecars()

    def reap_workers(self):
        # Claim our sidecars first with targeted waitpids; gunicorn's waitpid(-1) would reap them
        # as unknown children and their exit status would be lost.
        for sidecar in self.sidecars:
            self.reap_sidecar(sidecar)
        super().reap_workers()

    def stop(self, graceful=True):
        super().stop(graceful)  # HTTP workers first: nothing appends to the rings after this
        self.stop_sidecars(signal.SIGTERM if graceful else signal.SIGQUIT)

    def handle_hup(self):
        """Secret files re-read here, then in the workers (if they were usable); SIGHUP to the sidecars that want it.

        Workers keep serving: they swap their keys in their event loop, nothing restarts.
        """
        reload_secrets = getattr(self.app, "reload_secrets", None)
        if reload_secrets is not None and reload_secrets():
            self.kill_workers(signal.SIGHUP)
        targets = [s for s in self.sidecars if s.forward_hup and s.pid]
        self.log.info("SIGHUP: asking %s to re-sync", ", ".join(s.name for s in targets) or "nobody")
        for sidecar in targets:
            self.signal_sidecar(sidecar, signal.SIGHUP)

    def handle_usr2(self):
        """gunicorn's binary upgrade (a new master exec'd beside this one) is refused.

        The new master would need this master's data dir lock, rings and sidecars, which belong to
        one master at a time (workers/instance.py). Upgrade by starting a new instance (a new pod, or
        SIGTERM then `sira serve`): the successor drains what this one left.
        """
        self.log.warning("SIGUSR2 ignored: sira serve does not re-exec in place (one master per data "
                         "dir); stop it with SIGTERM and start the new version")

    # sidecars ------------------------------------------------------------------------------------

    def spawn_sidecar(self, sidecar: Sidecar) -> None:
        master_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            self.run_sidecar_child(sidecar, master_pid)  # never returns
        sidecar.pid = pid
        sidecar.started_at = time.monotonic()
        write_pidfile(sidecar.pidfile, pid)
        self.log.info("Started %s (pid: %s)", sidecar.name, pid)

    def run_sidecar_child(self, sidecar: Sidecar, master_pid: int) -> None:
        """In the forked child: reset the master's signal handling, run, and leave with os._exit.

        os._exit, because the master's stack (gunicorn, the CLI, the embedded database) must not
        unwind in a child.
        """
        code = 1
        try:
            die_with_parent(master_pid)  # SIGKILLed with the master: no orphan beside its successor
            for sig in self.SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            for sock in self.LISTENERS:
                sock.close()
            util._setproctitle(f"{sidecar.name} [{self.proc_name}]")
            set_process_role(sidecar.name)  # the `process` field of its log lines
            code = sidecar.run()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # the child must never fall back into the master's loop
            self.log.exception("%s crashed", sidecar.name)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def reap_sidecar(self, sidecar: Sidecar) -> None:
        if not sidecar.pid:
            return
        try:
            pid, status = os.waitpid(sidecar.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = sidecar.pid, None  # reaped by gunicorn's waitpid(-1) in a race
        if pid == 0:
            return
        self.sidecar_died(sidecar, status)

    def sidecar_died(self, sidecar: Sidecar, status: int | None) -> None:
        ran_for = time.monotonic() - sidecar.started_at
        if ran_for >= STABLE_AFTER_S:
            sidecar.backoff_s = BACKOFF_FIRST_S
        mark_process_dead(sidecar.pid)  # its live gauges (queue depth...) leave /metrics
        sidecar.pid = 0
        sidecar.restarts += 1
        sidecar.next_start_at = time.monotonic() + sidecar.backoff_s
        remove_pidfile(sidecar.pidfile)
        self.log.error("%s %s after %.1fs; restarting in %.1fs", sidecar.name, describe_exit(exit_code(status)),
                       ran_for, sidecar.backoff_s)
        sidecar.backoff_s = min(sidecar.backoff_s * 2, BACKOFF_MAX_S)

    def manage_sidecars(self) -> None:
        now = time.monotonic()
        for sidecar in self.sidecars:
            if not sidecar.pid and now >= sidecar.next_start_at:
                self.spawn_sidecar(sidecar)

    def signal_sidecar(self, sidecar: Sidecar, sig: int) -> None:
        try:
            os.kill(sidecar.pid, sig)
        except ProcessLookupError:
            pass

    def stop_sidecars(self, sig: int) -> None:
        """Signal every sidecar, wait for each (the writer drains first), SIGKILL what is left."""
        running = [s for s in self.sidecars if s.pid]
        for sidecar in running:
            self.signal_sidecar(sidecar, sig)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for sidecar in running:
            while sidecar.pid and time.monotonic() < deadline:
                try:
                    pid, status = os.waitpid(sidecar.pid, os.WNOHANG)
                except ChildProcessError:
                    pid, status = sidecar.pid, None
                if pid:
                    self.log.info("%s stopped: %s", sidecar.name, describe_exit(exit_code(status)))
                    sidecar.pid = 0
                else:
                    time.sleep(0.05)
            if sidecar.pid:
                self.log.error("%s did not stop in %.0fs: killing it", sidecar.name, STOP_TIMEOUT_S)
                self.signal_sidecar(sidecar, signal.SIGKILL)
                try:
                    os.waitpid(sidecar.pid, 0)
                except ChildProcessError:
                    pass  # already reaped
                sidecar.pid = 0
            remove_pidfile(sidecar.pidfile)
        # Nothing respawns them now: the arbiter is leaving.
        self.sidecars = []
