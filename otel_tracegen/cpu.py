"""How much CPU this process may use, and how many torch threads to run on it.

torch starts one OpenMP thread per core of the host. Two things make that wrong:

- **Limits it does not see.** A CPU affinity mask (``taskset``, ``docker --cpuset-cpus``) or a cgroup quota
  (``docker --cpus``, Kubernetes limits) allows fewer cores than the host has; threads beyond them are throttled.
  :func:`cpu_budget` reads both and takes the smaller: the affinity mask, and the CPU quota of this process's
  cgroup and its ancestors (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), rounded down, at
  least 1. ``OTEL_TRACEGEN_CPUS`` overrides it.
- **A busy neighbour.** OpenMP threads spin while they wait for each other; beside another busy process, two
  threads on two cores ran the README's 20-trace command in 64 s against 21 s with one (docs/generation.md). At
  start, :class:`CpuWatch` measures what other processes use (the machine's busy time from ``/proc/stat`` less this
  process's own), and :func:`choose_threads` leaves their cores to them.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .report import UserError

ENV = "OTEL_TRACEGEN_CPUS"


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs this process may use (``cpus``), and what limited it (``source``: ``affinity``, ``cgroup quota``,
    ``OTEL_TRACEGEN_CPUS`` or ``flag``)."""

    cpus: int
    source: str


def cpu_budget(*, environ: dict | None = None, proc: str | Path = "/proc", cgroup_root: str | Path = "/sys/fs/cgroup",
               affinity: int | None = None) -> CpuBudget:
    """The CPUs this process may use: ``OTEL_TRACEGEN_CPUS`` when set, else the smaller of the affinity mask and the
    cgroup quota (rounded down, at least 1). The keyword arguments are for tests (fake files)."""
    environ = os.environ if environ is None else environ
    if (value := environ.get(ENV, "").strip()) != "":
        try:
            cpus = int(value)
        except ValueError:
            cpus = 0
        if cpus < 1:
            raise UserError(f"{ENV}={value!r}: give a whole number of CPUs, 1 or more")
        return CpuBudget(cpus, ENV)
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            affinity = os.cpu_count() or 1
    quota = cgroup_quota(proc=proc, cgroup_root=cgroup_root)
    if quota is not None and max(1, math.floor(quota)) < affinity:
        return CpuBudget(max(1, math.floor(quota)), "cgroup quota")
    return CpuBudget(max(1, affinity), "affinity")


def cgroup_quota(*, proc: str | Path = "/proc", cgroup_root: str | Path = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in CPUs (the smallest along its ancestors), None when there is none
    or it cannot be read."""
    root = Path(cgroup_root)
    try:
        lines = Path(proc, "self", "cgroup").read_text().splitlines()
    except OSError:
        lines = []
    quotas: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: one unified hierarchy
            quotas += [q for d in _ancestors(root, path) if (q := _v2_quota(d / "cpu.max")) is not None]
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own hierarchy
            for mount in (root / controllers, root / "cpu,cpuacct", root / "cpu"):
                if mount.is_dir():
                    quotas += [q for d in _ancestors(mount, path) if (q := _v1_quota(d)) is not None]
                    break
    return min(quotas) if quotas else None


def _ancestors(mount: Path, path: str) -> list[Path]:
    """``mount/path`` and its parents up to ``mount``; ``mount`` alone when the path is not visible there (a
    container's cgroup namespace shows its own cgroup as the root)."""
    here = mount / path.strip("/")
    if not here.is_dir():
        return [mount]
    out = [here]
    while here != mount and mount in here.parents:
        here = here.parent
        out.append(here)
    return out


def _v2_quota(path: Path) -> float | None:
    try:
        quota, _, period = path.read_text().strip().partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100_000)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


class CpuWatch:
    """What other processes keep busy, from the moment it is made: the machine's busy time (``/proc/stat``) less this
    process's own (``/proc/self/stat``), in cores. Made when a command starts, read once torch is imported."""

    def __init__(self, proc: str | Path = "/proc") -> None:
        self._proc = Path(proc)
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            cpu = self._proc.joinpath("stat").read_text().splitlines()[0].split()[1:]
            own = self._proc.joinpath("self", "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        ticks = [int(x) for x in cpu[:8]]
        busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
        mine = int(own[11]) + int(own[12])  # utime, stime (fields 14, 15)
        return time.monotonic(), busy / _HZ, mine / _HZ

    def others_busy(self, min_window_s: float = 0.3) -> float | None:
        """Cores other processes kept busy since this watch was made (waiting until ``min_window_s`` has passed);
        None where ``/proc`` cannot tell."""
        if self._start is None:
            return None
        left = self._start[0] + min_window_s - time.monotonic()
        if left > 0:
            time.sleep(left)
        end = self._sample()
        if end is None:
            return None
        elapsed = end[0] - self._start[0]
        return max(0.0, ((end[1] - self._start[1]) - (end[2] - self._start[2])) / elapsed)


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ThreadChoice:
    """How many torch threads a command runs, and why (for its closing summary)."""

    threads: int
    budget: CpuBudget
    others_busy: float | None = None
    requested: bool = False

    def describe(self) -> str:
        why = "as asked" if self.requested else f"of {self.budget.cpus} CPU(s) ({self.budget.source})"
        if self.others_busy is not None and not self.requested:
            why += f", {self.others_busy:.1f} busy elsewhere"
        return f"{self.threads} torch thread(s) {why}"


def choose_threads(requested: int | None = None, watch: CpuWatch | None = None, budget: CpuBudget | None = None,
                   cores: int | None = None) -> ThreadChoice:
    """Torch threads for a command: ``requested`` when given (``--threads``); else the budget's CPUs, and no more
    than the machine's ``cores`` (default: ``os.cpu_count()``) leave free of what other processes keep busy
    (``watch``: measured since the command started), at least 1."""
    budget = budget if budget is not None else cpu_budget()
    if requested:
        return ThreadChoice(requested, budget, requested=True)
    busy = watch.others_busy() if watch is not None else None
    threads = budget.cpus
    if busy is not None:
        # Spinning OpenMP threads beside a busy neighbour cost more than they give
        # (2 threads beside one busy process on 2 cores: 64 s for the README's command, 1 thread: 21 s).
        free = (cores or os.cpu_count() or budget.cpus) - busy
        threads = min(threads, max(1, math.floor(free + 0.5)))  # a neighbour on over half a core takes it
    return ThreadChoice(threads, budget, busy)


def apply_threads(choice: ThreadChoice) -> ThreadChoice:
    """Run torch with ``choice.threads`` threads (torch must be importable)."""
    import torch

    torch.set_num_threads(choice.threads)
    return choice


# --- once per process: the command's choice -------------------------------------------------------------------

_WATCH: CpuWatch | None = None
_CHOICE: ThreadChoice | None = None


def watch_from_start() -> None:
    """Start measuring what other processes use (a command calls this first, before importing torch)."""
    global _WATCH
    if _WATCH is None:
        _WATCH = CpuWatch()


def configure_torch(requested: int | None = None) -> ThreadChoice:
    """Set torch's threads for this process once: ``requested`` (``--threads``, or a worker's share) when given,
    else :func:`choose_threads` with the watch started by :func:`watch_from_start`. Later calls without
    ``requested`` keep the first choice (the model loader calls this for every command that runs torch)."""
    global _CHOICE
    if _CHOICE is not None and not requested:
        return _CHOICE
    _CHOICE = apply_threads(choose_threads(requested, _WATCH))
    return _CHOICE


def configure_for_command() -> ThreadChoice | None:
    """:func:`configure_torch` when this process runs an ``otel-tracegen`` command (one called
    :func:`watch_from_start`); nothing for a program that only imports the package: its threads are its own."""
    return configure_torch() if _WATCH is not None else None


def configured() -> ThreadChoice | None:
    """What :func:`configure_torch` chose in this process (None before it ran)."""
    return _CHOICE
