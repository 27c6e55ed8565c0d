"""Datasets: a synthetic COCO generator for demos and tests, and detectron2 registration.

Two on-disk layouts are supported, one folder per split:
- ``coco``: Roboflow-style, ``<split>/_annotations.coco.json`` with the images beside it;
- ``via``: VGG Image Annotator, ``<split>/via_region_data.json`` (the detectron2 balloon tutorial).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from d2ops.config import DataConfig
from d2ops.data.overlap import image_digests, inside_split, listed_images
from d2ops.utils.jsonio import write_json

__all__ = [
    "CocoCategories",
    "RegisteredDataset",
    "carved_val_images",
    "coco_categories",
    "dataset_classes",
    "load_via_dicts",
    "register_splits",
    "via_label_note",
]

log = logging.getLogger(__name__)


def load_via_dicts(
    split_dir: Path, annotation_file: str, class_names: list[str], label_attribute: str | None
) -> list[dict]:
    """Convert a VIA polygon file into detectron2 dataset dicts (boxes plus polygon masks)."""
    from detectron2.structures import BoxMode

    entries: dict[str, Any] = json.loads((split_dir / annotation_file).read_text())
    records = []
    for idx, entry in enumerate(entries.values()):
        path = split_dir / entry["filename"]
        with Image.open(path) as img:
            width, height = img.size
        regions = entry["regions"].values() if isinstance(entry["regions"], dict) else entry["regions"]
        objs = []
        for region in regions:
            shape = region["shape_attributes"]
            if shape["name"] == "rect":
                x, y, w, h = shape["x"], shape["y"], shape["width"], shape["height"]
                xs, ys = [x, x + w, x + w, x], [y, y, y + h, y + h]
            else:
                xs, ys = shape["all_points_x"], shape["all_points_y"]
            poly = [float(v) + 0.5 for xy in zip(xs, ys, strict=True) for v in xy]
            label = region.get("region_attributes", {}).get(label_attribute) if label_attribute else class_names[0]
            objs.append(
                {
                    "bbox": [min(xs), min(ys), max(xs), max(ys)],
                    "bbox_mode": BoxMode.XYXY_ABS,
                    "segmentation": [poly],
                    "category_id": class_names.index(label),
                }
            )
        records.append({"file_name": str(path), "image_id": idx, "height": height, "width": width, "annotations": objs})
    return records


@dataclass(frozen=True)
class RegisteredDataset:
    """The detectron2 catalog names of a dataset's splits and its class list.

    ``json_files`` are the COCO files detectron2 and the evaluation read: the split's own file, or a
    cleaned copy without the categories :func:`coco_categories` drops. ``notes`` say where the class
    list came from (dropped categories, empty ones, the one label of a single-class VIA dataset); they
    are logged at WARNING and recorded in the dataset manifest.
    """

    names: dict[str, str]
    class_names: list[str]
    json_files: dict[str, str]
    notes: tuple[str, ...] = ()

    def name(self, role: str) -> str:
        if role not in self.names:
            raise KeyError(f"dataset split {role!r} is not configured; known: {sorted(self.names)}")
        return self.names[role]


@dataclass(frozen=True)
class CocoCategories:
    """The classes of a COCO dataset: what is kept, what is dropped and why."""

    kept: list[dict[str, Any]]
    dropped: list[dict[str, Any]]
    notes: tuple[str, ...]

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.kept]


def coco_categories(split_files: dict[str, Path]) -> CocoCategories:
    """Decide the classes of a COCO dataset from all of its split files.

    Roboflow's COCO export writes its project as category 0: the supercategory of every real class,
    with no annotation. It is not a class, and is dropped with a warning that names it. Any other
    category with no annotation in any split is kept (the model gets an output for it that never
    learns), with a warning that says so.
    """
    datas = {role: json.loads(path.read_text()) for role, path in split_files.items()}
    first = next(iter(datas.values()))
    categories = sorted(first.get("categories", []), key=lambda c: c["id"])
    used = {a["category_id"] for data in datas.values() for a in data.get("annotations", [])}
    parents = {c.get("supercategory") for c in categories}
    kept, dropped, notes = [], [], []
    for cat in categories:
        if cat["id"] in used:
            kept.append(cat)
            continue
        children = sorted(c["name"] for c in categories if c.get("supercategory") == cat["name"] and c is not cat)
        if cat["name"] in parents and children:
            dropped.append(cat)
            notes.append(
                f"category {cat['id']} {cat['name']!r} is dropped: it has no annotations and is the supercategory "
                f"of {', '.join(map(repr, children[:5]))}{', ...' if len(children) > 5 else ''} (Roboflow writes "
                "the project as one), so it is not a class"
            )
        else:
            kept.append(cat)
            notes.append(
                f"category {cat['id']} {cat['name']!r} has no annotations in any split: it stays class "
                f"{len(kept)} of the model, which will never learn to predict it; remove it from the export if "
                "it is not a class"
            )
    return CocoCategories(kept=kept, dropped=dropped, notes=tuple(notes))


def via_label_note(data: DataConfig) -> str | None:
    """Where a VIA dataset's labels come from when no region attribute holds them."""
    if data.format != "via" or data.label_attribute or not data.class_names:
        return None
    return (
        f"every VIA region is labelled {data.class_names[0]!r}: data.label_attribute is null, so the dataset is "
        f"single-class and its one class is data.class_names[0]; if that is not what the data shows, set "
        f"data.class_names=[<your class>] (or data.label_attribute to the region attribute holding each class)"
    )


def _classes(json_files: dict[str, Path], data: DataConfig) -> tuple[list[str], list[str], set[int]]:
    """Class names, notes on where they came from, and the COCO category ids to drop."""
    if data.format == "coco":
        categories = coco_categories(json_files)
        return categories.class_names, list(categories.notes), {c["id"] for c in categories.dropped}
    note = via_label_note(data)
    return list(data.class_names or []), [note] if note else [], set()


def dataset_classes(root: Path, data: DataConfig) -> tuple[list[str], list[str]]:
    """The class list a dataset trains, and the notes on how it was decided (no detectron2 import)."""
    json_files = {role: root / folder / data.annotation_file for role, folder in data.folders.items()}
    class_names, notes, _ = _classes({r: p for r, p in json_files.items() if p.is_file()}, data)
    return class_names, notes


def carved_val_images(root: Path, data: DataConfig) -> list[str]:
    """The train images that form the val split when ``data.val_fraction`` is set (else empty).

    Seeded and independent of file order: images are ranked by the hash of ``val_seed`` and their name,
    and the first ``round(n * val_fraction)`` go to val (at least one, and at least one left to train).
    Byte-identical images (one photo exported twice under two names) go to the same side, together:
    a carve never puts a training image into val.
    """
    if data.val_fraction is None:
        return []

    train_dir = root / data.splits["train"]
    names = sorted(set(listed_images(train_dir, data.annotation_file, data.format)))
    if len(names) < 2:
        return []
    count = min(max(1, round(len(names) * data.val_fraction)), len(names) - 1)
    safe = [n for n in names if inside_split(train_dir, n)]  # a hostile name is its own group (validation refuses it)
    digest = dict(zip(safe, image_digests([train_dir / n for n in safe]), strict=True))
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(digest.get(name) or f"name:{name}", []).append(name)
    rank = {name: hashlib.sha256(f"{data.val_seed}/{name}".encode()).hexdigest() for name in names}
    val: list[str] = []
    for members in sorted(groups.values(), key=lambda group: min(rank[n] for n in group)):
        if len(val) >= count:
            break
        if len(val) + len(members) <= count or (not val and len(members) < len(names)):
            val += members
    if not val:
        raise ValueError(
            f"data.val_fraction: every image in {train_dir} is byte-identical to every other, so no val split can "
            "be carved that shares no image with train; add a val split folder (data.splits.val)"
        )
    return sorted(val)


def _derived_coco(json_file: Path, cache: Path, drop: set[int], images: Collection[str] | None, exclude: bool) -> Path:
    """A copy of ``json_file`` without the ``drop`` categories, and with only (``exclude``: without) the
    ``images`` named, content-addressed under ``cache``: the export itself is never changed."""
    raw = json_file.read_bytes()
    recipe = repr((sorted(drop), sorted(images) if images is not None else None, exclude)).encode()
    target = cache / hashlib.sha256(raw + recipe).hexdigest()[:16] / json_file.name
    if not target.is_file():
        data = json.loads(raw)
        data["categories"] = [c for c in data.get("categories", []) if c["id"] not in drop]
        if images is not None:
            data["images"] = [i for i in data["images"] if (i["file_name"] in images) != exclude]
            kept = {i["id"] for i in data["images"]}
            data["annotations"] = [a for a in data.get("annotations", []) if a["image_id"] in kept]
        target.parent.mkdir(parents=True, exist_ok=True)
        write_json(target, data, indent=None)
    return target


def _via_subset(
    split_dir: Path,
    annotation_file: str,
    class_names: list[str],
    label_attribute: str | None,
    images: frozenset[str] | None,
    exclude: bool,
) -> list[dict]:
    records = load_via_dicts(split_dir, annotation_file, class_names, label_attribute)
    if images is None:
        return records
    return [r for r in records if (Path(r["file_name"]).relative_to(split_dir).as_posix() in images) != exclude]


def register_splits(root: Path, data: DataConfig, prefix: str = "d2ops") -> RegisteredDataset:
    """Register every configured split in detectron2's DatasetCatalog (idempotently).

    COCO splits go through detectron2's own ``register_coco_instances`` so its COCOEvaluator
    can use the JSON (a derived copy when :func:`coco_categories` drops a category, or when val is
    carved from train by ``data.val_fraction``); VIA splits are converted by :func:`load_via_dicts`.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    split_dirs = {role: root / folder for role, folder in data.folders.items() if (root / folder).is_dir()}
    json_files = {role: split_dir / data.annotation_file for role, split_dir in split_dirs.items()}
    class_names, notes, drop = _classes(json_files, data)
    subsets: dict[str, tuple[frozenset[str] | None, bool]] = {role: (None, False) for role in split_dirs}
    carved = frozenset(carved_val_images(root, data))
    if carved and "train" in split_dirs:
        split_dirs["val"], json_files["val"] = split_dirs["train"], json_files["train"]
        subsets.update(train=(carved, True), val=(carved, False))
        log.info("val split: %d train images carved out (data.val_fraction %s, seed %d)", len(carved),
                 data.val_fraction, data.val_seed)  # fmt: skip
    if data.format == "coco" and (drop or carved):
        cache = Path(data.cache_dir) / "annotations"
        json_files = {role: _derived_coco(path, cache, drop, *subsets[role]) for role, path in json_files.items()}
    for note in notes:
        log.warning("%s", note)
    names: dict[str, str] = {}
    for role, split_dir in split_dirs.items():
        key = f"{split_dir.resolve()}|{json_files[role]}|{sorted(subsets[role][0] or [])}|{subsets[role][1]}"
        name = names[role] = f"{prefix}_{role}_{hashlib.sha1(key.encode()).hexdigest()[:10]}"
        if name in DatasetCatalog.list():
            continue
        if data.format == "coco":
            register_coco_instances(name, {}, str(json_files[role]), str(split_dir))
        else:
            assert data.class_names is not None  # guaranteed by DataConfig validation
            loader = partial(_via_subset, split_dir, data.annotation_file, data.class_names, data.label_attribute)
            DatasetCatalog.register(name, partial(loader, *subsets[role]))
            MetadataCatalog.get(name).set(thing_classes=list(data.class_names), evaluator_type="coco")
    for name in names.values():
        meta = MetadataCatalog.get(name)
        if not meta.get("thing_classes"):
            meta.set(thing_classes=class_names)
    return RegisteredDataset(
        names=names,
        class_names=class_names,
        json_files={role: str(path) for role, path in json_files.items()},
        notes=tuple(notes),
    )
