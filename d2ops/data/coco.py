"""COCO detection files (as Roboflow exports them): every image, annotation and category checked."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeGuard, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from d2ops.data.checks import (
    UNREADABLE,
    Problems,
    SplitSummary,
    image_size_or_report,
    inspect_images,
    is_number,
    leaves_split,
    load_json,
    log_summary,
    outside,
    short,
)

logger = logging.getLogger(__name__)

__all__ = ["check_coco_split", "validate_coco"]

_COCO_FORMAT_URL = "https://cocodataset.org/#format-data"


def validate_coco(
    split_dir: Path | str,
    annotation_file: str = "_annotations.coco.json",
    *,
    check_images: bool = True,
    max_problems: int = 20,
) -> SplitSummary:
    """Check one COCO split folder (annotation file plus images) and summarise it.

    Raises :class:`DataValidationError` listing the problems found, so bad data is caught
    before any GPU time is spent. ``check_images=False`` skips opening the image files.
    """
    split_dir = Path(split_dir)
    problems = Problems(max_problems)
    summary = check_coco_split(split_dir, annotation_file, split_dir.name, check_images, problems)
    problems.raise_if_any(split_dir / annotation_file)
    assert summary is not None  # no problem recorded means the split could be read
    log_summary(summary)
    return summary


def _finite_number(value: object) -> float:
    if not is_number(value):
        raise PydanticCustomError("number_type", "Input should be a finite number")
    return float(value)


_Number = Annotated[float, BeforeValidator(_finite_number)]


_PositiveInt = Annotated[StrictInt, Field(gt=0)]


_Name = Annotated[StrictStr, Field(min_length=1)]


_Area = Annotated[float, BeforeValidator(_finite_number), Field(ge=0)]


def _inside_split(name: str) -> str:
    if leaves_split(name):
        message = "Input should be a path inside the split folder, not absolute and without '..'"
        raise PydanticCustomError("path_outside_split", message)
    return name


_FileName = Annotated[_Name, AfterValidator(_inside_split)]


class _CocoImage(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: StrictInt
    file_name: _FileName
    width: _PositiveInt
    height: _PositiveInt


class _CocoAnnotation(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: StrictInt
    image_id: StrictInt
    category_id: StrictInt
    bbox: Annotated[list[_Number], Field(min_length=4, max_length=4)]
    segmentation: Any = None
    area: _Area | None = None


class _CocoCategory(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: StrictInt
    name: _Name


_Entry = TypeVar("_Entry", _CocoImage, _CocoAnnotation, _CocoCategory)


_COCO_SECTIONS = ("images", "annotations", "categories")


_SINGULAR = {"images": "image", "annotations": "annotation", "categories": "category"}


_FIELD_FIXES = {
    ("images", "id"): "give the image a unique integer id",
    ("images", "file_name"): "set file_name to the image's path relative to the split folder, inside it "
    "(no absolute path, no '..')",
    ("images", "width"): "set width to the image's width in pixels (a positive integer)",
    ("images", "height"): "set height to the image's height in pixels (a positive integer)",
    ("annotations", "id"): "give the annotation a unique integer id",
    ("annotations", "image_id"): "set image_id to the integer id of an entry in 'images'",
    ("annotations", "category_id"): "set category_id to the integer id of an entry in 'categories'",
    ("annotations", "bbox"): "write bbox as four numbers [x, y, width, height] in pixels",
    ("annotations", "area"): "set area to the object's area in pixels (0 or more), or export the annotations again",
    ("categories", "id"): "give the category a unique integer id",
    ("categories", "name"): "give the category a non-empty class name",
}


@dataclass(frozen=True)
class _CocoContext:
    """What annotations are checked against: the valid entries by id, and every id present.

    Ids of entries that failed their schema still count as present, so one bad image doesn't
    also make all of its annotations look orphaned.
    """

    loc: str
    images: dict[int, _CocoImage]
    categories: dict[int, _CocoCategory]
    image_ids: set[int]
    category_ids: set[int]


def check_coco_split(
    split_dir: Path, annotation_file: str, label: str, check_images: bool, problems: Problems
) -> SplitSummary | None:
    """Run every COCO check on one split; return its summary, or None if it cannot be read."""
    loc = f"{label}/{annotation_file}"
    data = load_json(split_dir / annotation_file, loc, problems, "COCO annotation file")
    if data is UNREADABLE:
        return None
    sections = _coco_sections(data, loc, problems)
    if sections is None:
        return None
    raw_images, raw_annotations, raw_categories = sections
    images = _unique_by_id(_parse_entries(raw_images, _CocoImage, "images", loc, problems), "image", problems)
    annotations = _parse_entries(raw_annotations, _CocoAnnotation, "annotations", loc, problems)
    _unique_by_id(annotations, "annotation", problems)
    parsed_categories = _parse_entries(raw_categories, _CocoCategory, "categories", loc, problems)
    categories = _unique_by_id(parsed_categories, "category", problems)
    _check_categories(categories, raw_categories, loc, problems)
    context = _CocoContext(loc, images, categories, _raw_ids(raw_images), _raw_ids(raw_categories))
    instances = _check_annotations([entry for _, _, entry in annotations], context, problems)
    if check_images:
        _check_coco_images(split_dir, label, images, loc, problems)
    names = [category.name for _, category in sorted(categories.items())]
    return SplitSummary(
        split=label,
        path=str(split_dir),
        format="coco",
        images=len(raw_images),
        annotations=len(raw_annotations),
        categories=names,
        instances_per_category={name: instances.get(name, 0) for name in names},
    )


def _coco_sections(data: Any, loc: str, problems: Problems) -> tuple[list[Any], list[Any], list[Any]] | None:
    """Return the images, annotations and categories lists, or record why they are absent."""
    fix = (
        "the file must be a COCO detection file with 'images', 'annotations' and 'categories' "
        f"lists ({_COCO_FORMAT_URL}); export the split in COCO format again"
    )
    if not isinstance(data, dict):
        problems.add(f"top level is a JSON {type(data).__name__}, not an object", loc, fix)
        return None
    found = []
    for key in _COCO_SECTIONS:
        value = data.get(key)
        if value is None:
            problems.add(f"missing top-level key '{key}'", loc, fix)
        elif not isinstance(value, list):
            problems.add(f"top-level '{key}' is a {type(value).__name__}, not a list", loc, fix)
        else:
            found.append(value)
    if len(found) != len(_COCO_SECTIONS):
        return None
    if not found[0]:
        problems.add(
            "no images in 'images'",
            loc,
            "export the split again with its images, or drop the split from the dataset config",
        )
    return found[0], found[1], found[2]


def _entry_details(raw: Any) -> str:
    """`` (id 3, 'img_003.jpg')``: the id and file name of a raw entry, when it has them."""
    if not isinstance(raw, dict):
        return ""
    details = [f"id {short(raw['id'])}"] if "id" in raw else []
    if isinstance(raw.get("file_name"), str):
        details.append(repr(raw["file_name"]))
    return f" ({', '.join(details)})" if details else ""


def _field_path(loc: tuple[int | str, ...]) -> str:
    """pydantic's error location as a readable path, e.g. ``bbox[2]``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _parse_entries(
    raw_entries: list[Any], model: type[_Entry], section: str, loc: str, problems: Problems
) -> list[tuple[str, str, _Entry]]:
    """Validate each entry against its schema and record one problem per bad field.

    Returns (reference, location, entry) for the valid ones, e.g. ``images[4]`` and
    ``train/_annotations.coco.json: images[4] (id 3, 'img_003.jpg')``.
    """
    parsed: list[tuple[str, str, _Entry]] = []
    for index, raw in enumerate(raw_entries):
        ref = f"{section}[{index}]"
        where = f"{loc}: {ref}{_entry_details(raw)}"
        try:
            parsed.append((ref, where, model.model_validate(raw)))
        except ValidationError as exc:
            _report_schema_errors(exc, section, where, problems)
    return parsed


def _report_schema_errors(exc: ValidationError, section: str, where: str, problems: Problems) -> None:
    kind = _SINGULAR[section]
    default_fix = f"make the entry follow the COCO format ({_COCO_FORMAT_URL})"
    for error in exc.errors(include_url=False):
        field_path = _field_path(error["loc"])
        top = str(error["loc"][0]) if error["loc"] else ""
        if error["type"] == "missing":
            what = f"{kind} is missing required field '{field_path}'"
        elif not field_path:
            what = f"{kind} entry is a {type(error['input']).__name__}, not an object"
        else:
            what = f"{kind} field '{field_path}' is invalid: {error['msg']} (got {short(error['input'])})"
        problems.add(what, where, _FIELD_FIXES.get((section, top), default_fix))


def _unique_by_id(entries: list[tuple[str, str, _Entry]], kind: str, problems: Problems) -> dict[int, _Entry]:
    """Map each id to its first entry; record every later entry that reuses the id."""
    by_id: dict[int, _Entry] = {}
    first_ref: dict[int, str] = {}
    for ref, where, entry in entries:
        if entry.id not in by_id:
            by_id[entry.id] = entry
            first_ref[entry.id] = ref
            continue
        problems.add(
            f"duplicate {kind} id {entry.id} (already used by {first_ref[entry.id]})",
            where,
            f"give every {kind} its own id; ids must not repeat",
        )
    return by_id


def _raw_ids(raw_entries: list[Any]) -> set[int]:
    """Integer ids of all entries, including those that failed their schema."""
    return {
        raw["id"]
        for raw in raw_entries
        if isinstance(raw, dict) and isinstance(raw.get("id"), int) and not isinstance(raw["id"], bool)
    }


def _check_categories(categories: dict[int, _CocoCategory], raw: list[Any], loc: str, problems: Problems) -> None:
    """A COCO split needs at least one category, and each class name once."""
    if not raw:
        problems.add(
            "no categories: 'categories' is empty",
            loc,
            'add one entry per class to \'categories\', e.g. {"id": 1, "name": "balloon"}, or export the split again',
        )
    counts = Counter(category.name for category in categories.values())
    for name, count in counts.items():
        if count > 1:
            problems.add(
                f"category name {name!r} is used by {count} category ids",
                f"{loc}: categories",
                "merge them into one category, or give each its own class name",
            )


def _check_annotations(annotations: list[_CocoAnnotation], context: _CocoContext, problems: Problems) -> Counter[str]:
    """Check references, boxes and polygons; return the number of instances per class name."""
    instances: Counter[str] = Counter()
    for annotation in annotations:
        image = context.images.get(annotation.image_id)
        file_part = f", {image.file_name!r}" if image else ""
        where = f"{context.loc}: annotation id {annotation.id} (image id {annotation.image_id}{file_part})"
        if annotation.image_id not in context.image_ids:
            problems.add(
                f"annotation refers to unknown image id {annotation.image_id}",
                where,
                "set image_id to the id of an entry in 'images', or delete the annotation",
            )
        if annotation.category_id not in context.category_ids:
            problems.add(
                f"annotation refers to unknown category id {annotation.category_id}",
                where,
                f"set category_id to one of {sorted(context.category_ids)}, or add the category",
            )
        category = context.categories.get(annotation.category_id)
        if category is not None:
            instances[category.name] += 1
        _check_box(annotation.bbox, image, where, problems)
        _check_segmentation(annotation.segmentation, image, where, problems)
    return instances


def _check_box(bbox: list[float], image: _CocoImage | None, where: str, problems: Problems) -> None:
    x, y, width, height = bbox
    box = f"[{x:g}, {y:g}, {width:g}, {height:g}]"
    if width <= 0 or height <= 0:
        problems.add(
            f"box with non-positive width or height (bbox {box})",
            where,
            "delete the degenerate box or fix its size; COCO bbox is [x, y, width, height], not [x1, y1, x2, y2]",
        )
    elif image is not None and outside((x, y, x + width, y + height), (image.width, image.height)):
        problems.add(
            f"box outside the image (bbox {box}, image {image.width}x{image.height})",
            where,
            "clip the box to the image or fix the image's width/height",
        )


def _check_segmentation(segmentation: Any, image: _CocoImage | None, where: str, problems: Problems) -> None:
    """Polygons need pairs of finite coordinates and at least 3 points; an RLE must cover its image."""
    if segmentation is None:
        return
    if isinstance(segmentation, dict):
        _check_rle(segmentation, image, where, problems)
        return
    fix = "write each polygon as a flat list [x1, y1, x2, y2, ...] of at least 3 points, or drop it"
    if not isinstance(segmentation, list):
        kind = type(segmentation).__name__
        problems.add(f"segmentation is a {kind}, not a list of polygons or an RLE object", where, fix)
        return
    for index, polygon in enumerate(segmentation):
        name = f"segmentation polygon {index}"
        if not isinstance(polygon, list) or not all(is_number(value) for value in polygon):
            problems.add(f"{name} is not a list of numbers", where, fix)
        elif len(polygon) % 2:
            problems.add(f"{name} has an odd number of coordinates ({len(polygon)})", where, fix)
        elif len(polygon) < 6:
            problems.add(f"{name} has {len(polygon) // 2} point(s); at least 3 are needed", where, fix)


def _check_rle(rle: dict[str, Any], image: _CocoImage | None, where: str, problems: Problems) -> None:
    """An RLE mask: ``size`` is the image's [height, width] and the runs of ``counts`` add up to its pixels.

    Checked here in Python rather than decoded by pycocotools, whose decoder trusts the runs and
    writes past its buffer when they add up to more than height x width.
    """
    fix = (
        "export the masks again, or replace the RLE with polygons; an RLE is "
        "{'size': [height, width], 'counts': ...} as pycocotools encodes it"
    )
    size, counts = rle.get("size"), rle.get("counts")
    if not isinstance(size, list) or len(size) != 2 or not all(_is_count(value) and value > 0 for value in size):
        problems.add(f"RLE segmentation 'size' is {short(size)}, not [height, width]", where, fix)
        return
    height, width = size
    if image is not None and (height, width) != (image.height, image.width):
        what = f"RLE segmentation size [{height}, {width}] differs from the image's [{image.height}, {image.width}]"
        problems.add(what, where, fix)
        return
    runs = _rle_runs(counts)
    if runs is None:
        kind = "string" if isinstance(counts, str) else "list of pixel counts"
        problems.add(f"RLE segmentation 'counts' is not a valid {kind} (got {short(counts)})", where, fix)
    elif sum(runs) != height * width:
        what = f"RLE segmentation 'counts' cover {sum(runs)} pixels, not {height}x{width} = {height * width}"
        problems.add(what, where, fix)


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rle_runs(counts: object) -> list[int] | None:
    """The runs of an uncompressed (list) or compressed (string) RLE, or None if they are not valid."""
    if isinstance(counts, list):
        return counts if all(_is_count(value) for value in counts) else None
    if not isinstance(counts, str):
        return None
    # pycocotools' rleFrString: 5 bits per character from '0', 0x20 = more follows, 0x10 = negative.
    runs: list[int] = []
    value = shift = 0
    for char in counts:
        code = ord(char) - 48
        if not 0 <= code < 64:
            return None
        value |= (code & 0x1F) << shift
        shift += 5
        if code & 0x20:
            continue
        if code & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
        value = shift = 0
    return runs if shift == 0 else None


def _check_coco_images(
    split_dir: Path, label: str, images: dict[int, _CocoImage], loc: str, problems: Problems
) -> None:
    """Every image must exist, decode completely and have the size the JSON declares."""
    results = inspect_images(split_dir / image.file_name for image in images.values())
    for image in images.values():
        where = f"{loc}: image id {image.id} ({image.file_name!r})"
        result = results[split_dir / image.file_name]
        size = image_size_or_report(result, f"{label}/{image.file_name}", where, problems)
        if size is not None and size != (image.width, image.height):
            real = f"{size[0]}x{size[1]}"
            problems.add(
                f"declared size {image.width}x{image.height} differs from the image file's {real}",
                where,
                f"set width/height to {real}, or export the annotations again together with the image",
            )
