"""Reply encoders: detections into each wire contract (CVAT's detector shapes, TorchServe's detector list).

Every front end (HTTP server, CVAT nuclio function, clearml-serving engine) encodes through here.

CVAT's shapes are the ones its lambda manager parses (``cvat/apps/lambda_manager/views.py``,
``LambdaJob._call_detector``) and its own functions write (``serverless/openvino/base/shared.py``
``to_cvat_mask``):

- ``rectangle``: ``points = [x1, y1, x2, y2]``;
- ``polygon``: ``points = [x, y, x, y, ...]``;
- ``mask``: ``mask`` = the row-major 0/255 values of the mask cropped to the inclusive box
  ``[xtl, ytl, xbr, ybr]``, followed by those four numbers (CVAT run-length encodes it itself), and
  ``points`` = the object's outline, which CVAT uses instead when "convert masks to polygons" is on.

One object is always one shape. A segmenting model answers with masks (or, asked for polygons, one
simplified outline per object); a box-only model with rectangles. A segmenting model never sends a
rectangle: a label declared ``mask`` or ``polygon`` in CVAT gets that shape or nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from d2ops.model.detector import Detection

__all__ = ["CVAT_SHAPES", "CvatShapeType", "cvat_label_type", "cvat_mask_points", "to_cvat", "to_torchserve"]

CvatShapeType = Literal["mask", "polygon"]
#: How a segmenting model's objects are sent to CVAT: ``mask`` (default, keeps holes) or ``polygon``.
CVAT_SHAPES: tuple[CvatShapeType, ...] = ("mask", "polygon")


def cvat_label_type(segments: bool, shape: str = "mask") -> str:
    """The label ``type`` to declare to CVAT (function.yaml spec, ``/v1/models``): what the replies carry."""
    if shape not in CVAT_SHAPES:
        raise ValueError(f"CVAT shape must be one of {', '.join(CVAT_SHAPES)}, got {shape!r}")
    return shape if segments else "rectangle"


def cvat_mask_points(mask: np.ndarray, box: Sequence[int]) -> list[int]:
    """CVAT's ``mask`` field: row-major 0/255 over the crop, then ``[xtl, ytl, xbr, ybr]`` (inclusive)."""
    crop = np.asarray(mask, dtype=bool)
    if not crop.any():  # an empty mask would be no shape at all: the object is its box
        crop = np.ones_like(crop)
    return [*(crop.astype(np.uint8) * 255).ravel().tolist(), *(int(v) for v in box)]


def _box_polygon(box: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = box
    return [x1, y1, x2, y1, x2, y2, x1, y2]


def _cvat_shape(det: Detection, shape: str) -> dict[str, Any]:
    base = {"confidence": f"{det.score:.4f}", "label": det.label}
    if det.mask is None or det.mask_box is None:
        return {**base, "points": det.box, "type": "rectangle"}
    outline = det.polygon or _box_polygon(det.box)
    if shape == "mask":
        return {**base, "mask": cvat_mask_points(det.mask, det.mask_box), "points": outline, "type": "mask"}
    return {**base, "points": outline, "type": "polygon"}


def to_cvat(detections: Sequence[Detection], shape: str = "mask") -> list[dict[str, Any]]:
    """CVAT's nuclio detector reply: one shape per detection (see the module docstring)."""
    cvat_label_type(True, shape)  # validates shape
    return [_cvat_shape(det, shape) for det in detections]


def to_torchserve(detections: Sequence[Detection]) -> list[dict[str, Any]]:
    """TorchServe's object-detector reply: ``[{"<label>": [x1, y1, x2, y2], "score": s}, ...]``."""
    return [{det.label: det.box, "score": det.score} for det in detections]
