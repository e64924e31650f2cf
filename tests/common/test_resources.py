"""Core-counting defaults read the pod's CPU limit (cgroup quota), not the node's cores (common/resources.py).

Fake cgroup trees in tmp_path stand in for what the kernel shows inside a container: cgroup v2 (`cpu.max` at
the namespace root, or deeper at the process's own path with a tighter parent) and cgroup v1's cpu controller
(`cpu.cfs_quota_us` / `cpu.cfs_period_us`, -1 for none)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common import resources

pytestmark = pytest.mark.unit
AFFINITY = len(os.sched_getaffinity(0))


def v2(tmp_path: Path, cpu_max: str, own: str = "/", **deeper: str) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    (root / "cpu.max").write_text(cpu_max + "\n")
    for rel, text in deeper.items():
        (root / rel).mkdir(parents=True, exist_ok=True)
        (root / rel / "cpu.max").write_text(text + "\n")
    self_cgroup = tmp_path / "self_cgroup"
    self_cgroup.write_text(f"0::{own}\n")
    return root, self_cgroup


def test_no_quota_leaves_the_affinity(tmp_path: Path) -> None:
    assert resources.available_cpus(*v2(tmp_path, "max 100000")) == AFFINITY
    assert resources.available_cpus(tmp_path / "none", tmp_path / "none") == AFFINITY  # no cgroup files at all


def test_a_v2_quota_below_the_cores_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)))  # a 64-core node
    root, me = v2(tmp_path, "400000 100000")  # a pod limited to 4 CPUs
    assert resources.cpu_quota(root, me) == 4.0
    assert resources.available_cpus(root, me) == 4
    assert resources.capped_cpu_ids(root, me) == [0, 1, 2, 3]


def test_a_fractional_quota_rounds_down_but_never_to_zero(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)))
    assert resources.available_cpus(*v2(tmp_path / "a", "250000 100000")) == 2  # 2500m
    assert resources.available_cpus(*v2(tmp_path / "b", "50000 100000")) == 1  # 500m


def test_the_tightest_limit_on_the_way_up_counts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)))
    root, me = v2(tmp_path, "max 100000", own="/kubepods/pod1/ctr",
                  **{"kubepods": "max 100000", "kubepods/pod1": "300000 100000", "kubepods/pod1/ctr": "max 100000"})
    assert resources.available_cpus(root, me) == 3


def test_cgroup_v1_quota(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)))
    root = tmp_path / "cgroup"
    cpu = root / "cpu,cpuacct"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    me = tmp_path / "self_cgroup"
    me.write_text("4:cpu,cpuacct:/\n1:memory:/\n")
    assert resources.available_cpus(root, me) == 64
    (cpu / "cpu.cfs_quota_us").write_text("600000\n")
    assert resources.available_cpus(root, me) == 6


def test_the_defaults_that_count_cores_read_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from jobs.executors.local import LocalExecutor
    from jobs.prepare import encode

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)))
    root, me = v2(tmp_path, "400000 100000")
    monkeypatch.setattr(resources, "CGROUP_ROOT", root)
    monkeypatch.setattr(resources, "SELF_CGROUP", me)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert encode.default_workers() == 4  # prepare's tokenizing processes
    assert LocalExecutor(max_parallel=2).threads == 2  # steps run at once split the pod's 4 CPUs, not 64 cores


def test_torch_on_cpu_gets_the_pods_cpus_unless_omp_says_otherwise(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    import torch

    before = torch.get_num_threads()
    root, me = v2(tmp_path, "100000 100000")  # 1 CPU
    monkeypatch.setattr(resources, "CGROUP_ROOT", root)
    monkeypatch.setattr(resources, "SELF_CGROUP", me)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        assert resources.limit_torch_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert resources.limit_torch_threads() == 2
    finally:
        torch.set_num_threads(before)
