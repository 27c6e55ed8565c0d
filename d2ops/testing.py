"""Helpers for tests and benchmarks (like ``detectron2.utils.testing``): small real artifacts, fast."""

from __future__ import annotations

import base64
import functools
import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d2ops.config import load_config
from d2ops.data.registration import RegisteredDataset
from d2ops.data.synthetic import SHAPE_CLASSES
from d2ops.engine.d2config import build_d2_config
from d2ops.model.bundle import build_bundle

__all__ = ["HOSTILE_INPUTS", "HostileInput", "build_production_standin", "build_tiny_bundle", "wait_until_ready"]

_SMOKE_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"


def build_tiny_bundle(
    work: Path, *, seed: int = 0, metadata: dict[str, Any] | None = None, masks: bool = False
) -> Path:
    """A real, loadable model bundle in about a second: the smoke architecture with seeded random weights.

    The score threshold is 0, so its predictions are meaningless but deterministic and never empty:
    what serving tests and benchmarks need (the same boxes in-process and over HTTP). With ``masks``
    it is a Mask R-CNN (``MODEL.MASK_ON``), whose random mask head gives non-empty masks.
    """
    import torch
    from detectron2.modeling import build_model

    d2 = _random_model_config(work, masks)
    torch.manual_seed(seed)
    return _save_bundle(work, build_model(d2), d2, metadata or {"experiment": "tiny", "dataset_identity": "none"})


def build_production_standin(work: Path, calibration_image: Any, *, seed: int = 0, masks: bool = False) -> Path:
    """A bundle of the architecture users deploy: the model zoo's R50-FPN (FrozenBN, 800 px test size), seeded
    random weights made to behave like trained ones, for speed measurements at production size.

    Random weights alone do not serve: through 50 FrozenBN layers at identity statistics the activations
    overflow (no detections), and the classifier's 0.01-std init gives near-tied scores that no two runtimes
    rank alike. So, as in a data-dependent initialisation, one forward pass on ``calibration_image`` (an HxWx3
    uint8 BGR array) sets every FrozenBN's statistics to the batch statistics of its input, and the classifier
    is scaled to logits of standard deviation 2: scores then spread over ~0.3-0.8. The compute is exactly the
    trained model's; only the answers are meaningless. Score threshold 0, so every image carries the full
    ``TEST.DETECTIONS_PER_IMAGE`` through postprocessing.
    """
    import torch
    from detectron2.layers import FrozenBatchNorm2d
    from detectron2.modeling import build_model

    d2 = _random_model_config(work, masks, ["model.overrides={}"])  # the zoo config as it is
    torch.manual_seed(seed)
    model = build_model(d2).eval()

    def batch_statistics(module: Any, inputs: tuple[Any, ...]) -> None:
        module.running_mean.copy_(inputs[0].mean((0, 2, 3)))
        module.running_var.copy_(inputs[0].var((0, 2, 3)))

    logits: list[Any] = []
    hooks = [m.register_forward_pre_hook(batch_statistics) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    classifier = model.roi_heads.box_predictor.cls_score
    hooks.append(classifier.register_forward_hook(lambda _m, _i, out: logits.append(out)))
    height, width = calibration_image.shape[:2]
    image = torch.as_tensor(calibration_image.transpose(2, 0, 1).copy())
    with torch.no_grad():
        model([{"image": image, "height": height, "width": width}])
        for hook in hooks:
            hook.remove()
        scale = 2.0 / float(logits[0].std())
        classifier.weight.mul_(scale)
        classifier.bias.mul_(scale)
    return _save_bundle(work, model, d2, {"experiment": "production-standin", "dataset_identity": "none"})


def _random_model_config(work: Path, masks: bool, overrides: list[str] | None = None) -> Any:
    """The smoke experiment's detectron2 config (with ``overrides``), three shape classes, score threshold 0."""
    cfg = load_config(_SMOKE_CONFIG, ["runtime.device=cpu", *(overrides or [])])
    dataset = RegisteredDataset(
        names={"train": "unused", "val": "unused"}, class_names=list(SHAPE_CLASSES), json_files={}
    )
    d2 = build_d2_config(cfg, dataset, work / "train")
    d2.defrost()
    d2.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    d2.MODEL.MASK_ON = masks
    d2.freeze()
    return d2


def _save_bundle(work: Path, model: Any, d2: Any, metadata: dict[str, Any]) -> Path:
    """``model``'s weights and ``d2`` written under ``work/train``, bundled at ``work/bundle``."""
    from detectron2.checkpoint import DetectionCheckpointer

    train_dir = work / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    DetectionCheckpointer(model, save_dir=str(train_dir)).save("model_final")
    (train_dir / "config.yaml").write_text(d2.dump())
    return build_bundle(
        work / "bundle",
        weights=train_dir / "model_final.pth",
        d2_config=train_dir / "config.yaml",
        labels=list(SHAPE_CLASSES),
        metrics={"bbox": {"AP50": 0.0}},
        metadata=metadata,
    )


def wait_until_ready(port: int, process: Any, log: Path, timeout: float = 120.0) -> None:
    """Wait until the ``d2ops serve`` ``process`` on 127.0.0.1:``port`` answers ``/ready`` with 200; an
    AssertionError with the end of its ``log`` if it exits or is not ready within ``timeout`` seconds."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=10).status_code == 200:
                return
        except httpx.TransportError:  # not listening yet
            pass
        time.sleep(0.1)
    raise AssertionError(f"d2ops serve was not ready within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


# ------------------------------------------------------------------------------ hostile inputs for serving


@dataclass(frozen=True)
class HostileInput:
    """One image a client may send that no front end can serve, and what every refusal must say.

    ``build`` gives the image file's bytes, or a ``str``: the text of CVAT's base64 ``image`` field as sent.
    ``message`` is a phrase every front end's error must contain; ``http_status`` is ``d2ops serve``'s answer.
    ``reaches_cvat_function``: whether a cvat-sdk native function ever sees it; cvat-sdk opens a task's frame
    with ``PIL.Image.open`` (``TaskDataset._load_frame_image_from_server``, cvat-sdk 2.80) and fails itself,
    before any function runs, on bytes Pillow cannot identify.
    """

    name: str
    build: Callable[[], bytes | str]
    message: str
    http_status: int = 400
    reaches_cvat_function: bool = True

    def payload(self) -> bytes | str:
        return _built(self.build)

    def image_field(self) -> str:
        """The value of CVAT's ``{"image": ...}`` field for this input."""
        payload = self.payload()
        return payload if isinstance(payload, str) else base64.b64encode(payload).decode()


@functools.cache
def _built(build: Callable[[], bytes | str]) -> bytes | str:
    return build()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _gray_png(width: int, height: int, *, complete: bool = True) -> bytes:
    """A black 8-bit grayscale PNG written chunk by chunk (fast at any size); ``complete=False`` stops its
    pixel data after the first row, for a size whose pixels would take hundreds of MB to write."""
    rows = height if complete else 1
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(bytes((width + 1) * rows), 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")


def _encoded(array: Any, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _extreme_aspect() -> bytes:
    return _gray_png(4000, 2)


def _truncated_png() -> bytes:
    import numpy as np

    data = _encoded(np.random.default_rng(0).integers(0, 255, size=(64, 64, 3), dtype=np.uint8), "PNG")
    return data[: len(data) // 2]


def _nan_tiff() -> bytes:
    import numpy as np

    return _encoded(np.full((16, 16), np.nan, dtype=np.float32), "TIFF")


def _empty() -> bytes:
    return b""


def _not_an_image() -> bytes:
    return b"this is not an image"


def _svg() -> bytes:
    return b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="9" height="9"/></svg>'


def _bad_base64() -> str:
    return "%%% not base64 %%%"


def _bomb() -> bytes:
    return _gray_png(20_000, 20_000, complete=False)


def _over_max_pixels() -> bytes:
    return _gray_png(9000, 7000)  # 63 Mpx: over d2ops's 60 Mpx limit, under Pillow's bomb warning (89 Mpx)


#: One table of hostile images run through every serving front end (tests/integration/test_front_ends_hostile.py
#: and tests/clearml_runtime/test_clearml_serving_app.py): each must answer its protocol's client error.
HOSTILE_INPUTS: tuple[HostileInput, ...] = (
    HostileInput("extreme-aspect-4000x2", _extreme_aspect, "aspect ratio"),
    HostileInput("empty", _empty, "empty image", reaches_cvat_function=False),
    HostileInput("truncated-png", _truncated_png, "truncated"),
    HostileInput("not-an-image", _not_an_image, "not an image", reaches_cvat_function=False),
    HostileInput("svg", _svg, "not an image", reaches_cvat_function=False),
    HostileInput("bad-base64", _bad_base64, "not valid base64", reaches_cvat_function=False),
    HostileInput("decompression-bomb-20000x20000", _bomb, "decompression bomb", reaches_cvat_function=False),
    HostileInput("over-60-megapixels", _over_max_pixels, "image too large"),
    HostileInput("float-tiff-with-nan", _nan_tiff, "NaN", http_status=415),
)
