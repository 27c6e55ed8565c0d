"""What every dataset check shares: problems and their one report, split summaries, JSON and image files."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, TypeGuard

from PIL import Image

logger = logging.getLogger(__name__)

__all__ = [
    "BOX_TOLERANCE_PX",
    "UNREADABLE",
    "DataValidationError",
    "Extent",
    "ImageFile",
    "Problem",
    "Problems",
    "SplitSummary",
    "describe_extent",
    "image_size_or_report",
    "inspect_images",
    "is_number",
    "leaves_split",
    "load_json",
    "log_summary",
    "outside",
    "short",
]

BOX_TOLERANCE_PX = 1.0
"""How far (in pixels) a box or polygon may reach past the image border before it is a problem."""

_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_MAX_DECODE_THREADS = 8
#: What :func:`load_json` returns for a file it could not read (the problem is recorded).
UNREADABLE = object()

Extent = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


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


class Problems:
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


def log_summary(summary: SplitSummary) -> None:
    logger.info(
        "%s split '%s' is valid: %d images, %d annotations, instances per category %s",
        summary.format.upper(),
        summary.split,
        summary.images,
        summary.annotations,
        summary.instances_per_category,
    )


def load_json(path: Path, loc: str, problems: Problems, kind: str) -> Any:
    """Parse a JSON file, or record why it cannot be read and return ``UNREADABLE``."""
    if not path.is_file():
        others = sorted(p.name for p in path.parent.glob("*.json")) if path.parent.is_dir() else []
        hint = f" (JSON files there: {', '.join(others)})" if others else ""
        fix = f"export the annotations as {path}, or configure the right annotation file name{hint}"
        problems.add(f"{kind} not found", loc, fix)
        return UNREADABLE
    try:
        raw = path.read_bytes()
    except OSError as exc:
        problems.add(
            f"{kind} cannot be read ({exc.strerror or exc})",
            loc,
            "check the file's permissions, or export the annotations again",
        )
        return UNREADABLE
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
    return UNREADABLE


def _json_value_error(raw: bytes, kind: str, loc: str, exc: ValueError) -> tuple[str, str]:
    """What and where for a value ``json.loads`` refuses; finds the position of an over-long integer."""
    limit = sys.get_int_max_str_digits()
    if not limit or "integer string conversion" not in str(exc):
        return f"{kind} cannot be read as JSON ({short(str(exc), 160)})", loc
    refused = f"which Python refuses to read (it reads at most {limit})"
    match = re.search(rb"[\[:,]\s*-?([0-9]{%d,})" % (limit + 1), raw)
    if match is None:
        return f"{kind} holds an integer of more than {limit} digits, {refused}", loc
    start = match.start(1)
    line = raw.count(b"\n", 0, start) + 1
    column = start - raw.rfind(b"\n", 0, start)
    what = f"{kind} holds an integer of {len(match.group(1))} digits, {refused}"
    return what, f"{loc}: line {line}, column {column}"


def is_number(value: object) -> TypeGuard[int | float]:
    """A finite JSON number; ``True``/``False`` are not numbers here."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def leaves_split(name: str) -> bool:
    """Whether a file name from an annotation file points outside its split folder (or is no path at all).

    Only the name is looked at, so nothing outside the dataset is ever opened to decide.
    """
    return (
        "\x00" in name
        or PurePosixPath(name).is_absolute()
        or ".." in PurePosixPath(name).parts
        or ".." in PureWindowsPath(name).parts
    )


def short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def outside(extent: Extent, size: tuple[int, int]) -> bool:
    """Whether an extent reaches past a (width, height) image by more than the tolerance."""
    x0, y0, x1, y1 = extent
    width, height = size
    tol = BOX_TOLERANCE_PX
    return x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol


def describe_extent(extent: Extent) -> str:
    x0, y0, x1, y1 = extent
    return f"x {x0:g}..{x1:g}, y {y0:g}..{y1:g}"


@dataclass(frozen=True)
class ImageFile:
    """Outcome of opening one image file: its size as detectron2 will read it, or why not."""

    size: tuple[int, int] | None = None
    missing: bool = False
    error: str | None = None


def _inspect_image(path: Path) -> ImageFile:
    """Decode an image completely, to catch truncation, and return its EXIF-upright size.

    The size is the one detectron2's ``read_image`` produces, which applies EXIF rotation.
    (Truncation is only caught while ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is off, the default.)
    """
    if not path.is_file():
        return ImageFile(missing=True)
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            image.draft(image.mode, (1, 1))  # JPEG: decode at 1/8 scale, which still reads every byte
            image.load()
    except Exception as exc:  # corrupt data surfaces as OSError, SyntaxError, struct.error, ...
        return ImageFile(error=f"{type(exc).__name__}: {exc}")
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return ImageFile(size=(width, height))


def inspect_images(paths: Iterable[Path]) -> dict[Path, ImageFile]:
    """Inspect each distinct path once, decoding in a few threads (PIL releases the GIL)."""
    unique = list(dict.fromkeys(paths))
    workers = max(1, min(_MAX_DECODE_THREADS, os.cpu_count() or 1, len(unique)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(unique, pool.map(_inspect_image, unique), strict=True))


def image_size_or_report(result: ImageFile, relative: str, where: str, problems: Problems) -> tuple[int, int] | None:
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
