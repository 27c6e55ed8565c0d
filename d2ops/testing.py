"""Helpers for tests and benchmarks (like ``detectron2.utils.testing``): small real artifacts, fast."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from d2ops.config import load_config
from d2ops.data.registration import RegisteredDataset
from d2ops.data.synthetic import SHAPE_CLASSES
from d2ops.engine.d2config import build_d2_config
from d2ops.model.bundle import build_bundle

__all__ = ["build_production_standin", "build_tiny_bundle", "wait_until_ready"]

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
