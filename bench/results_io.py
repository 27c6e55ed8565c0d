"""The one writer of bench/results.json: each benchmark merges its figures under its own key."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def merge_into(path: Path, key: str, figures: dict[str, Any]) -> None:
    """Read-modify-write ``path`` so that figures from other benchmarks are kept."""
    data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    data[key] = figures
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
