"""The synthetic demo dataset: coloured squares, circles and triangles on noisy backgrounds, in COCO format."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

__all__ = ["generate_shapes_dataset"]


SHAPE_CLASSES = ("square", "circle", "triangle")


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], color: tuple[int, ...]) -> None:
    x0, y0, x1, y1 = box
    if kind == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=color)
    elif kind == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=color)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=color)


def _overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    x0, y0, x1, y1 = box
    return any(not (x1 <= a0 or a1 <= x0 or y1 <= b0 or b1 <= y0) for a0, b0, a1, b1 in others)


def _background(rng: random.Random, size: int) -> Image.Image:
    """A smooth random gradient with mild noise, so shapes sit on a non-trivial background."""
    c0 = np.array([rng.randint(0, 120) for _ in range(3)], dtype=np.float32)
    c1 = np.array([rng.randint(0, 120) for _ in range(3)], dtype=np.float32)
    t = np.linspace(0, 1, size, dtype=np.float32)[None, :, None]
    grad = c0 * (1 - t) + c1 * t
    img = np.repeat(grad, size, axis=0)
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8))


def _make_split(root: Path, split: str, count: int, size: int, rng: random.Random, start_id: int) -> None:
    split_dir = root / split
    split_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = start_id
    for i in range(count):
        img = _background(rng, size)
        draw = ImageDraw.Draw(img)
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(rng.randint(1, 3)):
            for _attempt in range(20):
                side = rng.randint(size // 5, size // 2)
                x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
                box = (x0, y0, x0 + side, y0 + side)
                if not _overlaps(box, boxes):
                    break
            else:
                continue
            boxes.append(box)
            cls = rng.randrange(len(SHAPE_CLASSES))
            color = tuple(rng.randint(150, 255) for _ in range(3))
            _draw_shape(draw, SHAPE_CLASSES[cls], box, color)
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": start_id + i,
                    "category_id": cls + 1,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "area": (box[2] - box[0]) * (box[3] - box[1]),
                    "iscrowd": 0,
                }
            )
            ann_id += 1
        name = f"{split}_{i:04d}.jpg"
        img.save(split_dir / name, quality=92)
        images.append({"id": start_id + i, "file_name": name, "width": size, "height": size})
    coco = {
        "info": {"description": "d2ops synthetic shapes", "version": "1"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(SHAPE_CLASSES)],
    }
    (split_dir / "_annotations.coco.json").write_text(json.dumps(coco))


def generate_shapes_dataset(
    root: str | Path,
    *,
    counts: dict[str, int] | None = None,
    image_size: int = 128,
    seed: int = 0,
) -> Path:
    """Write a small synthetic COCO dataset (squares, circles, triangles on gradients).

    The layout is Roboflow's: ``train/``, ``valid/``, ``test/`` each with ``_annotations.coco.json``.
    """
    root = Path(root)
    counts = counts or {"train": 60, "valid": 12, "test": 20}
    rng = random.Random(seed)
    for offset, (split, count) in enumerate(counts.items()):
        _make_split(root, split, count, image_size, rng, start_id=1 + offset * 100_000)
    log.info("wrote synthetic dataset to %s (%s)", root, counts)
    return root
