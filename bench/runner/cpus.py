"""Which CPUs the server and the load generator get: apart where there are enough cores, else shared."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuPlan:
    """CPU lists for the server and the load generator; None means not pinned (all CPUs)."""

    server: tuple[int, ...] | None
    load: tuple[int, ...] | None
    available: tuple[int, ...]

    @property
    def server_cpus(self) -> int:
        return len(self.server or self.available)

    @property
    def load_cpus(self) -> int:
        return len(self.load or self.available)

    def describe(self) -> str:
        if self.server is None:
            return (f"not pinned: server and load generator share the same {len(self.available)} CPUs "
                    f"({cpu_list(self.available)})")
        return (f"pinned with taskset: server on CPUs {cpu_list(self.server)}, "
                f"load generator on CPUs {cpu_list(self.load)}")


def plan_cpus(mode: str, available: tuple[int, ...] | None = None) -> CpuPlan:
    """mode 'on' pins apart (server gets the first half, rounded up), 'off' never, 'auto' from 4 CPUs.

    On two CPUs, 'auto' leaves them shared: pinning gives the server one CPU for its workers,
    supervisor, writer and Postgres, and the figures then measure that core, not the server.
    """
    cpus = tuple(sorted(available if available is not None else os.sched_getaffinity(0)))
    pin = mode == "on" or (mode == "auto" and len(cpus) >= 4)
    if not pin or len(cpus) < 2:
        return CpuPlan(None, None, cpus)
    half = (len(cpus) + 1) // 2
    return CpuPlan(cpus[:half], cpus[half:], cpus)


def pinned(command: list[str], cpus: tuple[int, ...] | None) -> list[str]:
    """command run under `taskset -c CPUS` (the children it forks inherit the mask); as is when unpinned."""
    if cpus is None:
        return command
    taskset = shutil.which("taskset")
    if taskset is None:
        raise RuntimeError("pinning asked for but taskset is not installed (util-linux); use --pin off")
    return [taskset, "-c", cpu_list(cpus), *command]


def cpu_list(cpus: tuple[int, ...]) -> str:
    return ",".join(str(cpu) for cpu in cpus)
