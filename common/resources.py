"""How many CPUs this process may really use: the pod's, not the node's.

Inside a container with a CPU limit, `os.cpu_count()` and the CPU affinity both name the node's cores: a
64-core node would start 64 tokenizer processes (and torch 64 threads) in a 4-CPU pod, which the kernel then
throttles to 4 CPUs' worth of time. The limit lives in the cgroup's CPU quota: cgroup v2 `cpu.max`
("<quota> <period>" or "max <period>"), cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` (quota -1: none).
Every default that counts cores reads `available_cpus()`; an explicit setting (a config's `workers`,
`OMP_NUM_THREADS`) still wins where the caller honours one.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def available_cpus(root: Path | None = None, self_cgroup: Path | None = None) -> int:
    """The CPUs this process may use: its affinity, capped by its cgroup's CPU quota (rounded down, at least 1).

    `root` and `self_cgroup` default to /sys/fs/cgroup and /proc/self/cgroup (tests pass fake ones)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota(root, self_cgroup)
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def cpu_quota(root: Path | None = None, self_cgroup: Path | None = None) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup and its ancestors; None when unlimited."""
    root = root or CGROUP_ROOT
    v2, v1 = _own_paths(self_cgroup or SELF_CGROUP)
    limits = [q for d in _up_from(root, v2) if (q := _v2_quota(d / "cpu.max")) is not None]
    for name in V1_CPU_DIRS:
        base = root / name
        if base.is_dir():
            limits += [q for d in _up_from(base, v1) if (q := _v1_quota(d)) is not None]
    return min(limits) if limits else None


def _own_paths(self_cgroup: Path) -> tuple[str, str]:
    """This process's cgroup path in the v2 hierarchy and in v1's cpu controller ('/' when not known)."""
    v2 = v1 = "/"
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":
            v2 = path or "/"
        elif "cpu" in controllers.split(","):
            v1 = path or "/"
    return v2, v1


def _up_from(base: Path, path: str) -> list[Path]:
    """`base/path` and each folder above it up to `base` (in a container's own cgroup namespace: `base`)."""
    here = base / path.strip("/") if path.strip("/") else base
    out = []
    while True:
        if here.is_dir():
            out.append(here)
        if here == base or base not in here.parents:
            break
        here = here.parent
    return out or [base]


def _v2_quota(cpu_max: Path) -> float | None:
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period) if int(period) > 0 and int(quota) > 0 else None
    except ValueError:
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text().strip())
        period = int((folder / "cpu.cfs_period_us").read_text().strip())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def limit_torch_threads() -> int:
    """On CPU, torch's intra-op threads default to the node's cores: cap them to the pod's CPUs unless
    OMP_NUM_THREADS says otherwise. Returns the thread count torch uses."""
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(available_cpus())
    return int(torch.get_num_threads())


def capped_cpu_ids(root: Path | None = None, self_cgroup: Path | None = None) -> list[int] | None:
    """The first `available_cpus()` CPU ids of the affinity when the quota allows fewer than the affinity names
    (engines that pin one thread per listed CPU, such as vLLM's CPU backend, then start that many); else None."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    ids = sorted(os.sched_getaffinity(0))
    n = available_cpus(root, self_cgroup)
    return ids[:n] if n < len(ids) else None
