"""Batch inference over a folder of images: COCO results JSON plus debug images."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils.visualizer import Visualizer
from tqdm import tqdm

from d2ops.model.detector import Detector
from d2ops.reporting import Reporter
from d2ops.utils.jsonio import write_json

__all__ = ["IMAGE_SUFFIXES", "InferResult", "infer_folder", "list_images"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class InferResult:
    images: int
    detections: int
    predictions_json: str
    coco_results_json: str
    seconds_per_image: float
    runtime: str

    def to_dict(self) -> dict:
        return asdict(self)


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted for a stable order."""
    if not folder.is_dir():
        raise FileNotFoundError(f"inference source {folder} is not a folder; set inference.source")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return images


def _drawn(image_bgr: np.ndarray, instances: Any, labels: list[str]) -> np.ndarray:
    meta = MetadataCatalog.get("__d2ops_infer__")
    if not meta.get("thing_classes"):
        meta.set(thing_classes=labels)
    vis = Visualizer(image_bgr[:, :, ::-1], meta, scale=1.0)
    return vis.draw_instance_predictions(instances).get_image()


def infer_folder(
    detector: Detector,
    folder: Path,
    output_dir: Path,
    *,
    score_threshold: float = 0.5,
    batch_size: int = 4,
    debug_images: int = 8,
    reporter: Reporter | None = None,
) -> InferResult:
    """Predict every image under ``folder``; write ``predictions.coco.json`` and ``coco_results.json``.

    ``predictions.coco.json`` is a complete COCO file (images, categories, scored annotations) that
    CVAT and pycocotools can import; ``coco_results.json`` is the plain COCO results list.
    """
    import time

    reporter = reporter or Reporter()
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = list_images(folder)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    tic = time.perf_counter()
    for start in tqdm(range(0, len(paths), batch_size), desc="infer", unit="batch"):
        batch_paths = paths[start : start + batch_size]
        batch = [read_image(str(p), format="BGR") for p in batch_paths]
        instances = detector.raw(batch)
        for offset, (path, img, inst) in enumerate(zip(batch_paths, batch, instances, strict=True)):
            image_id = start + offset + 1
            inst = inst[inst.scores >= score_threshold]
            images.append(
                {
                    "id": image_id,
                    "file_name": str(path.relative_to(folder)),
                    "height": img.shape[0],
                    "width": img.shape[1],
                }
            )
            for box, score, cls in zip(
                inst.pred_boxes.tensor.tolist(), inst.scores.tolist(), inst.pred_classes.tolist(), strict=True
            ):
                x1, y1, x2, y2 = box
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": int(cls) + 1,
                        "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                        "area": round((x2 - x1) * (y2 - y1), 2),
                        "score": round(float(score), 5),
                        "iscrowd": 0,
                    }
                )
            if image_id <= debug_images:
                reporter.image("debug images", f"{path.name} raw", img[:, :, ::-1].copy(), iteration=0)
                reporter.image(
                    "debug images", f"{path.name} predictions", _drawn(img, inst, detector.labels), iteration=0
                )
    seconds = (time.perf_counter() - tic) / len(paths)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(detector.labels)]
    predictions = output_dir / "predictions.coco.json"
    write_json(predictions, {"images": images, "categories": categories, "annotations": annotations}, indent=None)
    results = output_dir / "coco_results.json"
    keys = ("image_id", "category_id", "bbox", "score")
    write_json(results, [{k: a[k] for k in keys} for a in annotations], indent=None)
    reporter.artifact("predictions", predictions)
    reporter.artifact("coco_results", results)
    log.info("inferred %d images, %d detections, %.3f s/image on %s", len(paths), len(annotations), seconds,
             detector.runtime_name)  # fmt: skip
    return InferResult(len(paths), len(annotations), str(predictions), str(results), seconds, detector.runtime_name)
