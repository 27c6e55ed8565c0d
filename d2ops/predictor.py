"""A batched detectron2 predictor that loads a model bundle (weights, config.yaml, labels).

It is detectron2's DefaultPredictor generalised to a list of images per forward pass, so that
evaluation, batch inference and the serving layer all share one implementation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from d2ops.training import resolve_device

__all__ = ["Detection", "Detector"]

log = logging.getLogger(__name__)


@dataclass
class Detection:
    """One detected object, in absolute pixel coordinates of the input image."""

    label: str
    category_index: int
    score: float
    box: list[float]  # x1, y1, x2, y2
    polygons: list[list[float]] = field(default_factory=list)  # for instance segmentation models

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "score": self.score, "box": self.box}
        if self.polygons:
            out["polygons"] = self.polygons
        return out


def _mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


class Detector:
    """Runs a trained detectron2 model over batches of BGR uint8 images."""

    def __init__(self, d2_cfg: CfgNode, weights: str, labels: Sequence[str], device: str = "auto") -> None:
        cfg = d2_cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = resolve_device(device)
        cfg.MODEL.WEIGHTS = weights
        cfg.freeze()
        if len(labels) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise ValueError(
                f"the model has {cfg.MODEL.ROI_HEADS.NUM_CLASSES} classes but {len(labels)} labels were given"
            )
        self.cfg = cfg
        self.labels = list(labels)
        self.model = build_model(cfg).eval()
        DetectionCheckpointer(self.model).load(weights)
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, device: str = "auto") -> Detector:
        """Load a bundle written by :func:`d2ops.registry.build_bundle`."""
        bundle_dir = Path(bundle_dir)
        missing = [n for n in ("model_final.pth", "config.yaml", "labels.json") if not (bundle_dir / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{bundle_dir} is not a model bundle: missing {', '.join(missing)}")
        cfg = get_cfg()
        cfg.set_new_allowed(True)
        cfg.merge_from_file(str(bundle_dir / "config.yaml"))
        labels = json.loads((bundle_dir / "labels.json").read_text())
        return cls(cfg, str(bundle_dir / "model_final.pth"), labels, device)

    def _inputs(self, image: np.ndarray) -> dict[str, Any]:
        if self.input_format == "RGB":
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        resized = self.aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        return {"image": tensor, "height": height, "width": width}

    @torch.inference_mode()
    def raw(self, images: Sequence[np.ndarray]) -> list[Any]:
        """detectron2 ``Instances`` per image (on the CPU)."""
        outputs = self.model([self._inputs(img) for img in images])
        return [out["instances"].to("cpu") for out in outputs]

    def predict(self, images: Sequence[np.ndarray], score_threshold: float = 0.0) -> list[list[Detection]]:
        """Detections per image with score >= ``score_threshold``."""
        results = []
        for inst in self.raw(images):
            keep = inst.scores >= score_threshold
            inst = inst[keep]
            masks = inst.pred_masks.numpy() if inst.has("pred_masks") else None
            dets = []
            for i, (box, score, cls) in enumerate(
                zip(inst.pred_boxes.tensor.tolist(), inst.scores.tolist(), inst.pred_classes.tolist(), strict=True)
            ):
                polygons = _mask_to_polygons(masks[i]) if masks is not None else []
                dets.append(Detection(self.labels[cls], int(cls), float(score), [float(v) for v in box], polygons))
            results.append(dets)
        return results
