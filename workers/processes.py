"""Process checks the master's children share: whether a pid is alive (the writer's spool, the
supervisor, the embedded Postgres), dying with the parent (the sidecars), and how a child ended."""

from __future__ import annotations

import ctypes
import os
import signal


def process_exists(pid: int) -> bool:
    """Whether a process with this pid exists (ours or another user's); signal 0 only checks."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_exit(code: int | None) -> str:
    """How a child ended, from its exit code as subprocess gives it (negative: the signal that killed it).

    None is a child whose status someone else reaped. The master passes a wait status through
    ``os.waitstatus_to_exitcode``.
    """
    if code is None:
        return "exited (status reaped elsewhere)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}" + (" (perhaps out of memory)" if -code == signal.SIGKILL else "")
    return f"exited with code {code}"


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """In a freshly forked child: receive ``sig`` when the parent dies (Linux's PR_SET_PDEATHSIG).

    So a sidecar never outlives a master that was SIGKILLed (an orphan writer would drain the rings
    beside the next instance). If the parent died before the call, the child exits at once.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(1)
