"""Whether a process is alive, by pid: the one check the writer's spool, the supervisor and the
embedded Postgres share."""

from __future__ import annotations

import os


def process_exists(pid: int) -> bool:
    """Whether a process with this pid exists (ours or another user's); signal 0 only checks."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
