"""What SIRA depends on (Postgres, the model store), as the supervisor last saw it; shown by /readyz.

The process that observes a dependency keeps a `DependencyBoard`: `mark_up(name)` and
`mark_down(name, error)` after each attempt. A change of state (and only a change: a dependency
that stays down through many retries says so once) gives

- one log line: ERROR when it goes down, with the error; INFO when it is back, with how long it was away;
- the gauge ``sira_dependency_up{name}`` (1 or 0), from the supervisor sidecar only;
- the state file ``$SIRA_DATA_DIR/dependencies.json`` (``DEPENDENCIES_FILE``), rewritten atomically,
  which every worker's /readyz reads (``read_dependencies``): a small file read when /readyz is
  asked, nothing on the request path.

The master observes first (its model sync before the fork) and writes the file; the supervisor
sidecar then takes the board over (``take_over``): it starts from the file, so a state the master
logged is not logged again, and publishes the gauges. Names: ``POSTGRES``, ``MODEL_STORE``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

from app.telemetry.metrics import set_dependency_up
from conf.datadir import write_atomically

log = logging.getLogger("sira.dependencies")

DEPENDENCIES_FILE = "dependencies.json"
POSTGRES = "postgres"
MODEL_STORE = "model_store"
MAX_ERROR_CHARS = 300


@dataclasses.dataclass
class DependencyState:
    """One dependency: up or not, since when (unix time), and the last error seen while it was down."""

    up: bool
    since: float
    last_error: str | None = None


class DependencyBoard:
    """The observed state of each dependency; one writer (the observing process). Not thread safe."""

    def __init__(self, path: str | None, publish_gauges: bool = False):
        self.path = path
        self.publish_gauges = publish_gauges
        self.states: dict[str, DependencyState] = {}

    def take_over(self) -> None:
        """In the supervisor sidecar: continue from the file the master (or a previous supervisor) left,
        and publish the gauges from now on."""
        self.states = read_states(self.path) if self.path else {}
        self.publish_gauges = True
        for name, state in self.states.items():
            self._set_gauge(name, state.up)

    def is_up(self, name: str) -> bool | None:
        """True, False, or None when never observed."""
        state = self.states.get(name)
        return None if state is None else state.up

    def mark_up(self, name: str) -> bool:
        """The dependency answered; True when that is a change."""
        state = self.states.get(name)
        if state is not None and state.up:
            return False
        now = time.time()
        self.states[name] = DependencyState(up=True, since=now)
        if state is not None:
            log.info("%s is reachable again (after %.0fs away)", name, now - state.since)
        self._changed(name)
        return True

    def mark_down(self, name: str, error: str) -> bool:
        """The dependency failed with error (one line); True when that is a change."""
        error = error[:MAX_ERROR_CHARS]
        state = self.states.get(name)
        if state is not None and not state.up:
            if state.last_error != error:  # still down: the file keeps the latest error, no log line
                state.last_error = error
                self._write()
            return False
        self.states[name] = DependencyState(up=False, since=time.time(), last_error=error)
        log.error("%s is unreachable: %s", name, error)
        self._changed(name)
        return True

    def _changed(self, name: str) -> None:
        self._set_gauge(name, self.states[name].up)
        self._write()

    def _set_gauge(self, name: str, up: bool) -> None:
        if self.publish_gauges:
            set_dependency_up(name, up)

    def _write(self) -> None:
        if self.path is None:
            return
        body = {name: dataclasses.asdict(state) for name, state in sorted(self.states.items())}
        try:
            write_atomically(self.path, json.dumps(body, sort_keys=True))  # readers see the old or the new file
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc)


def read_states(path: str) -> dict[str, DependencyState]:
    """The states in the file; {} when it is missing or unreadable (nothing observed yet)."""
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
        return {str(name): DependencyState(up=bool(item["up"]), since=float(item["since"]),
                                           last_error=item.get("last_error"))
                for name, item in raw.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}


def read_dependencies(path: str | None) -> dict[str, dict]:
    """For /readyz: name -> {"up", "since" (ISO 8601 UTC), "last_error"}."""
    if not path:
        return {}
    return {name: {"up": state.up, "since": iso_utc(state.since), "last_error": state.last_error}
            for name, state in sorted(read_states(path).items())}


def iso_utc(unix_time: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(unix_time)) + f".{int(unix_time % 1 * 1000):03d}Z"
