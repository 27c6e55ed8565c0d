"""clearml-serving's pre/post-processing for a d2ops detector served by Triton (``--engine triton``).

``d2ops.serving.triton.write_triton_repository`` copies this file as ``preprocess.py`` with the model's
settings filled in (``MODEL_SETTINGS``: labels, ``INPUT.FORMAT``, the test-time resize, the mask size), and
``clearml-serving model add --engine triton --preprocess preprocess.py`` uploads it. It runs in clearml-serving's
inference container, which has numpy and Pillow but neither torch, detectron2, OpenCV nor d2ops: it imports
nothing else (a test checks), and repeats here, in numpy, what d2ops does with those.

clearml-serving 1.3.5 (``clearml_serving/serving/preprocess_service.py``) loads it with ``importlib``
(``BasePreprocessRequest._instantiate_custom_preprocess_cls``), makes one :class:`Preprocess` per process and,
per request, calls ``preprocess(body, state, fn)``, sends what it returns to Triton as the one input
(``TritonPreprocessRequest.process``: ``np.array(data, dtype=float32)``, its shape as the request's) and calls
``postprocess(<the one output as an array>, state, fn)``. The class has no ``process`` (clearml-serving would
call it instead of Triton) and no ``load`` (clearml-serving would download the model into this container).

Requests, as d2ops's custom engine (``d2ops/serving/clearml_engine.py``) takes them, one image each (the
Triton model runs one image per call: ``max_batch_size: 1``):

- ``{"image": <base64>, "threshold": 0.5}`` -> ``{"detections": [shape, ...]}``;
- ``{"images": [<base64>]}`` -> ``{"detections": [[shape, ...]]}`` (more than one image: 422, send each alone);
- the image file's bytes (any content type but JSON) -> ``{"detections": [shape, ...]}``;
- a ``multipart/form-data`` upload of one file (``curl -F data=@img.jpg [-F threshold=0.3]``).

Images are decoded as d2ops decodes them (``d2ops/serving/formats.py``: EXIF orientation applied, 16-bit and
float pixels scaled, frames over 12 Mpx decoded reduced, 60 Mpx refused) and resized as detectron2's
``ResizeShortestEdge([MIN_SIZE_TEST, MIN_SIZE_TEST], MAX_SIZE_TEST)`` does
(``detectron2/data/transforms/augmentation_impl.py`` ``ResizeShortestEdge.get_output_shape``, then
``transform.py`` ``ResizeTransform.apply_image``: PIL bilinear on uint8). The reply is d2ops's CVAT shapes
(``d2ops/serving/replies.py`` ``to_cvat``) after detectron2's postprocessing (``modeling/postprocessing.py``
``detector_postprocess``: boxes scaled to the image and clipped, empty boxes dropped, masks pasted with
``layers/mask_ops.py`` ``paste_masks_in_image``, threshold 0.5), as ``Detector.predict`` gives them.
Bad input raises ``ValueError``, which clearml-serving answers with 422 and the message.

Environment: ``D2OPS_SCORE_THRESHOLD`` (default 0.5).
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import io
import json
import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["MODEL_SETTINGS", "BadInputError", "Preprocess"]

MODEL_SETTINGS: dict[str, Any] = {}  # filled in by d2ops.serving.triton

StatsFn = Callable[[dict[str, Any]], None] | None
REQUEST_EXAMPLE = '{"image": "<base64 of a JPEG or PNG file>", "threshold": 0.5}'
MAX_PIXELS = 60_000_000  # d2ops.serving.formats.DEFAULT_MAX_PIXELS
INFERENCE_PIXELS = 12_000_000  # d2ops.serving.formats.DEFAULT_INFERENCE_PIXELS
_SWAPS_SIDES = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112
_F32 = np.float32


class BadInputError(ValueError):
    """The request cannot be used; the message says why and what to send instead (clearml-serving: 422)."""


# ------------------------------------------------------------------------------------------ decoding


def _threshold(value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BadInputError(f"'threshold' must be a number between 0 and 1, got {type(value).__name__}")
    try:
        threshold = float(value)
    except ValueError:
        raise BadInputError(f"'threshold' must be a number between 0 and 1, got {value!r}") from None
    if not math.isfinite(threshold) or not 0.0 <= threshold <= 1.0:
        raise BadInputError(f"'threshold' must be between 0 and 1, got {value!r}")
    return threshold


def _base64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise BadInputError(f"'image' must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadInputError("'image' is not valid base64: encode the image file's bytes with base64") from None


def _open(data: bytes) -> Image.Image:
    if not data:
        raise BadInputError("empty image: send the bytes of a JPEG or PNG image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise BadInputError(f"image refused as a decompression bomb: {err}") from None
    except UnidentifiedImageError:
        raise BadInputError("the bytes are not an image Pillow can identify: send a JPEG or PNG image") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadInputError(f"the image is truncated or corrupt ({err}); send the complete file") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise BadInputError(f"the image is {width}x{height} pixels: send an image with pixels")
    if width * height > MAX_PIXELS:
        raise BadInputError(
            f"image too large: {width}x{height} pixels is over the limit of {MAX_PIXELS}; downscale it before sending"
        )
    return image


def _to_rgb8(image: Image.Image) -> np.ndarray:
    """As ``d2ops.serving.formats._to_rgb8``: 16/32-bit integers by 65535, floats in [0, 1] by 255."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            low, high = (0.0, 1.0) if values.min() >= 0.0 and values.max() <= 1.0 else (values.min(), values.max())
        elif image.mode == "I" and values.max() > 65535:
            low, high = values.min(), values.max()
        else:
            low, high = 0.0, 65535.0
        if not np.isfinite(values).all():
            raise BadInputError("the image holds NaN or infinite values: send finite pixel values")
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    try:
        return np.asarray(image.convert("RGB"))
    except (ValueError, OSError) as err:
        raise BadInputError(f"cannot convert {image.format} pixels of mode {image.mode} to RGB ({err})") from None


def decode(data: bytes) -> tuple[np.ndarray, int, int]:
    """RGB uint8 pixels (reduced past 12 Mpx, as d2ops decodes) and the upright frame's ``height, width``."""
    image = _open(data)
    width, height = image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        if width * height > INFERENCE_PIXELS:
            factor = math.sqrt(width * height / INFERENCE_PIXELS)
            target = (max(1, math.floor(width / factor)), max(1, math.floor(height / factor)))
            if image.format == "JPEG":
                image.draft("RGB", target)
            image.load()
            if image.size[0] > target[0]:
                image = image.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
        else:
            image.load()
        image = ImageOps.exif_transpose(image)
    except BadInputError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise BadInputError(f"image refused as a decompression bomb: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise BadInputError(f"the image is truncated or corrupt ({err}); send the complete file") from None
    rgb = _to_rgb8(image)
    if orientation in _SWAPS_SIDES:
        width, height = height, width
    return np.ascontiguousarray(rgb), height, width


def _multipart(body: bytes) -> tuple[list[bytes], dict[str, str]] | None:
    """The files and fields of a ``multipart/form-data`` body (boundary read from its first line), or None."""
    first = body.split(b"\n", 1)[0].rstrip(b"\r \t")
    if not first.startswith(b"--") or len(first) < 3 or not body.rstrip().endswith(first + b"--"):
        return None
    header = b'Content-Type: multipart/form-data; boundary="' + first[2:] + b'"\r\n\r\n'
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
    if not message.is_multipart():
        return None
    files: list[bytes] = []
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            files.append(bytes(payload))
        else:
            name = part.get_param("name", header="content-disposition") or ""
            fields[str(name)] = bytes(payload).decode("utf-8", "replace")
    return files, fields


def parse_body(body: Any, default_threshold: float) -> tuple[bytes, float, bool]:
    """``(image bytes, threshold, single)`` of a request; ``single`` when the reply is one list, not [list]."""
    if isinstance(body, bytearray | memoryview):
        body = bytes(body)
    if isinstance(body, str | bytes) and body.lstrip()[:1] in ("{", b"{"):
        try:
            body = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadInputError(f"the body is not valid JSON ({err}); send {REQUEST_EXAMPLE}") from None
    if isinstance(body, dict):
        if ("image" in body) == ("images" in body):
            raise BadInputError(f"send exactly one of 'image' or 'images' (a list of one): {REQUEST_EXAMPLE}")
        threshold = _threshold(body.get("threshold"), default_threshold)
        if "image" in body:
            return _base64(body["image"]), threshold, True
        images = body["images"]
        if not isinstance(images, list) or len(images) != 1:
            count = len(images) if isinstance(images, list) else 0
            raise BadInputError(
                f"'images' must be a list of one base64 string, got {count or type(images).__name__}: this Triton "
                "endpoint runs one image per request, so send each image in its own request"
            )
        return _base64(images[0]), threshold, False
    if isinstance(body, bytes):
        form = _multipart(body) if body.startswith(b"--") else None
        if form is not None:
            files, fields = form
            if len(files) != 1:
                raise BadInputError(
                    f"the form has {len(files)} files: send one image per request (curl -F data=@img.jpg)"
                )
            return files[0], _threshold(fields.get("threshold"), default_threshold), True
        return body, default_threshold, True
    raise BadInputError(f"unsupported body of type {type(body).__name__}; send {REQUEST_EXAMPLE}")


# ------------------------------------------------------------------------------- detectron2 in numpy


def resized_shape(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """``ResizeShortestEdge.get_output_shape`` (detectron2 0.6+), float for float."""
    size = short * 1.0
    scale = size / min(height, width)
    if height < width:
        newh, neww = size, scale * width
    else:
        newh, neww = scale * height, size
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def _interp_weights(coords: np.ndarray, size: int) -> np.ndarray:
    """``[len(coords), size]`` bilinear weights of ``grid_sample`` (align_corners=False, zero padding)."""
    pos = ((coords + _F32(1)) * _F32(size) - _F32(1)) / _F32(2)
    low = np.floor(pos)
    frac = (pos - low).astype(_F32)
    low_i = low.astype(np.int64)
    weights = np.zeros((len(coords), size), _F32)
    rows = np.arange(len(coords))
    for index, weight in ((low_i, _F32(1) - frac), (low_i + 1, frac)):
        inside = (index >= 0) & (index < size)
        weights[rows[inside], index[inside]] = weight[inside]
    return weights


def paste_mask(mask: np.ndarray, box: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Mask probabilities ``M x M`` pasted into the box, at pixel ``rows`` x ``cols``, thresholded at 0.5.

    detectron2's ``_do_paste_mask`` samples the mask at each pixel centre, mapped into the box, with
    ``F.grid_sample(..., align_corners=False)``; the grid is a product of a row and a column vector, so here
    it is ``Wy @ mask @ Wx.T`` in float32 with the same steps. Only a value within float32 rounding of 0.5
    can fall the other way.
    """
    x0, y0, x1, y1 = (_F32(v) for v in box)
    gx = ((cols.astype(_F32) + _F32(0.5)) - x0) / (x1 - x0) * _F32(2) - _F32(1)
    gy = ((rows.astype(_F32) + _F32(0.5)) - y0) / (y1 - y0) * _F32(2) - _F32(1)
    size = mask.shape[-1]
    probs = _interp_weights(gy, size) @ mask.astype(_F32) @ _interp_weights(gx, size).T
    return probs >= _F32(0.5)


def inclusive_box(box: list[float], height: int, width: int) -> tuple[int, int, int, int]:
    """As ``d2ops.model.detector._inclusive_box``: the pixels a box covers, right and bottom inclusive."""
    xtl = min(max(int(np.floor(box[0])), 0), width - 1)
    ytl = min(max(int(np.floor(box[1])), 0), height - 1)
    xbr = min(max(int(np.ceil(box[2])) - 1, xtl), width - 1)
    ybr = min(max(int(np.ceil(box[3])) - 1, ytl), height - 1)
    return xtl, ytl, xbr, ybr


# ------------------------------------------------------------------------- outlines without OpenCV

_RING = ((0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1))  # clockwise from west (y down)
_RING_INDEX = {step: i for i, step in enumerate(_RING)}


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a boolean mask (row runs joined by union-find)."""
    runs: list[tuple[int, int, int]] = []
    for r in range(mask.shape[0]):
        edges = np.flatnonzero(np.diff(np.concatenate(([0], mask[r].astype(np.int8), [0]))))
        runs += [(r, int(s), int(e)) for s, e in zip(edges[0::2], edges[1::2], strict=True)]
    parent = list(range(len(runs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    start_prev, start_cur = 0, 0
    for i, (r, s, e) in enumerate(runs):
        if i > 0 and runs[i - 1][0] != r:
            start_prev, start_cur = start_cur, i
        for j in range(start_prev, start_cur):
            pr, ps, pe = runs[j]
            if pr == r - 1 and s <= pe and ps <= e:  # overlapping or diagonally touching columns
                parent[find(j)] = find(i)
    area: dict[int, int] = {}
    for i, (_, s, e) in enumerate(runs):
        area[find(i)] = area.get(find(i), 0) + e - s
    best = max(area, key=lambda k: area[k])
    out = np.zeros_like(mask, dtype=bool)
    for i, (r, s, e) in enumerate(runs):
        if find(i) == best:
            out[r, s:e] = True
    return out


def _outer_contour(region: np.ndarray) -> list[tuple[int, int]]:
    """The outer border of one 8-connected region, pixel by pixel (Moore-neighbour tracing), as (x, y)."""
    padded = np.pad(region, 1)
    r0, c0 = (int(v) for v in np.argwhere(padded)[0])  # first in raster order: its west neighbour is background
    start, current, back = (r0, c0), (r0, c0), 0
    contour = [start]
    second: tuple[int, int] | None = None
    for _ in range(8 * int(region.sum()) + 8):
        for k in range(1, 9):
            d = (back + k) % 8
            nxt = (current[0] + _RING[d][0], current[1] + _RING[d][1])
            if padded[nxt]:
                break
        else:
            break  # a single pixel
        if current == start and nxt == second:
            contour.pop()  # back at the start, about to repeat the first step
            break
        if second is None:
            second = nxt
        bg = (current[0] + _RING[(d - 1) % 8][0], current[1] + _RING[(d - 1) % 8][1])
        back = _RING_INDEX[(bg[0] - nxt[0], bg[1] - nxt[1])]
        current = nxt
        contour.append(current)
    return [(c - 1, r - 1) for r, c in contour]


def _simplify(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker of a closed curve, split as ``cv2.approxPolyDP(..., closed=True)`` splits it (3 rounds
    of "the point farthest from the last one" give the first chord), then every point more than
    ``tolerance`` from its chord is kept. OpenCV's last pass (dropping nearly collinear vertices) is not
    repeated, so a few more vertices may be kept, each on the traced border."""
    n = len(points)
    if n < 3:
        return points
    start, offset = 0, 0
    for _ in range(3):
        start = (start + offset) % n
        rolled = np.roll(points, -start, axis=0).astype(np.float64)
        offset = int(np.argmax(((rolled[1:] - rolled[0]) ** 2).sum(axis=1))) + 1
    points = np.roll(points, -start, axis=0)
    far = offset
    keep = np.zeros(n, bool)
    keep[[0, far]] = True
    stack = [(0, far), (far, n)]  # index n is point 0 again (closing the curve)
    closed = np.vstack([points, points[:1]]).astype(np.float64)
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        p, q = closed[a], closed[b]
        seg = closed[a + 1 : b]
        d = q - p
        norm = math.hypot(d[0], d[1])
        if norm == 0:
            continue
        dist = np.abs(d[0] * (seg[:, 1] - p[1]) - d[1] * (seg[:, 0] - p[0])) / norm
        i = int(np.argmax(dist))
        if dist[i] > tolerance:
            k = a + 1 + i
            keep[k % n] = True
            stack += [(a, k), (k, b)]
    return points[keep]


def mask_polygon(mask: np.ndarray, offset: tuple[int, int], tolerance: float = 1.0) -> list[float]:
    """The simplified outline of a mask's largest region (``d2ops.model.detector.mask_polygon`` without
    OpenCV: ``findContours(RETR_EXTERNAL)``, the largest, ``approxPolyDP``); [] when under 3 points."""
    if not mask.any():
        return []
    simplified = _simplify(np.asarray(_outer_contour(_largest_region(mask)), np.int64), tolerance)
    if len(simplified) < 3:
        return []
    return (simplified + np.asarray(offset)).astype(float).reshape(-1).tolist()


# -------------------------------------------------------------------------------------- the class


def _settings() -> dict[str, Any]:
    if not MODEL_SETTINGS:
        raise RuntimeError(
            "this is d2ops's template: serve the preprocess.py that d2ops.serving.triton.write_triton_repository "
            "wrote next to the Triton model (it holds the model's labels and input size)"
        )
    return MODEL_SETTINGS


class Preprocess:
    """clearml-serving's pre/post-processing class for the Triton engine (see the module docstring)."""

    def __init__(self) -> None:
        self.settings = _settings()
        self.labels: list[str] = list(self.settings["labels"])
        self.default_threshold = _threshold(os.environ.get("D2OPS_SCORE_THRESHOLD") or None, 0.5)

    def preprocess(self, body: Any, state: dict[str, Any], collect_custom_statistics_fn: StatsFn = None) -> np.ndarray:
        """The Triton input: float32 ``[1, 3, H, W]`` in the model's channel order, resized as detectron2 does."""
        data, threshold, single = parse_body(body, self.default_threshold)
        rgb, frame_h, frame_w = decode(data)
        height, width = rgb.shape[:2]
        short, longest = int(self.settings["min_size_test"]), int(self.settings["max_size_test"])
        new_h, new_w = resized_shape(height, width, short, longest)
        if min(new_h, new_w) < 1:
            raise BadInputError(
                f"the image is {frame_w}x{frame_h} pixels: at the model's input size ({short} short side, {longest} "
                "long side at most) one side would be 0 pixels; crop or pad it to a less extreme aspect ratio"
            )
        resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BILINEAR))
        if self.settings["input_format"] == "BGR":
            resized = resized[:, :, ::-1]
        state.update(
            threshold=threshold,
            single=single,
            decoded=(height, width),
            frame=(frame_h, frame_w),
            resized=(new_h, new_w),
        )
        return np.ascontiguousarray(resized.transpose(2, 0, 1)[None], dtype=np.float32)

    def postprocess(
        self, data: Any, state: dict[str, Any], collect_custom_statistics_fn: StatsFn = None
    ) -> dict[str, Any]:
        """``{"detections": [...]}``: CVAT shapes in the original frame, as d2ops's custom engine replies."""
        shapes = self.shapes(data, state)
        if collect_custom_statistics_fn is not None:
            collect_custom_statistics_fn({"detection_count": len(shapes), "image_count": 1})
        return {"detections": shapes if state.get("single", True) else [shapes]}

    def shapes(self, data: Any, state: dict[str, Any]) -> list[dict[str, Any]]:
        """One CVAT shape per detection with score >= the threshold (``to_cvat`` of ``Detector.predict``)."""
        columns = int(self.settings["output_columns"])
        rows = np.asarray(data[0] if isinstance(data, list | tuple) else data, dtype=_F32)
        if rows.ndim != 3 or rows.shape[0] != 1 or rows.shape[2] != columns:
            raise RuntimeError(f"Triton returned {list(rows.shape)}, expected [1, N, {columns}]: is this its model?")
        rows = rows[0]
        (res_h, res_w), (dec_h, dec_w), (frame_h, frame_w) = state["resized"], state["decoded"], state["frame"]
        # detector_postprocess: Boxes.scale by float32 factors, clip to the image, drop empty boxes
        boxes = rows[:, :4].copy()
        boxes[:, 0::2] *= _F32(dec_w / res_w)
        boxes[:, 1::2] *= _F32(dec_h / res_h)
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, dec_w)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, dec_h)
        scores = rows[:, 4]
        keep = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0) & (scores >= state["threshold"])
        mask_size = self.settings.get("mask_size")
        sx, sy = frame_w / dec_w, frame_h / dec_h
        out = []
        for i in np.flatnonzero(keep):
            x1, y1, x2, y2 = (float(v) for v in boxes[i])
            box = [x1 * sx, y1 * sy, x2 * sx, y2 * sy]
            cls = int(rows[i, 5])
            shape: dict[str, Any] = {"confidence": f"{float(scores[i]):.4f}", "label": self._label(cls)}
            if not mask_size:
                out.append({**shape, "points": box, "type": "rectangle"})
                continue
            mask_box = inclusive_box(box, frame_h, frame_w)
            xtl, ytl, xbr, ybr = mask_box
            # the crop of the frame-sized mask, sampled at the decoded size (d2ops.model.detector._mask_crop)
            cols = np.minimum(((np.arange(xtl, xbr + 1) + 0.5) * dec_w / frame_w).astype(int), dec_w - 1)
            rws = np.minimum(((np.arange(ytl, ybr + 1) + 0.5) * dec_h / frame_h).astype(int), dec_h - 1)
            probs = rows[i, 6:].reshape(mask_size, mask_size)
            crop = paste_mask(probs, boxes[i], rws, cols)
            outline = mask_polygon(crop, (xtl, ytl)) or [box[0], box[1], box[2], box[1], box[2], box[3], box[0], box[3]]
            painted = crop if crop.any() else np.ones_like(crop)  # an empty mask is its box (replies.cvat_mask_points)
            points = [*(painted.astype(np.uint8) * 255).ravel().tolist(), *mask_box]
            out.append({**shape, "mask": points, "points": outline, "type": "mask"})
        return out

    def _label(self, index: int) -> str:
        if not 0 <= index < len(self.labels):
            raise RuntimeError(f"Triton returned class {index}, but the model has {len(self.labels)} labels")
        return self.labels[index]
