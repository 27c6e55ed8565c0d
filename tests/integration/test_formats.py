"""Image decoding for serving (every bad-input case) and the CVAT / TorchServe reply formats."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from d2ops.model.detector import Detection
from d2ops.serving.formats import BadImageError, decode_base64_image, decode_image
from d2ops.serving.replies import to_cvat, to_torchserve


def _jpeg(width: int = 64, height: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def test_decodes_to_bgr() -> None:
    image = decode_image(_jpeg())
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8
    assert image[0, 0, 1] > 150 and image[0, 0, 2] < 60  # green stays in channel 1, red is channel 2


def test_base64_and_data_url() -> None:
    encoded = base64.b64encode(_jpeg()).decode()
    assert decode_base64_image(encoded).shape == (48, 64, 3)
    assert decode_base64_image("data:image/jpeg;base64," + encoded).shape == (48, 64, 3)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "empty image"),
        (b"definitely not an image", "not an image"),
        (_jpeg()[: len(_jpeg()) // 2], "truncated or corrupt"),
        (b"%PDF-1.4\n%" + b"x" * 100, "not an image"),
    ],
)
def test_bad_bytes_are_refused_with_a_reason(payload: bytes, message: str) -> None:
    with pytest.raises(BadImageError, match=message):
        decode_image(payload)


def test_pixels_that_cannot_be_normalised_are_refused_as_unsupported() -> None:
    from d2ops.serving.formats import UnsupportedFormatError

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), np.inf, dtype=np.float32), mode="F").save(buf, format="TIFF")
    with pytest.raises(UnsupportedFormatError, match="NaN or infinite"):
        decode_image(buf.getvalue())


def test_decompression_bomb_is_refused_from_the_header(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buf, format="PNG")  # 400 Mpx, a few KB compressed
    assert len(buf.getvalue()) < 200_000
    with pytest.raises(BadImageError, match="decompression bomb"):
        decode_image(buf.getvalue())


@pytest.mark.parametrize("value", ["***not base64***", 12, None])
def test_bad_base64_field(value: object) -> None:
    with pytest.raises(BadImageError, match="base64"):
        decode_base64_image(value)


def test_reply_formats() -> None:
    box = Detection("circle", 1, 0.91234, [1.0, 2.0, 30.0, 40.0])
    assert to_cvat([box]) == [
        {"confidence": "0.9123", "label": "circle", "points": [1.0, 2.0, 30.0, 40.0], "type": "rectangle"}
    ]
    assert to_torchserve([box]) == [{"circle": [1.0, 2.0, 30.0, 40.0], "score": 0.91234}]


def _ring_and_island() -> Detection:
    """One object whose mask is a ring (a hole) plus a small island: two outer contours, one inner."""
    mask = np.zeros((20, 30), dtype=bool)
    mask[2:18, 2:18] = True
    mask[7:13, 7:13] = False  # the hole
    mask[8:11, 24:27] = True  # the island
    return Detection("ring", 0, 0.8, [10.0, 20.0, 40.0, 40.0], mask=mask, mask_box=(10, 20, 39, 39))


def test_cvat_mask_reply_is_one_shape_with_its_hole() -> None:
    """CVAT's lambda manager (views.py ``LambdaJob._call_detector``) reads a mask shape's ``mask``: the row-major
    0/255 crop of the inclusive box, then ``[xtl, ytl, xbr, ybr]``; ``points`` is the outline it uses when
    converting masks to polygons. Before, each outer contour was its own polygon and the hole was lost."""
    det = _ring_and_island()
    (reply,) = to_cvat([det])
    assert reply["type"] == "mask" and reply["label"] == "ring" and reply["confidence"] == "0.8000"
    *values, xtl, ytl, xbr, ybr = reply["mask"]
    assert (xtl, ytl, xbr, ybr) == (10, 20, 39, 39) and all(isinstance(v, int) for v in reply["mask"])
    crop = np.asarray(values).reshape(20, 30)
    assert set(values) == {0, 255} and np.array_equal(crop == 255, det.mask)  # hole and island kept
    xs, ys = reply["points"][0::2], reply["points"][1::2]
    assert len(xs) >= 3 and min(xs) >= 12 and max(xs) <= 27 and min(ys) >= 22 and max(ys) <= 37  # the ring


def test_cvat_polygon_reply_is_the_largest_region_simplified() -> None:
    det = _ring_and_island()
    (reply,) = to_cvat([det], shape="polygon")
    assert reply["type"] == "polygon" and "mask" not in reply
    points = reply["points"]
    assert len(points) == 8  # the ring's square outline: 4 corners after approxPolyDP, the island dropped
    assert sorted(set(points[0::2])) == [12.0, 27.0] and sorted(set(points[1::2])) == [22.0, 37.0]


def test_a_segmenting_model_never_sends_a_rectangle_even_for_an_empty_mask() -> None:
    empty = Detection("ring", 0, 0.5, [3.0, 4.0, 9.0, 8.0], mask=np.zeros((4, 6), dtype=bool), mask_box=(3, 4, 8, 7))
    (as_mask,) = to_cvat([empty])
    assert as_mask["type"] == "mask" and as_mask["mask"] == [255] * 24 + [3, 4, 8, 7]  # the box, as a mask
    (as_polygon,) = to_cvat([empty], "polygon")
    assert as_polygon == {**as_polygon, "type": "polygon", "points": [3.0, 4.0, 9.0, 4.0, 9.0, 8.0, 3.0, 8.0]}
    with pytest.raises(ValueError, match="mask, polygon"):
        to_cvat([empty], "ellipse")


def test_tiny_bundle_predicts_deterministically(tiny_bundle: Path) -> None:
    from d2ops.model.detector import Detector

    detector = Detector.from_bundle(tiny_bundle, device="cpu")
    image = decode_image(_jpeg(128, 128))
    first = detector.predict([image])[0]
    again = detector.predict([image, image])
    assert first, "score threshold 0 makes even random weights propose boxes"
    # Batched and single passes agree up to float rounding (batch padding changes BLAS paths).
    for batch in again:
        assert [d.label for d in batch] == [d.label for d in first]
        np.testing.assert_allclose([d.box for d in batch], [d.box for d in first], atol=1e-3)
