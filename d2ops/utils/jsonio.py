"""Strict JSON for every file and artifact d2ops writes.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which are not JSON: jq, browsers'
``JSON.parse`` and most parsers reject the whole file. COCO evaluation produces NaN routinely (APl on
a dataset with no large objects), so every output goes through :func:`strict`, where a number that
is not finite becomes ``null``: "not measured" (see README, Outputs).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from d2ops.utils.files import atomic_write

__all__ = ["dumps", "strict", "write_json"]


def strict(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf; numpy floats too) replaced by ``None``.

    Mappings and sequences are rebuilt (tuples become lists, as JSON has them); anything else is kept.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: strict(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict(item) for item in value]
    if type(value).__module__ == "numpy" and hasattr(value, "item"):  # numpy scalars and 0-d arrays
        return strict(value.item()) if getattr(value, "ndim", 0) == 0 else strict(value.tolist())
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`strict` ``(value)``; refuses (``ValueError``) anything else non-finite."""
    return json.dumps(strict(value), allow_nan=False, **kwargs)


def write_json(path: str | Path, value: Any, *, indent: int | None = 2, default: Any = None) -> Path:
    """Write ``value`` as strict JSON to ``path`` atomically: a reader sees the old file or the whole new one."""
    path = Path(path)
    text = dumps(value, indent=indent, default=default)
    with atomic_write(path, "w") as handle:
        handle.write(text)
    return path
