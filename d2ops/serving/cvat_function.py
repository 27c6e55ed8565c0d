"""A d2ops model as a CVAT 2.x native auto-annotation function (``cvat_sdk.auto_annotation``); no nuclio.

Annotate a CVAT task from a machine that can reach CVAT and holds the bundle::

    cvat-cli --server-host https://cvat.example.com --auth USER task auto-annotate TASK_ID \\
        --function-module d2ops.serving.cvat_function -p bundle=str:/models/shapes [-p device=str:cuda]

The same module serves as a CVAT AI agent (``cvat-cli function create-native "d2ops shapes"
--function-module d2ops.serving.cvat_function -p bundle=str:...``, then ``cvat-cli function run-agent``
with the same module and parameters). cvat-cli calls :func:`create` with the ``-p`` parameters.

The function wraps the same :class:`~d2ops.model.detector.Detector` as ``d2ops serve`` and the nuclio
function. It declares one label per class, of type ``mask`` for segmenting models (``rectangle``
otherwise; ``polygon`` with ``-p shape=str:polygon``), and returns one shape per object. When CVAT asks to
convert masks to polygons (``conv_mask_to_poly``), each object is one simplified polygon instead, as
cvat-sdk's driver requires (``driver._AnnotationMapper``).

Each frame goes through the validation every front end shares (:mod:`d2ops.serving.service`: the size limit,
16-bit and float scaling, reduction of very large frames, the model's aspect-ratio limit). A frame it refuses
raises :class:`CvatInputError`, a cvat-sdk ``BadFunctionError``: cvat-cli's agent (``cvat_cli/_internal/agent.py``
``_Agent._process_ar``, cvat-cli 2.x) reports only that exception type's message to CVAT ("Underlying function
returned incorrect result: ..."), any other as "Unknown error"; ``cvat-cli task auto-annotate`` stops with it.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import cvat_sdk.auto_annotation as cvataa
import cvat_sdk.models as models
import numpy as np
import PIL.Image
from cvat_sdk.masks import encode_mask

from d2ops.model.bundle import ModelBundle
from d2ops.model.detector import Detection
from d2ops.model.source import resolve_model
from d2ops.serving.formats import BadInputError
from d2ops.serving.replies import cvat_label_type
from d2ops.serving.service import decode_opened_image, load_detector

__all__ = ["CvatInputError", "D2opsDetectionFunction", "create"]


class CvatInputError(cvataa.BadFunctionError, ValueError):
    """A CVAT frame the model cannot take; the message names the frame, the problem and the fix.

    A ``BadFunctionError`` so that cvat-cli's agent passes the message on to CVAT, and a ``ValueError`` as
    every other front end's input errors are.
    """


class D2opsDetectionFunction:
    """A ``cvat_sdk.auto_annotation.DetectionFunction`` over a d2ops bundle.

    ``bundle``: a bundle folder or zip, or an ``s3://`` URI; ``threshold``: the score threshold when
    CVAT sends none (cvat-cli ``--conf-threshold`` overrides it); ``shape``: how a segmenting model's
    objects are sent, ``mask`` (default) or ``polygon`` (one simplified polygon each, labels declared
    ``polygon``, for tasks whose labels are polygons).
    """

    def __init__(
        self,
        bundle: str,
        device: str = "cpu",
        threshold: float = 0.5,
        cache_dir: str = "outputs/cache/models",
        shape: str = "mask",
    ) -> None:

        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold!r}")
        cvat_label_type(True, shape)  # ValueError unless mask or polygon, before loading anything
        self.shape = shape
        folder = ModelBundle.open(resolve_model(bundle, Path(cache_dir)), bundle)
        self.bundle = folder
        self.threshold = float(threshold)
        self.detector = load_detector(folder.path, device=device)
        self.segments = folder.segments()

    @cached_property
    def spec(self) -> cvataa.DetectionFunctionSpec:
        label_type = cvat_label_type(self.segments, self.shape)
        return cvataa.DetectionFunctionSpec(
            labels=[cvataa.label_spec(name, index, type=label_type) for index, name in enumerate(self.detector.labels)]
        )

    def detect(
        self, context: cvataa.DetectionFunctionContext, image: PIL.Image.Image
    ) -> list[models.LabeledShapeRequest]:
        threshold = self.threshold if context.conf_threshold is None else context.conf_threshold
        try:
            frame = decode_opened_image(self.detector, image)
        except BadInputError as err:
            raise CvatInputError(f"frame {context.frame_name!r}: {err}") from None
        detections = self.detector.predict([frame], threshold)[0]
        to_polygon = context.conv_mask_to_poly or self.shape == "polygon"
        return [self._shape(det, to_polygon) for det in detections]

    @staticmethod
    def _shape(det: Detection, to_polygon: bool) -> models.LabeledShapeRequest:
        if det.mask is None or det.mask_box is None:
            return cvataa.rectangle(det.category_index, det.box)
        if to_polygon:
            x1, y1, x2, y2 = det.box
            return cvataa.polygon(det.category_index, det.polygon or [x1, y1, x2, y1, x2, y2, x1, y2])
        crop = np.asarray(det.mask, dtype=bool)
        if not crop.any():  # an empty mask is the object's box
            crop = np.ones_like(crop)
        # cvat-sdk's encoder over the crop alone (no frame-sized bitmap per object), then the crop's place in
        # the frame: encode_mask ends with the inclusive box [0, 0, w - 1, h - 1] of the crop it encoded
        encoded = encode_mask(crop, [0, 0, crop.shape[1], crop.shape[0]])
        return cvataa.mask(det.category_index, [*encoded[:-4], *det.mask_box])


def create(**params: Any) -> D2opsDetectionFunction:
    """What cvat-cli calls with the ``-p name=type:value`` parameters (``bundle`` is required)."""
    if "bundle" not in params:
        raise ValueError("pass the model with -p bundle=str:<bundle folder, zip or s3:// URI>")
    return D2opsDetectionFunction(**params)
