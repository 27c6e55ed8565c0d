"""Which torch device a run or a served model uses."""

from __future__ import annotations

__all__ = ["resolve_device"]


def resolve_device(requested: str) -> str:
    """``auto`` means CUDA when a GPU is visible, else the CPU; ``cuda`` without a GPU is an error."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} was asked for but no CUDA device is visible; use 'auto' or 'cpu'")
    return requested
