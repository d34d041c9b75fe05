"""The prediction log's day partitions, made ahead of the rows (the SQL is migrations/004).

Every start (workers/bootstrap.py) and every ``ENSURE_EVERY_S`` in the supervisor: yesterday's,
today's and the next ``DAYS_AHEAD`` days' partitions are made if missing, under an advisory lock in
the function, so pods starting together never race. Should every pod be down for longer than
that, rows still land, in the default partition, and move to their day's partition when it is
made.
"""

from __future__ import annotations

import psycopg

DAYS_AHEAD = 3
ENSURE_EVERY_S = 3600.0
ENSURE_SQL = "SELECT sira_ensure_prediction_partitions(%s)"


def ensure_partitions(conn: psycopg.Connection, days_ahead: int = DAYS_AHEAD) -> int:
    """Make the missing partitions of yesterday to ``days_ahead`` days from now (UTC); how many were made."""
    return conn.execute(ENSURE_SQL, (days_ahead,)).fetchone()[0]
