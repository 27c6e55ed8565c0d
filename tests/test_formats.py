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
