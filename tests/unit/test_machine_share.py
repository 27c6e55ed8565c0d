"""How much of the machine a model takes: CPUs (affinity, then a container's CFS quota), threads and replicas."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from d2ops.utils.device import (
    CPU_THREADS_PER_REPLICA,
    REPLICA_MEMORY_BYTES,
    machine_cpus,
    machine_replicas,
    machine_threads,
)

AFFINITY = len(os.sched_getaffinity(0))


def _cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, AFFINITY),  # no cgroup files readable: the affinity mask alone
        ({"cpu.max": "max 100000\n"}, AFFINITY),  # cgroup v2, no limit
        ({"cpu.max": "50000 100000\n"}, 1),  # docker --cpus=0.5: at least one
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, AFFINITY),  # cgroup v1, no limit
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1, --cpus=1
        ({"cpu.max": "garbage\n"}, AFFINITY),  # unreadable: no cap rather than a crash
    ],
)
def test_the_cpus_are_the_affinity_mask_capped_by_the_cgroup_quota(
    tmp_path: Path, files: dict[str, str], expected: int
) -> None:
    assert machine_cpus(_cgroup(tmp_path, files)) == expected


def test_a_quota_above_the_affinity_mask_does_not_add_cpus(tmp_path: Path) -> None:
    root = _cgroup(tmp_path, {"cpu.max": f"{(AFFINITY + 3) * 100000} 100000\n"})
    assert machine_cpus(root) == AFFINITY
    root = _cgroup(tmp_path / "v2", {"cpu.max": "150000 100000\n"})  # 1.5 CPUs: the threads may use 2
    assert machine_cpus(root) == min(2, AFFINITY)


def test_threads_share_the_cpus_among_replicas() -> None:
    cpus = machine_cpus()
    assert machine_threads() == cpus
    assert machine_threads(cpus) == 1
    assert machine_threads(cpus * 4) == 1  # never zero


@pytest.mark.parametrize(
    ("cpus", "memory_gib", "expected"),
    [
        (2, 24, 1),  # this development VM: one replica with both CPUs
        (CPU_THREADS_PER_REPLICA, 24, 1),
        (16, 64, 16 // CPU_THREADS_PER_REPLICA),  # the lent GPU machines' 16 cores, on the CPU
        (64, 8, 8 * 1024**3 // REPLICA_MEMORY_BYTES),  # memory caps the model copies
        (64, 1, 1),  # at least one, even where memory is short (the model load then says why it fails)
    ],
)
def test_cpu_replicas_come_from_the_cpus_and_the_memory(cpus: int, memory_gib: int, expected: int) -> None:
    assert machine_replicas("cpu", cpus=cpus, memory=memory_gib * 1024**3) == expected


def test_cuda_serves_one_replica_per_process() -> None:
    assert machine_replicas("cuda", cpus=64, memory=512 * 1024**3) == 1
    assert machine_replicas("cuda:1", cpus=64, memory=512 * 1024**3) == 1
