"""VIA polygon files (as in detectron2's balloon tutorial): every region checked against its image."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from d2ops.data.checks import (
    UNREADABLE,
    Extent,
    ImageFile,
    Problems,
    SplitSummary,
    describe_extent,
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

__all__ = ["DEFAULT_VIA_CLASS", "ViaRules", "check_via_split", "validate_via"]

DEFAULT_VIA_CLASS = "object"
"""Class name of a single-class VIA dataset when no ``class_names`` are given."""


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
    rules = ViaRules.build(label_attribute, class_names)
    problems = Problems(max_problems)
    summary = check_via_split(split_dir, annotation_file, split_dir.name, rules, check_images, problems)
    problems.raise_if_any(split_dir / annotation_file)
    assert summary is not None  # no problem recorded means the split could be read
    log_summary(summary)
    return summary


@dataclass(frozen=True)
class ViaRules:
    """Where a VIA region's class comes from and which classes are allowed."""

    label_attribute: str | None
    class_names: tuple[str, ...] | None

    @classmethod
    def build(cls, label_attribute: str | None, class_names: list[str] | None) -> ViaRules:
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
    rules: ViaRules
    files: dict[Path, ImageFile] | None  # None when image files are not checked
    problems: Problems
    instances: Counter[str] = field(default_factory=Counter)


def check_via_split(
    split_dir: Path,
    annotation_file: str,
    label: str,
    rules: ViaRules,
    check_images: bool,
    problems: Problems,
) -> SplitSummary | None:
    """Run every VIA check on one split; return its summary, or None if it cannot be read."""
    loc = f"{label}/{annotation_file}"
    data = load_json(split_dir / annotation_file, loc, problems, "VIA annotation file")
    if data is UNREADABLE:
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


def _label_attribute_somewhere(entries: dict[str, Any], rules: ViaRules, loc: str, problems: Problems) -> ViaRules:
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


def _via_entries(data: Any, loc: str, problems: Problems) -> dict[str, Any] | None:
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


def _via_image_files(split_dir: Path, entries: Iterable[Any]) -> dict[Path, ImageFile]:
    names = [name for name in map(_via_filename, entries) if name is not None and not leaves_split(name)]
    return inspect_images(split_dir / name for name in names)


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
    outside = leaves_split(filename)
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
        size = image_size_or_report(result, f"{split.label}/{filename}", where, split.problems)
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
        if extent is not None and size is not None and outside(extent, size):
            image = f"image {size[0]}x{size[1]}"
            problems.add(
                f"{shape['name']} outside the image ({describe_extent(extent)}, {image})",
                where,
                "move the points inside the image in VIA, and check the region belongs to this image",
            )
    return _via_class_name(region, where, split.rules, problems)


def _via_shape_extent(shape: dict[str, Any], where: str, problems: Problems) -> Extent | None:
    """Check a polygon or rect; return its extent when it is well formed."""
    name = shape.get("name")
    if name == "polygon":
        return _via_polygon_extent(shape, where, problems)
    if name == "rect":
        return _via_rect_extent(shape, where, problems)
    problems.add(
        f"unsupported region shape {short(name)}",
        where,
        "redraw the region as a polygon or a rectangle in VIA, or delete it",
    )
    return None


def _via_polygon_extent(shape: dict[str, Any], where: str, problems: Problems) -> Extent | None:
    xs, ys = shape.get("all_points_x"), shape.get("all_points_y")
    fix = "redraw the polygon in VIA with at least 3 points, or delete the region"
    if not isinstance(xs, list) or not isinstance(ys, list) or not all(map(is_number, xs + ys)):
        problems.add("polygon needs 'all_points_x' and 'all_points_y' lists of numbers", where, fix)
        return None
    if len(xs) != len(ys):
        problems.add(f"polygon has {len(xs)} x coordinates but {len(ys)} y coordinates", where, fix)
        return None
    if len(xs) < 3:
        problems.add(f"polygon has {len(xs)} point(s); at least 3 are needed", where, fix)
        return None
    return min(xs), min(ys), max(xs), max(ys)


def _via_rect_extent(shape: dict[str, Any], where: str, problems: Problems) -> Extent | None:
    raw = [shape.get(key) for key in ("x", "y", "width", "height")]
    numbers = [float(value) for value in raw if is_number(value)]
    fix = "redraw the rectangle in VIA, or delete the region"
    if len(numbers) != len(raw):
        problems.add(f"rect needs numbers x, y, width, height (got {short(raw)})", where, fix)
        return None
    x, y, width, height = numbers
    if width <= 0 or height <= 0:
        problems.add(f"rect with non-positive width or height ({width:g}x{height:g})", where, fix)
        return None
    return x, y, x + width, y + height


def _via_class_name(region: dict[str, Any], where: str, rules: ViaRules, problems: Problems) -> str | None:
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
            f"region attribute '{attribute}' is {short(value)}, not a class name",
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
