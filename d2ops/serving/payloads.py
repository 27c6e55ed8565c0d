"""Detection request bodies, parsed the same way by every front end that is not the HTTP server.

The CVAT nuclio function and the clearml-serving engine both take CVAT's JSON body
``{"image": "<base64 JPEG/PNG>", "threshold": 0.5}`` (``threshold`` optional). Platforms hand it
over in different shapes: nuclio gives a dict when the request says ``application/json`` and bytes
otherwise; clearml-serving gives a dict for JSON and the raw bytes for anything else, so there the
bytes may also be the image file itself. :func:`parse_detection_request` accepts all of these.

:func:`parse_detection_batch` also takes what ``d2ops serve`` takes besides: ``{"images": [...]}``
(one reply list per image) and ``multipart/form-data`` uploads (every file part is an image, a
``threshold`` text field is optional). clearml-serving hands a multipart body over as raw bytes
without its ``Content-Type`` header, so the boundary is read from the body's first line (RFC 2046
puts the delimiter there; clients send no preamble) and the form is parsed by python-multipart,
the parser Starlette and FastAPI use.

Every client mistake raises :class:`BadRequestError` or :class:`~d2ops.serving.formats.BadImageError`
(both :class:`~d2ops.serving.formats.BadInputError`, a ``ValueError``), with a message that says what to send
instead, so the front end can answer its protocol's client error.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from d2ops.model.detector import Frame
from d2ops.serving.formats import BadImageError, BadInputError, base64_bytes, decode_frame

__all__ = [
    "DEFAULT_MAX_IMAGES",
    "REQUEST_EXAMPLE",
    "BadRequestError",
    "DetectionBatch",
    "DetectionRequest",
    "parse_detection_batch",
    "parse_detection_request",
    "parse_multipart",
    "parse_threshold",
]

REQUEST_EXAMPLE = '{"image": "<base64 of a JPEG or PNG file>", "threshold": 0.5}'
T = TypeVar("T")
BATCH_EXAMPLE = '{"images": ["<base64>", "<base64>"], "threshold": 0.5}'
#: Images one request may carry (``images`` entries or multipart files), checked before any is decoded.
DEFAULT_MAX_IMAGES = 16
# RFC 2046 section 5.1.1: a boundary is 1 to 70 of these characters, not ending in a space.
_BOUNDARY_LINE = re.compile(rb"--([0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?])[ \t]*\r?\n")


class BadRequestError(BadInputError):
    """The request body is unusable (not JSON, no image, bad threshold); the message says why."""


@dataclass(frozen=True)
class DetectionBatch:
    """One decoded request of one or more frames; ``single`` when the reply is one list, not a list per image.

    ``single`` follows ``d2ops serve``: ``{"image": ...}``, raw image bytes and a one-file form are
    single; ``{"images": [...]}`` and a form with several files get one reply list per image.
    """

    images: tuple[Frame, ...]
    threshold: float
    single: bool


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


def _multipart_boundary(body: bytes) -> bytes | None:
    """The boundary of a ``multipart/form-data`` body, read from its first line; ``None`` if it is not one."""
    match = _BOUNDARY_LINE.match(body)
    return match.group(1) if match else None


def parse_multipart(body: bytes, boundary: bytes) -> tuple[list[bytes], dict[str, str]]:
    """The file parts (in order) and the text fields of a ``multipart/form-data`` body."""
    from python_multipart import create_form_parser
    from python_multipart.exceptions import FormParserError

    files: list[bytes] = []
    fields: dict[str, str] = {}

    def on_file(part: Any) -> None:
        part.file_object.seek(0)
        files.append(part.file_object.read())
        part.close()

    def on_field(part: Any) -> None:
        name = (part.field_name or b"").decode("utf-8", "replace")
        fields[name] = (part.value or b"").decode("utf-8", "replace")

    if not body.rstrip().endswith(b"--" + boundary + b"--"):
        raise BadRequestError(
            "the multipart form is truncated (no closing boundary): send the complete form, e.g. curl -F data=@img.jpg"
        )
    headers = {"Content-Type": b"multipart/form-data; boundary=" + boundary}
    try:
        parser = create_form_parser(headers, on_field, on_file)
        parser.write(body)
        parser.finalize()
    except FormParserError as err:
        raise BadRequestError(
            f"the multipart form is malformed ({err}); send it as curl -F data=@img.jpg does"
        ) from None
    return files, fields


def _count_images(count: int, max_images: int) -> None:
    if count > max_images:
        raise BadRequestError(f"{count} images in one request is over the limit of {max_images}: split the request")


def _batch_from_dict(body: dict[str, Any], default_threshold: float, max_images: int) -> DetectionBatch:
    if ("image" in body) == ("images" in body):
        raise BadRequestError(
            f"send exactly one of 'image' (a base64 string) or 'images' (a list of them): {REQUEST_EXAMPLE} "
            f"or {BATCH_EXAMPLE}"
        )
    threshold = parse_threshold(body.get("threshold"), default_threshold)
    if "image" in body:
        return DetectionBatch((decode_frame(base64_bytes(body["image"])),), threshold, single=True)
    images = body["images"]
    if not isinstance(images, list) or not images:
        raise BadRequestError(f"'images' must be a non-empty list of base64 strings; send {BATCH_EXAMPLE}")
    _count_images(len(images), max_images)
    # every entry's base64 is checked before any image is decoded
    payloads = [_entry(index, base64_bytes, text) for index, text in enumerate(images)]
    frames = [_entry(index, decode_frame, payload) for index, payload in enumerate(payloads)]
    return DetectionBatch(tuple(frames), threshold, single=False)


def _entry(index: int, decode: Callable[[Any], T], value: Any) -> T:
    """``decode(value)``, with ``images[index]`` named in the error."""
    try:
        return decode(value)
    except BadImageError as err:
        raise type(err)(f"images[{index}]: {err}") from None


def _batch_from_form(body: bytes, boundary: bytes, default_threshold: float, max_images: int) -> DetectionBatch:
    files: list[bytes] = []
    fields: dict[str, str] = {}
    if not (boundary.endswith(b"--") and body.rstrip() == b"--" + boundary):  # not just the closing delimiter
        files, fields = parse_multipart(body, boundary)
    if not files:
        raise BadRequestError("the multipart form has no file; send the image as a file, e.g. curl -F data=@img.jpg")
    _count_images(len(files), max_images)
    threshold = parse_threshold(fields.get("threshold"), default_threshold)
    frames = []
    for index, data in enumerate(files):
        try:
            frames.append(decode_frame(data))
        except BadImageError as err:
            raise type(err)(f"file {index + 1} of the form: {err}" if len(files) > 1 else str(err)) from None
    return DetectionBatch(tuple(frames), threshold, single=len(frames) == 1)


def parse_detection_batch(
    body: Any, default_threshold: float, *, max_images: int = DEFAULT_MAX_IMAGES
) -> DetectionBatch:
    """Decode a request of one or more images: JSON (dict, text or bytes) with ``image`` or ``images``,
    a ``multipart/form-data`` body, or an image file's bytes.

    At most ``max_images`` images, counted before any is decoded. Raw image bytes carry no
    threshold, so ``default_threshold`` applies to them.
    """
    if isinstance(body, dict):
        return _batch_from_dict(body, default_threshold, max_images)
    if isinstance(body, bytearray | memoryview):
        body = bytes(body)
    if isinstance(body, str):
        return _batch_from_dict(_json_object(body), default_threshold, max_images)
    if isinstance(body, bytes):
        if _looks_like_json(body):
            return _batch_from_dict(_json_object(body), default_threshold, max_images)
        boundary = _multipart_boundary(body)
        if boundary is not None:
            return _batch_from_form(body, boundary, default_threshold, max_images)
        if body.startswith(b"--"):
            raise BadRequestError(
                "the body starts like a multipart form but its first line is not a boundary; "
                "send it as curl -F data=@img.jpg does"
            )
        return DetectionBatch((decode_frame(body),), default_threshold, single=True)
    raise BadRequestError(f"unsupported body of type {type(body).__name__}; send {REQUEST_EXAMPLE}")
