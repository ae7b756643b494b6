"""The CPU budget (affinity, cgroup v1/v2 quotas, the override) and the threads commands choose from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from otel_tracegen.cpu import CpuBudget, CpuWatch, choose_threads, cpu_budget
from otel_tracegen.report import UserError

ROOT = Path(__file__).resolve().parents[1]


def fake(tmp_path: Path, cgroup: str, files: dict[str, str]) -> dict:
    """A /proc with ``self/cgroup`` and a cgroup mount with ``files`` (paths relative to the mount)."""
    proc, mount = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    for rel, text in files.items():
        (mount / rel).parent.mkdir(parents=True, exist_ok=True)
        (mount / rel).write_text(text)
    mount.mkdir(exist_ok=True)
    return {"proc": proc, "cgroup_root": mount, "environ": {}}


@pytest.mark.parametrize("cpu_max, affinity, expected", [
    ("max 100000\n", 4, CpuBudget(4, "affinity")),  # no quota
    ("150000 100000\n", 4, CpuBudget(1, "cgroup quota")),  # 1.5 CPUs: rounded down
    ("50000 100000\n", 4, CpuBudget(1, "cgroup quota")),  # half a CPU: at least one
    ("250000 100000\n", 2, CpuBudget(2, "affinity")),  # the affinity mask is the smaller
    ("400000 100000\n", 8, CpuBudget(4, "cgroup quota")),
    ("garbage\n", 3, CpuBudget(3, "affinity")),  # unreadable: no quota
])  # fmt: skip
def test_cgroup_v2_quota_against_the_affinity_mask(tmp_path, cpu_max, affinity, expected):
    paths = fake(tmp_path, "0::/kubepods/pod1/ctr\n", {"kubepods/pod1/ctr/cpu.max": cpu_max})
    assert cpu_budget(affinity=affinity, **paths) == expected


def test_cgroup_v2_a_parent_quota_applies_to_its_children(tmp_path):
    paths = fake(tmp_path, "0::/a/b\n", {"a/cpu.max": "200000 100000\n", "a/b/cpu.max": "max 100000\n"})
    assert cpu_budget(affinity=16, **paths) == CpuBudget(2, "cgroup quota")


def test_cgroup_v2_inside_a_namespace_reads_the_mount_root(tmp_path):
    # a container sees its own cgroup as "/" (or a path not under its mount): the root's cpu.max is its quota
    paths = fake(tmp_path, "0::/../../ctr\n", {"cpu.max": "100000 100000\n"})
    assert cpu_budget(affinity=2, **paths) == CpuBudget(1, "cgroup quota")


@pytest.mark.parametrize("quota, period, expected", [
    ("-1", "100000", CpuBudget(4, "affinity")),  # v1 "no limit"
    ("200000", "100000", CpuBudget(2, "cgroup quota")),
    ("30000", "100000", CpuBudget(1, "cgroup quota")),
])  # fmt: skip
def test_cgroup_v1_quota(tmp_path, quota, period, expected):
    paths = fake(tmp_path, "12:memory:/docker/x\n4:cpu,cpuacct:/docker/x\n",
                 {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": quota, "cpu,cpuacct/docker/x/cpu.cfs_period_us": period})
    assert cpu_budget(affinity=4, **paths) == expected


def test_missing_files_leave_the_affinity_mask(tmp_path):
    assert cpu_budget(affinity=3, proc=tmp_path / "none", cgroup_root=tmp_path / "none", environ={}) == \
        CpuBudget(3, "affinity")


def test_the_environment_overrides_and_a_bad_value_is_named(tmp_path):
    paths = fake(tmp_path, "0::/\n", {"cpu.max": "100000 100000\n"})
    assert cpu_budget(affinity=2, **{**paths, "environ": {"OTEL_TRACEGEN_CPUS": "3"}}) == \
        CpuBudget(3, "OTEL_TRACEGEN_CPUS")
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(UserError, match="OTEL_TRACEGEN_CPUS"):
            cpu_budget(affinity=2, **{**paths, "environ": {"OTEL_TRACEGEN_CPUS": bad}})


class Busy:
    def __init__(self, cores: float | None) -> None:
        self.cores = cores

    def others_busy(self) -> float | None:
        return self.cores


@pytest.mark.parametrize("busy, expected", [(None, 2), (0.0, 2), (0.4, 2), (0.8, 1), (1.0, 1), (1.9, 1), (3.5, 1)])
def test_threads_leave_a_busy_neighbours_core_to_it(busy, expected):
    choice = choose_threads(None, Busy(busy), CpuBudget(2, "affinity"), cores=2)
    assert choice.threads == expected
    assert f"{expected} torch thread(s) of 2 CPU(s) (affinity)" in choice.describe()


def test_threads_asked_for_are_taken_as_they_are():
    choice = choose_threads(3, Busy(1.0), CpuBudget(2, "affinity"), cores=2)
    assert choice.threads == 3 and choice.describe() == "3 torch thread(s) as asked"


def test_the_watch_subtracts_this_process_own_time(tmp_path):
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)

    def write(busy_ticks: int, own_ticks: int) -> None:
        # cpu user nice system idle iowait irq softirq steal; self/stat: utime and stime are fields 14 and 15
        (proc / "stat").write_text(f"cpu {busy_ticks} 0 0 100000 0 0 0 0\n")
        (proc / "self" / "stat").write_text("1 (python -c x) R " + " ".join(["0"] * 10) + f" {own_ticks} 0 0\n")

    write(0, 0)
    watch = CpuWatch(proc)
    hz = os.sysconf("SC_CLK_TCK")
    write(int(1.5 * 0.5 * hz), int(0.5 * 0.5 * hz))  # over ~0.5 s: 1.5 cores busy, 0.5 of them this process
    busy = watch.others_busy(min_window_s=0.5)
    assert 0.8 <= busy <= 1.05
    assert CpuWatch(tmp_path / "nothing").others_busy(0) is None


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_generate_pinned_to_one_cpu_runs_one_thread(tmp_path):
    cpu = min(os.sched_getaffinity(0))
    proc = subprocess.run([sys.executable, "-m", "otel_tracegen", "generate", "--count", "2", "--out",
                           str(tmp_path / "t.jsonl"), "--seed", "3"], capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.sched_setaffinity(0, {cpu}), cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "with 1 torch thread(s) of 1 CPU(s) (affinity)" in proc.stderr, proc.stderr[-1000:]
