"""Wire formats shared by every serving front end (HTTP server, CVAT nuclio function, clearml-serving).

Decoding is strict: anything that is not a complete, reasonably sized image raises
:class:`BadImageError` with a message that names the problem, so a server can answer 4xx.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from d2ops.model.detector import Frame

__all__ = [
    "DEFAULT_INFERENCE_PIXELS",
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_FORMATS",
    "BadImageError",
    "UnsupportedFormatError",
    "base64_bytes",
    "decode_base64_image",
    "decode_frame",
    "decode_image",
]

#: Formats PIL may open; everything else (PDF, SVG, ...) is refused before decoding.
SUPPORTED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF")
#: 40 megapixels: far above any camera frame a detector is run on, far below a decompression bomb.
DEFAULT_MAX_PIXELS = 40_000_000
#: Frames above this many pixels are decoded at a reduced size for inference (shapes are mapped back).
DEFAULT_INFERENCE_PIXELS = 40_000_000


class BadImageError(ValueError):
    """The request's image cannot be used; the message says why and what to send instead."""


class UnsupportedFormatError(BadImageError):
    """A real image, but in a format the detector does not take (HTTP 415)."""


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes into a BGR uint8 array (detectron2's input), refusing bad input.

    Checks, in order: empty body, unknown or unsupported format, size over ``max_pixels``
    (checked from the header, before the pixels are decompressed), truncated or corrupt data.
    """
    if not data:
        raise BadImageError("empty image: send the bytes of a JPEG or PNG image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in SUPPORTED_FORMATS:
                raise UnsupportedFormatError(
                    f"unsupported image format {image.format}: send one of {', '.join(SUPPORTED_FORMATS)}"
                )
            width, height = image.size
            if width * height > max_pixels:
                raise BadImageError(
                    f"image too large: {width}x{height} pixels is over the limit of {max_pixels} "
                    "(possible decompression bomb); downscale it before sending"
                )
            image.load()
    except BadImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise BadImageError(f"image refused as a decompression bomb: {err}") from None
    except UnidentifiedImageError:
        raise BadImageError("the bytes are not an image PIL can identify: send a JPEG or PNG image") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(f"the image is truncated or corrupt ({err}); send the complete file") from None
    rgb = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])


def decode_frame(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, inference_pixels: int = DEFAULT_INFERENCE_PIXELS
) -> Frame:
    """Decode image bytes for inference: a :class:`~d2ops.model.detector.Frame` whose ``height`` and
    ``width`` are the original frame's, and whose pixels are at most ``inference_pixels``.
    """
    image = decode_image(data, max_pixels=max_pixels)
    return Frame(image, image.shape[0], image.shape[1])


def base64_bytes(text: Any) -> bytes:
    """The bytes of CVAT's base64 image field (a data URL prefix is tolerated)."""
    if not isinstance(text, str):
        raise BadImageError(f"'image' must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadImageError("'image' is not valid base64: encode the image file's bytes with base64") from None


def decode_base64_image(text: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode CVAT's base64 image field into a BGR image (see :func:`base64_bytes`)."""
    return decode_image(base64_bytes(text), max_pixels=max_pixels)
