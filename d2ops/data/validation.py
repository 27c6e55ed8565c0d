"""Dataset checks that run before any training: :func:`validate_dataset`, the one report of a whole dataset.

A broken annotation file found an hour into a GPU run is an hour lost; found here, it is a
report that names every bad entry, says where it is and how to fix it. Two formats are
understood: COCO detection files (as exported by Roboflow, :mod:`d2ops.data.coco`) and VIA polygon
files (as in detectron2's balloon tutorial, :mod:`d2ops.data.via`). Every check turns bad data into a
:class:`Problem` (:mod:`d2ops.data.checks`); all the problems of a split, or of a whole dataset, are raised
together as one :class:`DataValidationError`, so one run of the validator shows everything there is to fix.
This module checks across splits (classes train never sees, images in two splits, missing split folders)
and is where callers import the checks from.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from d2ops.data.checks import DataValidationError, Problem, Problems, SplitSummary, log_summary
from d2ops.data.coco import check_coco_split, validate_coco
from d2ops.data.overlap import shared_images
from d2ops.data.via import DEFAULT_VIA_CLASS, ViaRules, check_via_split, validate_via

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_VIA_CLASS",
    "DataValidationError",
    "Problem",
    "SplitSummary",
    "missing_split_fix",
    "validate_coco",
    "validate_dataset",
    "validate_via",
]


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
    rules = ViaRules.build(label_attribute, class_names) if fmt == "via" else None
    root = Path(root)
    problems = Problems(max_problems)
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
            summary = check_coco_split(split_dir, annotation_file, subfolder, check_images, problems)
        else:
            summary = check_via_split(split_dir, annotation_file, subfolder, rules, check_images, problems)
        if summary is not None:
            summary.split = role
            summaries[role] = summary
    _check_categories_covered_by_train(summaries, splits, annotation_file, problems)
    _check_train_has_annotations(summaries, splits, annotation_file, problems)
    _check_shared_images(root, splits, annotation_file, fmt, duplicate_images, problems)
    problems.raise_if_any(source or root)  # the URI the user gave, not the local cache
    for summary in summaries.values():
        log_summary(summary)
    return summaries


def _check_shared_images(
    root: Path, splits: Mapping[str, str], annotation_file: str, fmt: str, mode: str, problems: Problems
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


# --------------------------------------------------------------------------- across splits


def _missing_split_fix(root: Path, role: str, splits: Mapping[str, str], source: str | None) -> str:
    present = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return missing_split_fix(role, splits, source or str(root), present)


def _check_train_has_annotations(
    summaries: dict[str, SplitSummary], splits: Mapping[str, str], annotation_file: str, problems: Problems
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
    summaries: dict[str, SplitSummary], splits: Mapping[str, str], annotation_file: str, problems: Problems
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
