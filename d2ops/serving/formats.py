"""Wire formats shared by every serving front end (HTTP server, CVAT nuclio function, clearml-serving).

Decoding is strict: anything that is not a complete, reasonably sized image raises
:class:`BadImageError` with a message that names the problem, so a server can answer 4xx.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from d2ops.model.detector import Frame

__all__ = [
    "DEFAULT_INFERENCE_PIXELS",
    "DEFAULT_MAX_PIXELS",
    "BadImageError",
    "BadInputError",
    "ImageHeader",
    "UnsupportedFormatError",
    "base64_bytes",
    "decode_base64_image",
    "decode_frame",
    "decode_image",
    "frame_from_image",
    "read_header",
]

#: 60 megapixels per image: above an 8000x5100 camera frame, far below a decompression bomb. Frames above
#: ``inference_pixels`` are decoded at a reduced size (and the shapes mapped back), so this only guards memory.
DEFAULT_MAX_PIXELS = 60_000_000
#: Frames above this many pixels are reduced for inference: detectron2 resizes to about 1333x800 anyway.
DEFAULT_INFERENCE_PIXELS = 12_000_000
#: EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPS_SIDES = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


class BadInputError(ValueError):
    """A client's request or image cannot be used; the message says why and what to send instead.

    The one error type every serving front end maps to its protocol's client error (HTTP 4xx, nuclio 400,
    clearml-serving 422, cvat-sdk's ``BadFunctionError``); anything else raised while serving is a server error.
    """


class BadImageError(BadInputError):
    """The request's image cannot be used; the message says why and what to send instead."""


class UnsupportedFormatError(BadImageError):
    """A real image, but in a pixel format the detector cannot take (HTTP 415)."""


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding its pixels."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _check_size(image: Image.Image, max_pixels: int) -> Image.Image:
    width, height = image.size
    if width < 1 or height < 1:
        raise BadImageError(f"the image is {width}x{height} pixels: send an image with pixels")
    if width * height > max_pixels:
        raise BadImageError(
            f"image too large: {width}x{height} pixels is over the limit of {max_pixels} "
            "(possible decompression bomb); downscale it before sending"
        )
    return image


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise BadImageError("empty image: send the bytes of a JPEG or PNG image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise BadImageError(f"image refused as a decompression bomb: {err}") from None
    except UnidentifiedImageError:
        raise BadImageError("the bytes are not an image Pillow can identify: send a JPEG or PNG image") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(f"the image is truncated or corrupt ({err}); send the complete file") from None
    return _check_size(image, max_pixels)


def read_header(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """The format and size from the header alone (cheap: no pixels are decompressed)."""
    image = _open(data, max_pixels)
    return ImageHeader(str(image.format), *image.size)


def _to_rgb8(image: Image.Image) -> np.ndarray:
    """RGB uint8 pixels. 16-bit and 32-bit integer images are scaled by their type's range (65535 -> 255);
    float images in [0, 1] are scaled by 255, other float images are stretched from their min to their max.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            low, high = (0.0, 1.0) if values.min() >= 0.0 and values.max() <= 1.0 else (values.min(), values.max())
        elif image.mode == "I" and values.max() > 65535:
            low, high = values.min(), values.max()
        else:
            low, high = 0.0, 65535.0
        if not np.isfinite(values).all():
            raise UnsupportedFormatError("the image holds NaN or infinite values: send finite pixel values")
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    try:
        return np.asarray(image.convert("RGB"))
    except (ValueError, OSError) as err:
        raise UnsupportedFormatError(
            f"cannot convert {image.format} pixels of mode {image.mode} to RGB ({err}): send a JPEG or PNG image"
        ) from None


def _decode(data: bytes, max_pixels: int, inference_pixels: int | None) -> Frame:
    return _frame(_open(data, max_pixels), inference_pixels)


def _frame(image: Image.Image, inference_pixels: int | None) -> Frame:
    """The upright frame of an opened (size-checked) image, its pixels reduced to ``inference_pixels``."""
    width, height = image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        factor = 1.0
        if inference_pixels is not None and width * height > inference_pixels:
            factor = math.sqrt(width * height / inference_pixels)
            target = (max(1, math.floor(width / factor)), max(1, math.floor(height / factor)))
            if image.format == "JPEG":
                image.draft("RGB", target)  # DCT scaling: decodes at 1/2, 1/4 or 1/8 size directly
            image.load()
            if image.size[0] > target[0]:
                image = image.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
        else:
            image.load()  # multi-frame files (GIF, MPO, TIFF pages) decode their first frame
        image = ImageOps.exif_transpose(image)
    except BadImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise BadImageError(f"image refused as a decompression bomb: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise BadImageError(f"the image is truncated or corrupt ({err}); send the complete file") from None
    rgb = _to_rgb8(image)
    if orientation in _SWAPS_SIDES:
        width, height = height, width
    return Frame(np.ascontiguousarray(rgb[:, :, ::-1]), height, width)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes into a BGR uint8 array (detectron2's input), at full size, refusing bad input.

    Every still format Pillow reads is accepted (multi-frame files give their first frame); EXIF
    orientation is applied, as training and batch inference do. Checks: empty body, unidentifiable
    bytes, size over ``max_pixels`` (from the header, before decompressing), truncated or corrupt data.
    """
    return _decode(data, max_pixels, None).pixels


def decode_frame(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, inference_pixels: int = DEFAULT_INFERENCE_PIXELS
) -> Frame:
    """Decode image bytes for inference: a :class:`~d2ops.model.detector.Frame` whose ``height`` and
    ``width`` are the original (upright) frame's and whose pixels are reduced to at most
    ``inference_pixels`` (JPEGs are decoded reduced, never at full size), so detections come back in
    the original frame's coordinates.
    """
    return _decode(data, max_pixels, inference_pixels)


def frame_from_image(
    image: Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS, inference_pixels: int = DEFAULT_INFERENCE_PIXELS
) -> Frame:
    """:func:`decode_frame` for an image a library has already opened (cvat-sdk hands native functions a
    ``PIL.Image``, loaded or not): the same size limit, reduction, EXIF orientation and pixel conversion."""
    return _frame(_check_size(image, max_pixels), inference_pixels)


def base64_bytes(text: Any) -> bytes:
    """The bytes of CVAT's base64 image field (a data URL prefix is tolerated)."""
    if not isinstance(text, str):
        raise BadImageError(f"'image' must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        # Line-wrapped base64 (base64.encodebytes, openssl base64) is valid base64 with whitespace in it.
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadImageError("'image' is not valid base64: encode the image file's bytes with base64") from None


def decode_base64_image(text: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode CVAT's base64 image field into a BGR image (see :func:`base64_bytes`)."""
    return decode_image(base64_bytes(text), max_pixels=max_pixels)
