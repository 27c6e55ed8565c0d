"""What every serving front end does the same way with a client's input: the first part of ``DetectionService``.

ARCHITECTURE.md grows serving into one ``DetectionService`` (load, hot swap, request limits, decode, predict,
encode) with a thin adapter per front end. This module holds the part every front end needs today: turning
what a client sent into frames the model can take (payload decode, the header's size limit, then
:meth:`~d2ops.model.detector.Detector.input_problem`), or raising one
:class:`~d2ops.serving.formats.BadInputError` whose message names the problem. Each adapter maps that one
error type to its protocol's client error, never to a server error:

=====================================  ===================================================================
front end                              client error
=====================================  ===================================================================
``d2ops serve`` (:mod:`.http`)         400 (415 for an unsupported pixel format, 413 over a limit), JSON
                                       ``{"error": message}``
nuclio (:mod:`.nuclio`)                400, ``application/json`` ``{"error": message}``
clearml-serving (:mod:`.clearml_engine`)  422 with the message in ``detail``: its app's answer to a
                                       ``ValueError`` (``clearml_serving/serving/main.py`` ``serve_model``)
cvat-sdk native (:mod:`.cvat_function`)  ``CvatInputError``, a ``cvat_sdk.auto_annotation.BadFunctionError``:
                                       the one exception whose message cvat-cli's agent passes on to CVAT
=====================================  ===================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from d2ops.model.bundle import ModelBundle
from d2ops.model.detector import Detector, Frame
from d2ops.serving.formats import (
    DEFAULT_INFERENCE_PIXELS,
    DEFAULT_MAX_PIXELS,
    BadImageError,
    frame_from_image,
)
from d2ops.serving.payloads import (
    DEFAULT_MAX_IMAGES,
    DetectionBatch,
    DetectionRequest,
    parse_detection_batch,
    parse_detection_request,
)

__all__ = ["check_frames", "decode_batch", "decode_opened_image", "decode_request", "load_detector"]


def load_detector(
    bundle: str | Path, *, device: str = "cpu", runtime: str = "auto", threads: int | None = None
) -> Detector:
    """The bundle's :class:`~d2ops.model.detector.Detector` on ``runtime``, for every front end that loads one.

    An exported graph must still give the detections its export recorded on its reference image
    (:func:`~d2ops.model.export.check_reference`): a graph whose bytes changed after the export is refused with
    :class:`~d2ops.model.bundle.ReferenceMismatchError`, even when its recorded sha256 was updated too.
    """
    # lazy: the exporters' module (TracingAdapter), only once a model is loaded
    from d2ops.model.export import check_reference

    detector = Detector.from_bundle(bundle, device=device, runtime=runtime, threads=threads)
    check_reference(detector, ModelBundle(Path(bundle)))
    return detector


def check_frames(detector: Detector, frames: Sequence[Frame]) -> None:
    """Raise :class:`~d2ops.serving.formats.BadImageError` if the model cannot take one of ``frames``
    (:meth:`~d2ops.model.detector.Detector.input_problem`), naming which one when there are several."""
    for index, frame in enumerate(frames):
        problem = detector.input_problem(frame)
        if problem:
            raise BadImageError(f"images[{index}]: {problem}" if len(frames) > 1 else problem)


def decode_batch(
    detector: Detector, body: Any, default_threshold: float, *, max_images: int = DEFAULT_MAX_IMAGES
) -> DetectionBatch:
    """:func:`~d2ops.serving.payloads.parse_detection_batch`, then :func:`check_frames`."""
    batch = parse_detection_batch(body, default_threshold, max_images=max_images)
    check_frames(detector, batch.images)
    return batch


def decode_request(
    detector: Detector, body: Any, default_threshold: float, *, allow_raw_image: bool
) -> DetectionRequest:
    """:func:`~d2ops.serving.payloads.parse_detection_request`, then :func:`check_frames`."""
    request = parse_detection_request(body, default_threshold, allow_raw_image=allow_raw_image)
    check_frames(detector, [request.image])
    return request


def decode_opened_image(
    detector: Detector,
    image: Image.Image,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    inference_pixels: int = DEFAULT_INFERENCE_PIXELS,
) -> Frame:
    """An image a library has already opened (cvat-sdk's frames) checked and decoded as a request's image is:
    :func:`~d2ops.serving.formats.frame_from_image`, then :func:`check_frames`."""
    frame = frame_from_image(image, max_pixels=max_pixels, inference_pixels=inference_pixels)
    check_frames(detector, [frame])
    return frame
