"""Dataset checks that run before any training.

A broken annotation file found an hour into a GPU run is an hour lost; found here, it is a
report that names every bad entry, says where it is and how to fix it. Two formats are
understood: COCO detection files (as exported by Roboflow) and VIA polygon files (as in
detectron2's balloon tutorial). Every check turns bad data into a :class:`Problem`; all the
problems of a split, or of a whole dataset, are raised together as one
:class:`DataValidationError`, so one run of the validator shows everything there is to fix.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal, TypeGuard, TypeVar

from PIL import Image
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

from d2ops.data.overlap import shared_images

logger = logging.getLogger(__name__)

BOX_TOLERANCE_PX = 1.0
"""How far (in pixels) a box or polygon may reach past the image border before it is a problem."""

DEFAULT_VIA_CLASS = "object"
"""Class name of a single-class VIA dataset when no ``class_names`` are given."""

_COCO_FORMAT_URL = "https://cocodataset.org/#format-data"
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_MAX_DECODE_THREADS = 8
_UNREADABLE = object()

_Extent = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: what it is, where it is, and how to fix it."""

    what: str
    where: str
    fix: str


class DataValidationError(ValueError):
    """A dataset failed validation; carries the first problems found and the total count.

    ``str(error)`` is a report meant for a person: one numbered entry per problem with its
    location and a ``fix:`` line. ``total`` may exceed ``len(problems)`` when the report was
    cut at ``max_problems``.
    """

    def __init__(self, path: str | Path, problems: list[Problem], total: int | None = None) -> None:
        self.path = str(path)
        self.problems = list(problems)
        self.total = len(self.problems) if total is None else total
        super().__init__(self.path, self.problems, self.total)

    def __str__(self) -> str:
        shown = len(self.problems)
        truncated = shown < self.total
        head = f"First {shown} of {self.total}" if truncated else f"First {shown}"
        lines = [f"Dataset validation failed: {self.total} problem(s) in {self.path}. {head}:"]
        for number, problem in enumerate(self.problems, start=1):
            lines.append(f"  {number}. {problem.what} at {problem.where}")
            lines.append(f"     fix: {problem.fix}")
        if truncated:
            lines.append(f"  ... and {self.total - shown} more (raise max_problems to list them all)")
        return "\n".join(lines)


@dataclass
class SplitSummary:
    """What a valid split holds; logged and reported so a run records the data it trained on."""

    split: str
    path: str
    format: str
    images: int
    annotations: int
    categories: list[str]
    instances_per_category: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form, e.g. for a ClearML artifact or a config dump."""
        return asdict(self)


# --------------------------------------------------------------------------- public API


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
    problems = _Problems(max_problems)
    summary = _check_coco_split(split_dir, annotation_file, split_dir.name, check_images, problems)
    problems.raise_if_any(split_dir / annotation_file)
    assert summary is not None  # no problem recorded means the split could be read
    _log_summary(summary)
    return summary


def validate_via(
    split_dir: Path | str,
    annotation_file: str = "via_region_data.json",
    *,
    label_attribute: str | None = None,
    class_names: list[str] | None = None,
    check_images: bool = True,
    max_problems: int = 20,
) -> SplitSummary:
    """Check one VIA split folder (``via_region_data.json`` plus images) and summarise it.

    A region's class is read from its ``label_attribute`` region attribute and must be one of
    ``class_names`` when those are given. Without ``label_attribute`` the dataset is
    single-class (the balloon case): ``class_names`` then holds that one name, or is left out
    for :data:`DEFAULT_VIA_CLASS`. Polygon bounds are checked against the image files, so
    ``check_images=False`` skips them too. Raises :class:`DataValidationError` listing the
    problems found, and ``ValueError`` for contradictory arguments.
    """
    split_dir = Path(split_dir)
    rules = _ViaRules.build(label_attribute, class_names)
    problems = _Problems(max_problems)
    summary = _check_via_split(split_dir, annotation_file, split_dir.name, rules, check_images, problems)
    problems.raise_if_any(split_dir / annotation_file)
    assert summary is not None  # no problem recorded means the split could be read
    _log_summary(summary)
    return summary


def validate_dataset(
    root: Path | str,
    fmt: Literal["coco", "via"],
    splits: Mapping[str, str],
    annotation_file: str,
    *,
    label_attribute: str | None = None,
    class_names: list[str] | None = None,
    check_images: bool = True,
    max_problems: int = 20,
    duplicate_images: Literal["error", "warn"] = "error",
    source: str | None = None,
) -> dict[str, SplitSummary]:
    """Check every split of a dataset and return one summary per split role.

    ``splits`` maps a role to its subfolder, e.g. ``{"train": "train", "val": "valid"}``.
    Problems from all splits are collected and raised as one :class:`DataValidationError`,
    including classes that appear in another split but not in ``train`` (a model cannot learn
    a class it never sees). ``label_attribute`` and ``class_names`` apply to VIA only.
    """
    if fmt not in ("coco", "via"):
        raise ValueError(f"unknown dataset format {fmt!r}; use 'coco' or 'via'")
    rules = _ViaRules.build(label_attribute, class_names) if fmt == "via" else None
    root = Path(root)
    problems = _Problems(max_problems)
    if not root.is_dir():
        problems.add(
            "dataset folder not found",
            str(root),
            "download the dataset first, or point the dataset root at the folder holding the split folders",
        )
        problems.raise_if_any(root)
    summaries: dict[str, SplitSummary] = {}
    for role, subfolder in splits.items():
        split_dir = root / subfolder
        if not split_dir.is_dir():
            what = f"{role} split folder '{subfolder}' not found"
            problems.add(what, source or str(root), _missing_split_fix(root, role, splits, source))
            continue
        if rules is None:
            summary = _check_coco_split(split_dir, annotation_file, subfolder, check_images, problems)
        else:
            summary = _check_via_split(split_dir, annotation_file, subfolder, rules, check_images, problems)
        if summary is not None:
            summary.split = role
            summaries[role] = summary
    _check_categories_covered_by_train(summaries, splits, annotation_file, problems)
    _check_train_has_annotations(summaries, splits, annotation_file, problems)
    _check_shared_images(root, splits, annotation_file, fmt, duplicate_images, problems)
    problems.raise_if_any(source or root)  # the URI the user gave, not the local cache
    for summary in summaries.values():
        _log_summary(summary)
    return summaries


def _check_shared_images(
    root: Path, splits: Mapping[str, str], annotation_file: str, fmt: str, mode: str, problems: _Problems
) -> None:
    """Byte-identical images in two splits: an error (``data.duplicate_images: error``) or a warning."""
    shared = shared_images(root, splits, annotation_file, fmt)
    for image in shared:
        what = f"the same image is in {len({role for role, _ in image.places})} splits"
        if mode == "warn":
            logger.warning("%s: %s (data.duplicate_images=warn)", what, image.describe())
            continue
        problems.add(
            what,
            image.describe(),
            "keep it in one split only (scores on a split that holds training images are too high), "
            "or accept it with --set data.duplicate_images=warn",
        )


# --------------------------------------------------------------------------- shared helpers


class _Problems:
    """Collects problems up to a limit and keeps counting past it."""

    def __init__(self, max_problems: int) -> None:
        if max_problems < 1:
            raise ValueError(f"max_problems must be at least 1, got {max_problems}")
        self.limit = max_problems
        self.kept: list[Problem] = []
        self.total = 0

    def add(self, what: str, where: str, fix: str) -> None:
        self.total += 1
        if len(self.kept) < self.limit:
            self.kept.append(Problem(what=what, where=where, fix=fix))

    def raise_if_any(self, path: Path | str) -> None:
        if self.total:
            raise DataValidationError(path, self.kept, self.total)


def _log_summary(summary: SplitSummary) -> None:
    logger.info(
        "%s split '%s' is valid: %d images, %d annotations, instances per category %s",
        summary.format.upper(),
        summary.split,
        summary.images,
        summary.annotations,
        summary.instances_per_category,
    )


def _missing_split_fix(root: Path, role: str, splits: Mapping[str, str], source: str | None) -> str:
    present = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return missing_split_fix(role, splits, source or str(root), present)


def _load_json(path: Path, loc: str, problems: _Problems, kind: str) -> Any:
    """Parse a JSON file, or record why it cannot be read and return ``_UNREADABLE``."""
    if not path.is_file():
        others = sorted(p.name for p in path.parent.glob("*.json")) if path.parent.is_dir() else []
        hint = f" (JSON files there: {', '.join(others)})" if others else ""
        fix = f"export the annotations as {path}, or configure the right annotation file name{hint}"
        problems.add(f"{kind} not found", loc, fix)
        return _UNREADABLE
    try:
        raw = path.read_bytes()
    except OSError as exc:
        problems.add(
            f"{kind} cannot be read ({exc.strerror or exc})",
            loc,
            "check the file's permissions, or export the annotations again",
        )
        return _UNREADABLE
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        problems.add(
            f"{kind} is not valid JSON ({exc.msg})",
            f"{loc}: line {exc.lineno}, column {exc.colno}",
            "fix the syntax at that position or export the annotations again "
            "(an interrupted download or a hand edit often leaves a broken file)",
        )
    except UnicodeDecodeError as exc:
        problems.add(
            f"{kind} is not UTF-8 text ({exc.reason})",
            f"{loc}: byte {exc.start}",
            "save the file as UTF-8 JSON or export the annotations again",
        )
    except RecursionError:  # json.loads recurses once per level of nesting
        problems.add(
            f"{kind} is nested too deeply to read (over {sys.getrecursionlimit()} levels of arrays or objects)",
            loc,
            "an annotation export is only a few levels deep, so this file is corrupt or not an export: "
            "export the annotations again",
        )
    except ValueError as exc:  # an integer longer than sys.get_int_max_str_digits(), above all
        what, where = _json_value_error(raw, kind, loc, exc)
        problems.add(
            what,
            where,
            "no annotation value needs that many digits, so the file is corrupt: correct or delete the number "
            "there, or export the annotations again",
        )
    return _UNREADABLE


def _json_value_error(raw: bytes, kind: str, loc: str, exc: ValueError) -> tuple[str, str]:
    """What and where for a value ``json.loads`` refuses; finds the position of an over-long integer."""
    limit = sys.get_int_max_str_digits()
    if not limit or "integer string conversion" not in str(exc):
        return f"{kind} cannot be read as JSON ({_short(str(exc), 160)})", loc
    refused = f"which Python refuses to read (it reads at most {limit})"
    match = re.search(rb"[\[:,]\s*-?([0-9]{%d,})" % (limit + 1), raw)
    if match is None:
        return f"{kind} holds an integer of more than {limit} digits, {refused}", loc
    start = match.start(1)
    line = raw.count(b"\n", 0, start) + 1
    column = start - raw.rfind(b"\n", 0, start)
    what = f"{kind} holds an integer of {len(match.group(1))} digits, {refused}"
    return what, f"{loc}: line {line}, column {column}"


def _is_number(value: object) -> TypeGuard[int | float]:
    """A finite JSON number; ``True``/``False`` are not numbers here."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _leaves_split(name: str) -> bool:
    """Whether a file name from an annotation file points outside its split folder (or is no path at all).

    Only the name is looked at, so nothing outside the dataset is ever opened to decide.
    """
    return (
        "\x00" in name
        or PurePosixPath(name).is_absolute()
        or ".." in PurePosixPath(name).parts
        or ".." in PureWindowsPath(name).parts
    )


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _outside(extent: _Extent, size: tuple[int, int]) -> bool:
    """Whether an extent reaches past a (width, height) image by more than the tolerance."""
    x0, y0, x1, y1 = extent
    width, height = size
    tol = BOX_TOLERANCE_PX
    return x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol


def _describe_extent(extent: _Extent) -> str:
    x0, y0, x1, y1 = extent
    return f"x {x0:g}..{x1:g}, y {y0:g}..{y1:g}"


# --------------------------------------------------------------------------- image files


@dataclass(frozen=True)
class _ImageFile:
    """Outcome of opening one image file: its size as detectron2 will read it, or why not."""

    size: tuple[int, int] | None = None
    missing: bool = False
    error: str | None = None


def _inspect_image(path: Path) -> _ImageFile:
    """Decode an image completely, to catch truncation, and return its EXIF-upright size.

    The size is the one detectron2's ``read_image`` produces, which applies EXIF rotation.
    (Truncation is only caught while ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is off, the default.)
    """
    if not path.is_file():
        return _ImageFile(missing=True)
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            image.draft(image.mode, (1, 1))  # JPEG: decode at 1/8 scale, which still reads every byte
            image.load()
    except Exception as exc:  # corrupt data surfaces as OSError, SyntaxError, struct.error, ...
        return _ImageFile(error=f"{type(exc).__name__}: {exc}")
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return _ImageFile(size=(width, height))


def _inspect_images(paths: Iterable[Path]) -> dict[Path, _ImageFile]:
    """Inspect each distinct path once, decoding in a few threads (PIL releases the GIL)."""
    unique = list(dict.fromkeys(paths))
    workers = max(1, min(_MAX_DECODE_THREADS, os.cpu_count() or 1, len(unique)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(unique, pool.map(_inspect_image, unique), strict=True))


def _image_size_or_report(result: _ImageFile, relative: str, where: str, problems: _Problems) -> tuple[int, int] | None:
    """Record a missing or undecodable image; return its size when it could be read."""
    if result.missing:
        problems.add(
            "image file not found",
            where,
            f"put the image at {relative}, or correct the file name (it is relative to the split folder)",
        )
    elif result.error is not None:
        problems.add(
            f"image file cannot be decoded ({result.error})",
            where,
            "replace it with a valid image (download or export it again); "
            "a truncated or mislabelled file would crash the data loader mid-training",
        )
    return result.size


# --------------------------------------------------------------------------- COCO


def _finite_number(value: object) -> float:
    if not _is_number(value):
        raise PydanticCustomError("number_type", "Input should be a finite number")
    return float(value)


_Number = Annotated[float, BeforeValidator(_finite_number)]
_PositiveInt = Annotated[StrictInt, Field(gt=0)]
_Name = Annotated[StrictStr, Field(min_length=1)]
_Area = Annotated[float, BeforeValidator(_finite_number), Field(ge=0)]


def _inside_split(name: str) -> str:
    if _leaves_split(name):
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


def _check_coco_split(
    split_dir: Path, annotation_file: str, label: str, check_images: bool, problems: _Problems
) -> SplitSummary | None:
    """Run every COCO check on one split; return its summary, or None if it cannot be read."""
    loc = f"{label}/{annotation_file}"
    data = _load_json(split_dir / annotation_file, loc, problems, "COCO annotation file")
    if data is _UNREADABLE:
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


def _coco_sections(data: Any, loc: str, problems: _Problems) -> tuple[list[Any], list[Any], list[Any]] | None:
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
    details = [f"id {_short(raw['id'])}"] if "id" in raw else []
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
    raw_entries: list[Any], model: type[_Entry], section: str, loc: str, problems: _Problems
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


def _report_schema_errors(exc: ValidationError, section: str, where: str, problems: _Problems) -> None:
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
            what = f"{kind} field '{field_path}' is invalid: {error['msg']} (got {_short(error['input'])})"
        problems.add(what, where, _FIELD_FIXES.get((section, top), default_fix))


def _unique_by_id(entries: list[tuple[str, str, _Entry]], kind: str, problems: _Problems) -> dict[int, _Entry]:
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


def _check_categories(categories: dict[int, _CocoCategory], raw: list[Any], loc: str, problems: _Problems) -> None:
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


def _check_annotations(annotations: list[_CocoAnnotation], context: _CocoContext, problems: _Problems) -> Counter[str]:
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


def _check_box(bbox: list[float], image: _CocoImage | None, where: str, problems: _Problems) -> None:
    x, y, width, height = bbox
    box = f"[{x:g}, {y:g}, {width:g}, {height:g}]"
    if width <= 0 or height <= 0:
        problems.add(
            f"box with non-positive width or height (bbox {box})",
            where,
            "delete the degenerate box or fix its size; COCO bbox is [x, y, width, height], not [x1, y1, x2, y2]",
        )
    elif image is not None and _outside((x, y, x + width, y + height), (image.width, image.height)):
        problems.add(
            f"box outside the image (bbox {box}, image {image.width}x{image.height})",
            where,
            "clip the box to the image or fix the image's width/height",
        )


def _check_segmentation(segmentation: Any, image: _CocoImage | None, where: str, problems: _Problems) -> None:
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
        if not isinstance(polygon, list) or not all(_is_number(value) for value in polygon):
            problems.add(f"{name} is not a list of numbers", where, fix)
        elif len(polygon) % 2:
            problems.add(f"{name} has an odd number of coordinates ({len(polygon)})", where, fix)
        elif len(polygon) < 6:
            problems.add(f"{name} has {len(polygon) // 2} point(s); at least 3 are needed", where, fix)


def _check_rle(rle: dict[str, Any], image: _CocoImage | None, where: str, problems: _Problems) -> None:
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
        problems.add(f"RLE segmentation 'size' is {_short(size)}, not [height, width]", where, fix)
        return
    height, width = size
    if image is not None and (height, width) != (image.height, image.width):
        what = f"RLE segmentation size [{height}, {width}] differs from the image's [{image.height}, {image.width}]"
        problems.add(what, where, fix)
        return
    runs = _rle_runs(counts)
    if runs is None:
        kind = "string" if isinstance(counts, str) else "list of pixel counts"
        problems.add(f"RLE segmentation 'counts' is not a valid {kind} (got {_short(counts)})", where, fix)
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
    split_dir: Path, label: str, images: dict[int, _CocoImage], loc: str, problems: _Problems
) -> None:
    """Every image must exist, decode completely and have the size the JSON declares."""
    results = _inspect_images(split_dir / image.file_name for image in images.values())
    for image in images.values():
        where = f"{loc}: image id {image.id} ({image.file_name!r})"
        result = results[split_dir / image.file_name]
        size = _image_size_or_report(result, f"{label}/{image.file_name}", where, problems)
        if size is not None and size != (image.width, image.height):
            real = f"{size[0]}x{size[1]}"
            problems.add(
                f"declared size {image.width}x{image.height} differs from the image file's {real}",
                where,
                f"set width/height to {real}, or export the annotations again together with the image",
            )


# --------------------------------------------------------------------------- VIA


@dataclass(frozen=True)
class _ViaRules:
    """Where a VIA region's class comes from and which classes are allowed."""

    label_attribute: str | None
    class_names: tuple[str, ...] | None

    @classmethod
    def build(cls, label_attribute: str | None, class_names: list[str] | None) -> _ViaRules:
        if label_attribute is None and class_names is not None and len(class_names) != 1:
            raise ValueError(
                "without label_attribute a VIA dataset is single-class, so class_names must hold "
                f"exactly one name, got {class_names!r}; set label_attribute to the region attribute "
                "that holds each region's class"
            )
        return cls(label_attribute, tuple(class_names) if class_names is not None else None)

    def single_class(self) -> str:
        return self.class_names[0] if self.class_names else DEFAULT_VIA_CLASS

    def category_names(self, seen: Counter[str]) -> list[str]:
        if self.class_names is not None:
            return list(self.class_names)
        return sorted(seen) if self.label_attribute else [self.single_class()]


@dataclass
class _ViaSplit:
    """What the checks of one VIA split share: where it is, the rules, the results so far."""

    split_dir: Path
    label: str
    loc: str
    rules: _ViaRules
    files: dict[Path, _ImageFile] | None  # None when image files are not checked
    problems: _Problems
    instances: Counter[str] = field(default_factory=Counter)


def _check_via_split(
    split_dir: Path,
    annotation_file: str,
    label: str,
    rules: _ViaRules,
    check_images: bool,
    problems: _Problems,
) -> SplitSummary | None:
    """Run every VIA check on one split; return its summary, or None if it cannot be read."""
    loc = f"{label}/{annotation_file}"
    data = _load_json(split_dir / annotation_file, loc, problems, "VIA annotation file")
    if data is _UNREADABLE:
        return None
    entries = _via_entries(data, loc, problems)
    if entries is None:
        return None
    files = _via_image_files(split_dir, entries.values()) if check_images else None
    rules = _label_attribute_somewhere(entries, rules, loc, problems)
    split = _ViaSplit(split_dir, label, loc, rules, files, problems)
    regions = sum(_check_via_entry(str(key), entry, split) for key, entry in entries.items())
    names = rules.category_names(split.instances)
    return SplitSummary(
        split=label,
        path=str(split_dir),
        format="via",
        images=len(entries),
        annotations=regions,
        categories=names,
        instances_per_category={name: split.instances.get(name, 0) for name in names},
    )


def _label_attribute_somewhere(entries: dict[str, Any], rules: _ViaRules, loc: str, problems: _Problems) -> _ViaRules:
    """A label attribute that no region has is one problem, naming the attributes the regions do have,
    not one problem per region; the split's regions are then checked as single-class."""
    if rules.label_attribute is None:
        return rules
    present: Counter[str] = Counter()
    regions = 0
    for entry in entries.values():
        for _, region in (_via_regions(entry) if isinstance(entry, dict) else None) or []:
            regions += 1
            attributes = region.get("region_attributes") if isinstance(region, dict) else None
            if isinstance(attributes, dict):
                present.update(str(name) for name in attributes)
    if not regions or rules.label_attribute in present:
        return rules
    found = ", ".join(f"{name!r} (on {count} regions)" for name, count in present.most_common())
    problems.add(
        f"label attribute {rules.label_attribute!r} is on no region (of {regions}); attributes present: "
        + (found or "none, region_attributes are all empty"),
        f"{loc}: regions[*].region_attributes",
        "set data.label_attribute to the attribute holding each region's class"
        + (" (one of those above)" if found else "")
        + ", or to null for a single-class dataset (every region is then data.class_names[0])",
    )
    return replace(rules, label_attribute=None)


def _via_entries(data: Any, loc: str, problems: _Problems) -> dict[str, Any] | None:
    """The image entries of a VIA export (or of a VIA project file), or None if there are none."""
    if isinstance(data, dict) and isinstance(data.get("_via_img_metadata"), dict):
        data = data["_via_img_metadata"]
    if not isinstance(data, dict):
        problems.add(
            f"top level is a JSON {type(data).__name__}, not an object keyed by image",
            loc,
            "export the annotations from VIA with 'Annotation > Export Annotations (as json)'",
        )
        return None
    if not data:
        problems.add(
            "no images in the annotation file",
            loc,
            "annotate and export the split's images in VIA, or drop the split from the dataset config",
        )
        return None
    return data


def _via_filename(entry: Any) -> str | None:
    filename = entry.get("filename") if isinstance(entry, dict) else None
    return filename if isinstance(filename, str) and filename else None


def _via_image_files(split_dir: Path, entries: Iterable[Any]) -> dict[Path, _ImageFile]:
    names = [name for name in map(_via_filename, entries) if name is not None and not _leaves_split(name)]
    return _inspect_images(split_dir / name for name in names)


def _via_regions(entry: dict[str, Any]) -> list[tuple[int | str, Any]] | None:
    """A VIA entry's regions as (region id, region) pairs; VIA 1 writes a dict, VIA 2 a list."""
    regions = entry.get("regions")
    if isinstance(regions, dict):
        return list(regions.items())
    if isinstance(regions, list):
        return list(enumerate(regions))
    return None


def _check_via_entry(key: str, entry: Any, split: _ViaSplit) -> int:
    """Check one image entry and its regions; return how many regions it lists."""
    fix = "each entry needs 'filename' (a string) and 'regions' (a dict or list); export from VIA again"
    filename = _via_filename(entry)
    if filename is None:
        kind = type(entry).__name__
        what = "entry has no 'filename'" if isinstance(entry, dict) else f"entry is a {kind}, not an object"
        split.problems.add(what, f"{split.loc}: entry {key!r}", fix)
        return 0
    where = f"{split.loc}: {filename!r}"
    outside = _leaves_split(filename)
    if outside:
        split.problems.add(
            "'filename' points outside the split folder",
            f"{split.loc}: entry {key!r} (filename {filename!r})",
            "set 'filename' to the image's path relative to the split folder, inside it (no absolute path, no '..')",
        )
    regions = _via_regions(entry)
    if regions is None:
        split.problems.add("entry has no 'regions' dict or list", where, fix)
        return 0
    size = None
    if split.files is not None and not outside:
        result = split.files[split.split_dir / filename]
        size = _image_size_or_report(result, f"{split.label}/{filename}", where, split.problems)
    for region_id, region in regions:
        class_name = _check_via_region(region, f"{where}, region {region_id}", size, split)
        if class_name is not None:
            split.instances[class_name] += 1
    return len(regions)


def _check_via_region(region: Any, where: str, size: tuple[int, int] | None, split: _ViaSplit) -> str | None:
    """Check a region's shape and class; return the class name when it is a valid one."""
    problems = split.problems
    if not isinstance(region, dict):
        kind = type(region).__name__
        problems.add(f"region is a {kind}, not an object", where, "export the annotations from VIA again")
        return None
    shape = region.get("shape_attributes")
    if not isinstance(shape, dict):
        problems.add("region has no 'shape_attributes'", where, "draw the region again in VIA, or delete it")
    else:
        extent = _via_shape_extent(shape, where, problems)
        if extent is not None and size is not None and _outside(extent, size):
            image = f"image {size[0]}x{size[1]}"
            problems.add(
                f"{shape['name']} outside the image ({_describe_extent(extent)}, {image})",
                where,
                "move the points inside the image in VIA, and check the region belongs to this image",
            )
    return _via_class_name(region, where, split.rules, problems)


def _via_shape_extent(shape: dict[str, Any], where: str, problems: _Problems) -> _Extent | None:
    """Check a polygon or rect; return its extent when it is well formed."""
    name = shape.get("name")
    if name == "polygon":
        return _via_polygon_extent(shape, where, problems)
    if name == "rect":
        return _via_rect_extent(shape, where, problems)
    problems.add(
        f"unsupported region shape {_short(name)}",
        where,
        "redraw the region as a polygon or a rectangle in VIA, or delete it",
    )
    return None


def _via_polygon_extent(shape: dict[str, Any], where: str, problems: _Problems) -> _Extent | None:
    xs, ys = shape.get("all_points_x"), shape.get("all_points_y")
    fix = "redraw the polygon in VIA with at least 3 points, or delete the region"
    if not isinstance(xs, list) or not isinstance(ys, list) or not all(map(_is_number, xs + ys)):
        problems.add("polygon needs 'all_points_x' and 'all_points_y' lists of numbers", where, fix)
        return None
    if len(xs) != len(ys):
        problems.add(f"polygon has {len(xs)} x coordinates but {len(ys)} y coordinates", where, fix)
        return None
    if len(xs) < 3:
        problems.add(f"polygon has {len(xs)} point(s); at least 3 are needed", where, fix)
        return None
    return min(xs), min(ys), max(xs), max(ys)


def _via_rect_extent(shape: dict[str, Any], where: str, problems: _Problems) -> _Extent | None:
    raw = [shape.get(key) for key in ("x", "y", "width", "height")]
    numbers = [float(value) for value in raw if _is_number(value)]
    fix = "redraw the rectangle in VIA, or delete the region"
    if len(numbers) != len(raw):
        problems.add(f"rect needs numbers x, y, width, height (got {_short(raw)})", where, fix)
        return None
    x, y, width, height = numbers
    if width <= 0 or height <= 0:
        problems.add(f"rect with non-positive width or height ({width:g}x{height:g})", where, fix)
        return None
    return x, y, x + width, y + height


def _via_class_name(region: dict[str, Any], where: str, rules: _ViaRules, problems: _Problems) -> str | None:
    """The region's class: its label attribute, or the single class when there is none."""
    attribute = rules.label_attribute
    if attribute is None:
        return rules.single_class()
    allowed = f"one of {list(rules.class_names)}" if rules.class_names else "its class name"
    attributes = region.get("region_attributes")
    value = attributes.get(attribute) if isinstance(attributes, dict) else None
    if value is None:
        problems.add(
            f"region has no '{attribute}' attribute",
            where,
            f"set the region attribute '{attribute}' to {allowed} in VIA, or delete the region",
        )
    elif not isinstance(value, str) or not value.strip():
        problems.add(
            f"region attribute '{attribute}' is {_short(value)}, not a class name",
            where,
            f"make '{attribute}' a text, radio or dropdown attribute holding {allowed}",
        )
    elif rules.class_names is not None and value not in rules.class_names:
        problems.add(
            f"unknown class {value!r} in region attribute '{attribute}'",
            where,
            f"use {allowed}, or add {value!r} to class_names",
        )
    else:
        return value
    return None


# --------------------------------------------------------------------------- across splits


def _check_train_has_annotations(
    summaries: dict[str, SplitSummary], splits: Mapping[str, str], annotation_file: str, problems: _Problems
) -> None:
    """A train split with images but not one annotation teaches nothing (an empty split is reported already)."""
    train = summaries.get("train")
    if train is None or not train.images or train.annotations:
        return
    entries = "regions" if train.format == "via" else "annotations"
    problems.add(
        f"train split has no annotations ({train.images} images, 0 {entries})",
        f"{splits['train']}/{annotation_file}",
        "check the export: it must hold the boxes or polygons of the training images "
        "(an export of the images alone, or the wrong annotation file, looks like this)",
    )


def _check_categories_covered_by_train(
    summaries: dict[str, SplitSummary], splits: Mapping[str, str], annotation_file: str, problems: _Problems
) -> None:
    """Every class of val/test must exist in train, or the model can never predict it."""
    train = summaries.get("train")
    if train is None:
        return
    for role, summary in summaries.items():
        extra = sorted(set(summary.categories) - set(train.categories))
        if role != "train" and extra:
            problems.add(
                f"{role} split has categories that train lacks: {extra}",
                f"{splits[role]}/{annotation_file}",
                f"add training examples of {extra}, or remove or rename them in {role} (train has {train.categories})",
            )


def missing_split_fix(role: str, splits: Mapping[Any, str], where: str, present: Sequence[str]) -> str:
    """How to fix a split folder that ``where`` (data.source) lacks, given the folders it has: the
    exact ``--set`` lines (a folder no other split reads; for val, a carved split)."""
    subfolder = splits[role]
    if not present:
        return f"create the folder {subfolder!r} in {where}, or point data.source at the folder holding the splits"
    names = sorted(present)
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    fix = f"add the folder {subfolder!r} to {where} (it has {', '.join(map(repr, names[:10]))}{more})"
    used = {part for folder in splits.values() for part in PurePosixPath(folder).parts[:1]}
    free = [name for name in names if name not in used]  # a folder no other split reads
    if free:
        fix += ", or map the split to one of them: " + " or ".join(f"--set data.splits.{role}={n}" for n in free[:3])
    if role == "val":
        fix += ", or carve a seeded validation split from train: --set data.val_fraction=0.1"
    return fix
