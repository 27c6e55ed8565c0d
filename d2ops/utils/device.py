"""Which torch device a run or a served model uses, and how much of the machine it may take."""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["CPU_THREADS_PER_REPLICA", "machine_cpus", "machine_replicas", "machine_threads", "resolve_device"]

#: ``d2ops serve`` on the CPU runs one model replica per this many CPUs (bench/RESULTS.md, replicas): a replica's
#: intra-op threads stop paying off beyond a few, while each extra replica costs a model copy in memory.
CPU_THREADS_PER_REPLICA = 4
#: Memory one CPU replica may need (torch, detectron2 and a ResNet-50 model, with headroom); caps the replicas.
REPLICA_MEMORY_BYTES = 2 * 1024**3


def resolve_device(requested: str) -> str:
    """``auto`` means CUDA when a GPU is visible, else the CPU; ``cuda`` without a GPU is an error."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} was asked for but no CUDA device is visible; use 'auto' or 'cpu'")
    return requested


def _cgroup_cpu_limit(root: Path) -> float | None:
    """CPUs the cgroup's CFS quota allows (``docker --cpus``, a Kubernetes CPU limit); None when unlimited."""
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_v1 = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_v1 = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_v1 <= 0 or period_v1 <= 0 else quota_v1 / period_v1


def machine_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity mask (which cpusets and ``taskset`` narrow), further capped by
    a CFS quota (which containers' CPU limits set), never the host's whole core count."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit(cgroup_root)
    return max(1, min(cpus, math.ceil(limit))) if limit is not None else cpus


def machine_threads(replicas: int = 1) -> int:
    """Intra-op threads for one of ``replicas`` model copies: :func:`machine_cpus` shared out."""
    return max(1, machine_cpus() // max(1, replicas))


def _available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def machine_replicas(device: str, cpus: int | None = None, memory: int | None = None) -> int:
    """Model replicas (``d2ops serve`` worker processes) for ``device`` on this machine.

    CUDA: one. The replica's micro-batches keep the GPU busy, and a second process would hold a second CUDA
    context and model copy on the same GPU. CPU: one per :data:`CPU_THREADS_PER_REPLICA` of
    :func:`machine_cpus`, at most as many as :data:`REPLICA_MEMORY_BYTES` fit in the available memory, and at
    least one. ``cpus``/``memory`` replace what is read from the machine.
    """
    if device.startswith("cuda"):
        return 1
    by_cpu = (cpus or machine_cpus()) // CPU_THREADS_PER_REPLICA
    available = memory if memory is not None else _available_memory()
    by_memory = available // REPLICA_MEMORY_BYTES if available is not None else by_cpu
    return max(1, min(by_cpu, by_memory))
