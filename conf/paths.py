"""Where things live under $SIRA_DATA_DIR, in one place for the processes, the CLI and ops."""

from __future__ import annotations

import os

MASTER_PIDFILE = "sira.pid"
SUPERVISOR_PIDFILE = "supervisor.pid"
WRITER_PIDFILE = "writer.pid"
STORE_DIR = "store"
MODELS_DIR = "models"
PG_DIR = "pg"


def data_path(data_dir: str, *parts: str) -> str:
    return os.path.join(os.path.abspath(data_dir), *parts)
