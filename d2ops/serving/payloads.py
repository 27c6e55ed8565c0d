"""Detection request bodies, parsed the same way by every front end that is not the HTTP server.

The CVAT nuclio function and the clearml-serving engine both take CVAT's JSON body
``{"image": "<base64 JPEG/PNG>", "threshold": 0.5}`` (``threshold`` optional). Platforms hand it
over in different shapes: nuclio gives a dict when the request says ``application/json`` and bytes
otherwise; clearml-serving gives a dict for JSON and the raw bytes for anything else, so there the
bytes may also be the image file itself. :func:`parse_detection_request` accepts all of these.

Every client mistake raises :class:`BadRequestError` or :class:`~d2ops.serving.formats.BadImageError`
(both ``ValueError``), with a message that says what to send instead, so the front end can answer 4xx.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from d2ops.model.detector import Frame
from d2ops.serving.formats import base64_bytes, decode_frame

__all__ = ["REQUEST_EXAMPLE", "BadRequestError", "DetectionRequest", "parse_detection_request", "parse_threshold"]

REQUEST_EXAMPLE = '{"image": "<base64 of a JPEG or PNG file>", "threshold": 0.5}'


class BadRequestError(ValueError):
    """The request body is unusable (not JSON, no image, bad threshold); the message says why."""


@dataclass(frozen=True)
class DetectionRequest:
    """One decoded request: the frame (BGR uint8 pixels and the original size) and the score threshold."""

    image: Frame
    threshold: float


def parse_threshold(value: Any, default: float) -> float:
    """A score threshold in [0, 1]; ``None`` means ``default``. Numeric strings are accepted (CVAT)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BadRequestError(f"'threshold' must be a number between 0 and 1, got {type(value).__name__}")
    try:
        threshold = float(value)
    except ValueError:
        raise BadRequestError(f"'threshold' must be a number between 0 and 1, got {value!r}") from None
    if not math.isfinite(threshold) or not 0.0 <= threshold <= 1.0:
        raise BadRequestError(f"'threshold' must be between 0 and 1, got {value!r}")
    return threshold


def _looks_like_json(data: bytes) -> bool:
    return data.lstrip()[:1] == b"{"


def _json_object(data: bytes | str) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequestError(f"the body is not valid JSON ({err}); send {REQUEST_EXAMPLE}") from None
    if not isinstance(body, dict):
        raise BadRequestError(f"the body must be a JSON object, got {type(body).__name__}; send {REQUEST_EXAMPLE}")
    return body


def _from_dict(body: dict[str, Any], default_threshold: float) -> DetectionRequest:
    if "image" not in body:
        raise BadRequestError(f"the body has no 'image' field; send {REQUEST_EXAMPLE}")
    threshold = parse_threshold(body.get("threshold"), default_threshold)
    return DetectionRequest(decode_frame(base64_bytes(body["image"])), threshold)


def parse_detection_request(body: Any, default_threshold: float, *, allow_raw_image: bool) -> DetectionRequest:
    """Decode a request body: a dict, JSON text or bytes, or (``allow_raw_image``) an image file's bytes.

    Raw image bytes carry no threshold, so ``default_threshold`` applies to them.
    """
    if isinstance(body, dict):
        return _from_dict(body, default_threshold)
    if isinstance(body, bytearray | memoryview):
        body = bytes(body)
    if isinstance(body, str):
        return _from_dict(_json_object(body), default_threshold)
    if isinstance(body, bytes):
        if _looks_like_json(body):
            return _from_dict(_json_object(body), default_threshold)
        if allow_raw_image:
            return DetectionRequest(decode_frame(body), default_threshold)
        what = "empty" if not body.strip() else "not JSON"
        raise BadRequestError(f"the body is {what}; send {REQUEST_EXAMPLE}")
    raise BadRequestError(f"unsupported body of type {type(body).__name__}; send {REQUEST_EXAMPLE}")
