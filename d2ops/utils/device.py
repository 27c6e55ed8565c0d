"""Which torch device a run or a served model uses."""

from __future__ import annotations

import os

__all__ = ["machine_threads", "resolve_device"]


def resolve_device(requested: str) -> str:
    """``auto`` means CUDA when a GPU is visible, else the CPU; ``cuda`` without a GPU is an error."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} was asked for but no CUDA device is visible; use 'auto' or 'cpu'")
    return requested


def machine_threads(replicas: int = 1) -> int:
    """Intra-op threads for one of ``replicas`` model copies: the CPUs this process may run on (its affinity
    mask, which containers' cpusets and ``taskset`` narrow), shared out; never the host's whole core count."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, replicas))
