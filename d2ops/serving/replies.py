"""Reply encoders: detections into each wire contract (CVAT's detector shapes, TorchServe's detector list).

Every front end (HTTP server, CVAT nuclio function, clearml-serving engine) encodes through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from d2ops.model.detector import Detection

__all__ = ["to_cvat", "to_torchserve"]


def to_cvat(detections: Sequence[Detection]) -> list[dict[str, Any]]:
    """CVAT's nuclio detector reply: rectangles, or polygons for instance-segmentation models."""
    out: list[dict[str, Any]] = []
    for det in detections:
        if det.polygons:
            for polygon in det.polygons:
                out.append({"confidence": f"{det.score:.4f}", "label": det.label, "points": polygon, "type": "polygon"})
        else:
            out.append({"confidence": f"{det.score:.4f}", "label": det.label, "points": det.box, "type": "rectangle"})
    return out


def to_torchserve(detections: Sequence[Detection]) -> list[dict[str, Any]]:
    """TorchServe's object-detector reply: ``[{"<label>": [x1, y1, x2, y2], "score": s}, ...]``."""
    return [{det.label: det.box, "score": det.score} for det in detections]
