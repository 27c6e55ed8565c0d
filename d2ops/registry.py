"""Model bundles: everything needed to serve a trained detector, in one folder (and one zip).

A bundle holds ``model_final.pth``, the detectron2 ``config.yaml``, ``labels.json``,
``metrics.json`` and ``metadata.json`` (dataset identity, code version, config hash, gate).
Registration with ClearML lives in :mod:`d2ops.clearml_adapter`; this module is pure files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import d2ops

__all__ = ["BUNDLE_FILES", "GateResult", "build_bundle", "check_gate", "code_version"]

log = logging.getLogger(__name__)

BUNDLE_FILES = ("model_final.pth", "config.yaml", "labels.json", "metrics.json", "metadata.json")


@dataclass(frozen=True)
class GateResult:
    """Whether a model may be published: ``metric`` must reach ``min_value``."""

    metric: str
    value: float
    min_value: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_gate(metrics: dict[str, Any], metric: str, min_value: float) -> GateResult:
    """Evaluate the quality gate on a metrics dict (dotted lookup, e.g. ``bbox.AP50``)."""
    node: Any = metrics
    for part in metric.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"registry.quality_gate.metric {metric!r} is not in the evaluation metrics")
        node = node[part]
    value = float(node)
    return GateResult(metric, value, min_value, value >= min_value)


def code_version() -> str:
    """The git commit of the working tree (with ``-dirty``), or the package version outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{commit}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return f"d2ops-{d2ops.__version__}"


def build_bundle(
    out_dir: Path,
    *,
    weights: Path,
    d2_config: Path,
    labels: list[str],
    metrics: dict[str, Any],
    metadata: dict[str, Any],
) -> Path:
    """Write a bundle folder atomically (built beside ``out_dir``, then renamed into place)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        shutil.copy2(weights, staging / "model_final.pth")
        shutil.copy2(d2_config, staging / "config.yaml")
        (staging / "labels.json").write_text(json.dumps(labels))
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
        meta = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "code_version": code_version(),
            "d2ops_version": d2ops.__version__,
            **metadata,
        }
        (staging / "metadata.json").write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("model bundle written to %s", out_dir)
    return out_dir


def zip_bundle(bundle_dir: Path) -> Path:
    """A zip of the bundle beside it (what gets uploaded as the registered model's weights)."""
    archive = shutil.make_archive(str(bundle_dir), "zip", root_dir=bundle_dir)
    return Path(archive)
