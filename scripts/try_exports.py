"""Run the shipped roboflow.yaml and balloon.yaml end to end on one CPU, on exports made here.

No dataset can be downloaded on an offline machine, so this writes two datasets in the exact
layouts the real exports come in, serves them from a local S3 endpoint (moto on 127.0.0.1) and
runs ``pipelines/run_pipeline.py --offline`` on each shipped config, with only the overrides a
CPU and the missing pretrained weights need (printed before each run):

- ``cells``: a Roboflow "COCO JSON" export shaped like its blood-cell dataset: ``train/``,
  ``valid/``, ``test/`` each with ``_annotations.coco.json``; category 0 is the project
  (``cells``, supercategory ``none``, no annotations) and parent of ``Platelets``, ``RBC`` and
  ``WBC``; files renamed ``BloodImage_00001_jpg.rf.<hash>.jpg``; Roboflow's README files at the top.
- ``droplets``: a VIA export in the balloon layout: ``train/`` and ``val/`` each with
  ``via_region_data.json`` (polygons, ``region_attributes`` empty, keys ``<filename><size>``).

    .venv/bin/python scripts/try_exports.py [--only cells|droplets] [--out outputs/try-exports]

Each run ends with the offline summary and leaves ``summary.json`` and ``report.html`` in
``<out>/<dataset>/run``. The figures of the last run are in the closing notes, not here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from d2ops.storage import s3 as storage  # noqa: E402
from d2ops.storage.local_s3 import local_s3_endpoint  # noqa: E402

# From scratch (no COCO weights reachable): a ResNet-18 FPN with group norm, as configs/smoke.yaml,
# at the exports' small image sizes; on a GPU with the mirrored weights none of these are needed.
FROM_SCRATCH = [
    "model.weights=None",
    "model.overrides.MODEL.RESNETS.DEPTH=18",
    "model.overrides.MODEL.RESNETS.RES2_OUT_CHANNELS=64",
    "model.overrides.MODEL.RESNETS.NORM=GN",
    "model.overrides.MODEL.FPN.NORM=GN",
    "model.overrides.MODEL.FPN.OUT_CHANNELS=128",
    "model.overrides.MODEL.BACKBONE.FREEZE_AT=0",
    "solver.base_lr=0.005",
]
CPU = ["runtime.device=cpu", "solver.num_workers=0", "solver.steps=[]"]

RUNS = {
    "cells": (
        "configs/roboflow.yaml",
        [
            "model.overrides.INPUT.MIN_SIZE_TRAIN=[192]",
            "model.overrides.INPUT.MAX_SIZE_TRAIN=192",
            "model.overrides.INPUT.MIN_SIZE_TEST=192",
            "model.overrides.INPUT.MAX_SIZE_TEST=192",
            "solver.max_iter=500",
            "solver.warmup_iters=50",
            "solver.checkpoint_period=250",
            "solver.eval_period=250",
        ],
    ),
    "droplets": (
        "configs/balloon.yaml",
        [
            "model.overrides.INPUT.MIN_SIZE_TRAIN=[192]",
            "model.overrides.INPUT.MAX_SIZE_TRAIN=256",
            "model.overrides.INPUT.MIN_SIZE_TEST=192",
            "model.overrides.INPUT.MAX_SIZE_TEST=256",
            "solver.max_iter=400",
            "solver.ims_per_batch=4",
            "solver.checkpoint_period=200",
            "solver.eval_period=200",
        ],
    ),
}


def _noise_background(
    rng: random.Random, size: tuple[int, int], base: tuple[int, int, int], sigma: float
) -> Image.Image:
    w, h = size
    gen = np.random.default_rng(rng.randint(0, 2**31))
    img = np.array(base, dtype=np.float32)[None, None, :] + gen.normal(0, sigma, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))


def _blob(rng: random.Random, cx: float, cy: float, r: float, vertices: int = 24) -> list[tuple[float, float]]:
    """An irregular closed outline around (cx, cy): a droplet or a cell, never a perfect circle."""
    phases = [rng.uniform(0, 2 * math.pi) for _ in range(3)]
    points = []
    for k in range(vertices):
        t = 2 * math.pi * k / vertices
        wobble = 1 + 0.08 * math.sin(2 * t + phases[0]) + 0.05 * math.sin(3 * t + phases[1])
        wobble += 0.04 * math.sin(5 * t + phases[2])
        points.append((round(cx + r * wobble * math.cos(t), 1), round(cy + r * 0.9 * wobble * math.sin(t), 1)))
    return points


Box = tuple[float, float, float, float]


def _free(box: Box, taken: list[Box]) -> bool:
    x0, y0, x1, y1 = box
    return all(x1 <= a0 or a1 <= x0 or y1 <= b0 or b1 <= y0 for a0, b0, a1, b1 in taken)


def _place(
    rng: random.Random,
    size: tuple[int, int],
    r: float,
    taken: list[Box],
    *,
    margin: int,
    vertices: int = 24,
    whole: bool = False,
) -> tuple[float, float, list[tuple[float, float]], Box] | None:
    """A free spot for an object of radius ``r`` (30 tries): its centre, outline and box, added to ``taken``.
    ``whole``: the box of the outline's whole-pixel points, as VIA stores them."""
    w, h = size
    for _attempt in range(30):
        cx, cy = rng.uniform(r + margin, w - r - margin), rng.uniform(r + margin, h - r - margin)
        outline = _blob(rng, cx, cy, r, vertices)
        xs = [float(int(x)) if whole else x for x, _ in outline]
        ys = [float(int(y)) if whole else y for _, y in outline]
        box = (min(xs), min(ys), max(xs), max(ys))
        if _free(box, taken):
            taken.append(box)
            return cx, cy, outline, box
    return None


CELL_CLASSES = {"Platelets": 1, "RBC": 2, "WBC": 3}


def cells_export(root: Path, seed: int = 7) -> Path:
    """A Roboflow COCO export of blood-cell smears (category 0 the project, .rf. file names)."""
    rng = random.Random(seed)
    counts = {"train": 210, "valid": 30, "test": 30}
    (root).mkdir(parents=True, exist_ok=True)
    (root / "README.roboflow.txt").write_text("Exported via roboflow.com (layout only; images made by d2ops).\n")
    (root / "README.dataset.txt").write_text("# cells\nA synthetic stand-in for a blood-cell export.\n")
    number = 0
    for split, count in counts.items():
        split_dir = root / split
        split_dir.mkdir()
        images, annotations = [], []
        for i in range(count):
            number += 1
            size = 192
            img = _noise_background(rng, (size, size), (236, 204, 206), 9)
            draw = ImageDraw.Draw(img)
            taken: list[Box] = []
            wanted = [("WBC", rng.randint(0, 1)), ("Platelets", rng.randint(0, 3)), ("RBC", rng.randint(3, 9))]
            for name, n in wanted:
                for _ in range(n):
                    low, high = {"WBC": (20, 28), "RBC": (11, 15), "Platelets": (3.5, 5.5)}[name]
                    r = rng.uniform(low, high)
                    placed = _place(rng, (size, size), r, taken, margin=1)
                    if placed is None:
                        continue
                    cx, cy, outline, box = placed
                    if name == "RBC":
                        draw.polygon(outline, fill=(205, 92, 104))
                        draw.ellipse([cx - r * 0.45, cy - r * 0.4, cx + r * 0.45, cy + r * 0.4], fill=(225, 140, 148))
                    elif name == "WBC":
                        draw.polygon(outline, fill=(200, 170, 210))
                        for lobe in range(3):
                            a = 2 * math.pi * lobe / 3 + rng.uniform(0, 1)
                            lx, ly = cx + 0.35 * r * math.cos(a), cy + 0.35 * r * math.sin(a)
                            draw.polygon(_blob(rng, lx, ly, r * 0.38, 12), fill=(96, 48, 140))
                    else:
                        draw.polygon(outline, fill=(120, 70, 150))
                    w, h = box[2] - box[0], box[3] - box[1]
                    annotations.append({
                        "id": len(annotations), "image_id": i, "category_id": CELL_CLASSES[name],
                        "bbox": [round(box[0], 1), round(box[1], 1), round(w, 1), round(h, 1)],
                        "area": round(w * h, 2), "segmentation": [], "iscrowd": 0,
                    })  # fmt: skip
            stem = f"BloodImage_{number:05d}"
            name = f"{stem}_jpg.rf.{hashlib.md5(stem.encode()).hexdigest()}.jpg"
            img.save(split_dir / name, quality=90)
            images.append({"id": i, "license": 1, "file_name": name, "height": size, "width": size,
                           "date_captured": "2026-12-06T00:00:00+00:00"})  # fmt: skip
        categories = [{"id": 0, "name": "cells", "supercategory": "none"}]
        categories += [{"id": cid, "name": n, "supercategory": "cells"} for n, cid in CELL_CLASSES.items()]
        coco = {
            "info": {"year": "2026", "version": "1", "description": "Exported from roboflow.com"},
            "licenses": [{"id": 1, "url": "https://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"}],
            "categories": categories, "images": images, "annotations": annotations,
        }  # fmt: skip
        (split_dir / "_annotations.coco.json").write_text(json.dumps(coco))
    return root


def droplets_export(root: Path, seed: int = 11) -> Path:
    """A VIA export in the balloon layout: polygon regions with empty region_attributes."""
    rng = random.Random(seed)
    for split, count in (("train", 70), ("val", 14)):
        split_dir = root / split
        split_dir.mkdir(parents=True)
        entries = {}
        for i in range(count):
            w, h = 256, 192
            base = (rng.randint(60, 140), rng.randint(80, 150), rng.randint(60, 120))
            img = _noise_background(rng, (w, h), base, 14)
            draw = ImageDraw.Draw(img, "RGBA")
            taken: list[Box] = []
            regions = {}
            for _ in range(rng.randint(1, 4)):
                r = rng.uniform(16, 40)
                placed = _place(rng, (w, h), r, taken, margin=2, vertices=28, whole=True)
                if placed is None:
                    continue
                cx, cy, outline, _ = placed
                xs, ys = [int(x) for x, _ in outline], [int(y) for _, y in outline]
                draw.polygon(list(zip(xs, ys, strict=True)), fill=(170, 200, 255, 210), outline=(230, 240, 255, 255))
                draw.ellipse([cx - r * 0.5, cy - r * 0.6, cx - r * 0.15, cy - r * 0.25], fill=(250, 250, 255, 230))
                regions[str(len(regions))] = {
                    "shape_attributes": {"name": "polygon", "all_points_x": xs, "all_points_y": ys},
                    "region_attributes": {},
                }
            name = f"{rng.getrandbits(40):010x}_{i}.jpg"
            img.save(split_dir / name, quality=90)
            size = (split_dir / name).stat().st_size
            entries[f"{name}{size}"] = {"fileref": "", "size": size, "filename": name, "base64_img_data": "",
                                        "file_attributes": {}, "regions": regions}  # fmt: skip
        (split_dir / "via_region_data.json").write_text(json.dumps(entries))
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(RUNS))
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "try-exports")
    args = parser.parse_args()
    out = args.out.resolve()
    makers = {"cells": cells_export, "droplets": droplets_export}
    failed = 0
    with local_s3_endpoint(in_process=False) as s3:
        boto3.client("s3", endpoint_url=s3.endpoint_url).create_bucket(Bucket="clearml")  # clearml.output_uri
        for name in [args.only] if args.only else list(RUNS):
            config, overrides = RUNS[name]
            work = out / name
            shutil.rmtree(work, ignore_errors=True)
            dataset = makers[name](work / "export")
            uri = s3.uri("datasets", f"{name}/")
            storage.upload(dataset, uri, create_bucket=True, progress=False)
            sets = [
                *CPU, *FROM_SCRATCH, *overrides,
                f"clearml.output_uri={s3.uri('clearml')}",
                f"data.cache_dir={work / 'cache'}",
                f"runtime.output_dir={work / 'run'}",
                f"registry.local_dir={work / 'registry'}",
            ]  # fmt: skip
            command = [sys.executable, "pipelines/run_pipeline.py", "--offline", "--config", config]
            command += ["--dataset-uri", uri]
            for item in sets:
                command += ["--set", item]
            print(f"\n=== {name}: {config} on {uri}\n    --set " + "\n    --set ".join(sets), flush=True)
            env = {**os.environ, "CLEARML_CACHE_DIR": str(work / "clearml"), "CLEARML_OFFLINE_MODE": "1"}
            failed += subprocess.run(command, cwd=REPO, env=env, check=False).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
