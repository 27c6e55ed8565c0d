"""Tests for d2ops.data.validation on tiny real datasets: real JPEG/PNG files, real JSON."""

from __future__ import annotations

import copy
import itertools
import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from d2ops.data.validation import (
    DataValidationError,
    Problem,
    SplitSummary,
    validate_coco,
    validate_dataset,
    validate_via,
)

WIDTH, HEIGHT = 64, 48
COCO_FILE = "_annotations.coco.json"
VIA_FILE = "via_region_data.json"

Mutation = Callable[[Path, Any], Any]  # (split folder, parsed JSON) -> replacement JSON or None


# --------------------------------------------------------------------------- builders


_SHADES = itertools.count()


def _draw(path: Path, size: tuple[int, int] = (WIDTH, HEIGHT), **save_args: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A background of its own per file: the same picture in two splits is a leak the validator reports.
    shade = next(_SHADES)
    image = Image.new("RGB", size, (30, shade % 256, shade // 256 % 256))
    ImageDraw.Draw(image).ellipse((8, 8, 40, 36), fill=(250, 80, 60))
    image.save(path, **save_args)


def _coco_data() -> dict[str, Any]:
    """Roboflow-style COCO: a supercategory entry, an image in a subfolder, an image without boxes."""
    return {
        "info": {"description": "tiny"},
        "images": [
            {"id": 1, "file_name": "img_1.jpg", "width": WIDTH, "height": HEIGHT},
            {"id": 2, "file_name": "sub/img_2.jpg", "width": WIDTH, "height": HEIGHT},
            {"id": 3, "file_name": "img_3.png", "width": WIDTH, "height": HEIGHT},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [8, 8, 32, 28],
                "area": 896,
                "iscrowd": 0,
                "segmentation": [[8, 8, 40, 8, 40, 36, 8, 36]],
            },
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30.5, 20, 20, 20], "segmentation": []},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, WIDTH, HEIGHT]},
        ],
        "categories": [
            {"id": 0, "name": "shapes", "supercategory": "none"},
            {"id": 1, "name": "ball", "supercategory": "shapes"},
            {"id": 2, "name": "box", "supercategory": "shapes"},
        ],
    }


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def _make_coco_split(split: Path, data: dict[str, Any] | None = None) -> Path:
    data = _coco_data() if data is None else data
    for image in data["images"]:
        _draw(split / image["file_name"])
    _write_json(split / COCO_FILE, data)
    return split


def _polygon(xs: list[float], ys: list[float]) -> dict[str, Any]:
    return {"name": "polygon", "all_points_x": xs, "all_points_y": ys}


def _via_data() -> dict[str, Any]:
    """VIA export: regions as a dict (VIA 1, the balloon file) and as a list (VIA 2), one empty image."""
    cat = {"shape_attributes": _polygon([5, 40, 20], [5, 10, 40]), "region_attributes": {"label": "cat"}}
    dog = {
        "shape_attributes": {"name": "rect", "x": 30, "y": 10, "width": 30, "height": 30},
        "region_attributes": {"label": "dog"},
    }
    return {
        "a.jpg1234": {"filename": "a.jpg", "size": 1234, "regions": {"0": cat, "1": dog}, "file_attributes": {}},
        "b.jpg5678": {"filename": "b.jpg", "size": 5678, "regions": [copy.deepcopy(cat)], "file_attributes": {}},
        "c.jpg9": {"filename": "c.jpg", "size": 9, "regions": {}, "file_attributes": {}},
    }


def _make_via_split(split: Path, data: dict[str, Any] | None = None) -> Path:
    data = _via_data() if data is None else data
    for entry in data.values():
        _draw(split / entry["filename"])
    _write_json(split / VIA_FILE, data)
    return split


@pytest.fixture
def coco_split(tmp_path: Path) -> Path:
    return _make_coco_split(tmp_path / "train")


@pytest.fixture
def via_split(tmp_path: Path) -> Path:
    return _make_via_split(tmp_path / "train")


def _apply(split: Path, annotation_file: str, mutate: Mutation) -> None:
    path = split / annotation_file
    data = json.loads(path.read_text(encoding="utf-8"))
    replacement = mutate(split, data)
    _write_json(path, data if replacement is None else replacement)


# --------------------------------------------------------------------------- mutations


def _at(data: Any, json_path: str) -> tuple[Any, Any]:
    """The container holding the value at ``json_path`` (``images/0/width``) and its key there."""
    *parents, last = json_path.split("/")
    for part in parents:
        data = data[int(part) if isinstance(data, list) else part]
    return data, int(last) if isinstance(data, list) else last


def set_(json_path: str, value: Any) -> Mutation:
    """Set the JSON value at a path like ``images/0/width``."""

    def mutate(_split: Path, data: Any) -> None:
        parent, key = _at(data, json_path)
        parent[key] = value

    return mutate


def delete(json_path: str) -> Mutation:
    def mutate(_split: Path, data: Any) -> None:
        parent, key = _at(data, json_path)
        del parent[key]

    return mutate


def replace_with(value: Any) -> Mutation:
    return lambda _split, _data: value


def remove_file(name: str) -> Mutation:
    return lambda split, _data: (split / name).unlink()


def truncate_file(name: str) -> Mutation:
    """Re-save ``name`` as a detailed JPEG and cut it in half, as an interrupted download would."""

    def mutate(split: Path, _data: Any) -> None:
        path = split / name
        Image.effect_noise((WIDTH, HEIGHT), 80).convert("RGB").save(path, format="JPEG", quality=95)
        payload = path.read_bytes()
        path.write_bytes(payload[: len(payload) // 2])

    return mutate


def text_as_image(name: str) -> Mutation:
    def mutate(split: Path, _data: Any) -> None:
        (split / name).write_text("this is not an image\n")

    return mutate


def combine(*mutations: Mutation) -> Mutation:
    def mutate(split: Path, data: Any) -> None:
        for mutation in mutations:
            mutation(split, data)

    return mutate


def _assert_single_problem(error: DataValidationError, what: str, where: str) -> Problem:
    """The error holds exactly one problem, naming it and its place, and the report says how to fix it."""
    report = str(error)
    assert error.total == 1, report
    problem = error.problems[0]
    assert what in problem.what, report
    assert where in problem.where, report
    assert problem.fix, report
    assert report.startswith("Dataset validation failed: 1 problem(s) in "), report
    assert f"  1. {problem.what} at {problem.where}\n     fix: {problem.fix}" in report
    return problem


# --------------------------------------------------------------------------- COCO


def test_valid_coco_split_passes_with_summary(coco_split: Path) -> None:
    summary = validate_coco(coco_split)

    assert summary == SplitSummary(
        split="train",
        path=str(coco_split),
        format="coco",
        images=3,
        annotations=3,
        categories=["shapes", "ball", "box"],
        instances_per_category={"shapes": 0, "ball": 2, "box": 1},
    )
    assert json.loads(json.dumps(summary.to_dict()))["instances_per_category"]["ball"] == 2


def test_coco_box_within_one_pixel_tolerance_passes(coco_split: Path) -> None:
    _apply(coco_split, COCO_FILE, set_("annotations/0/bbox", [-0.5, 8, WIDTH + 1, 10]))

    assert validate_coco(coco_split).annotations == 3


def test_coco_check_images_false_skips_image_files(coco_split: Path) -> None:
    (coco_split / "img_1.jpg").unlink()

    assert validate_coco(coco_split, check_images=False).images == 3


def test_coco_size_follows_exif_rotation(coco_split: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: detectron2 reads this 64x48 file as 48x64
    _draw(coco_split / "img_3.png", exif=exif)
    _apply(coco_split, COCO_FILE, combine(set_("images/2/width", HEIGHT), set_("images/2/height", WIDTH)))

    assert validate_coco(coco_split).images == 3


COCO_CASES = [
    pytest.param(replace_with([1, 2]), "top level is a JSON list", COCO_FILE, id="top-level-list"),
    pytest.param(delete("images"), "missing top-level key 'images'", COCO_FILE, id="no-images-key"),
    pytest.param(set_("annotations", {}), "'annotations' is a dict, not a list", COCO_FILE, id="annotations-dict"),
    pytest.param(
        combine(set_("images", []), set_("annotations", [])), "no images in 'images'", COCO_FILE, id="no-images"
    ),
    pytest.param(
        delete("images/0/file_name"), "missing required field 'file_name'", "images[0] (id 1)", id="image-no-file-name"
    ),
    pytest.param(
        set_("images/0/width", 0),
        "image field 'width' is invalid",
        "images[0] (id 1, 'img_1.jpg')",
        id="image-width-zero",
    ),
    pytest.param(
        set_("images/1/height", 48.0), "image field 'height' is invalid", "images[1]", id="image-height-float"
    ),
    pytest.param(
        set_("images/2/id", "3"), "image field 'id' is invalid", "images[2] (id '3', 'img_3.png')", id="image-id-string"
    ),
    pytest.param(
        set_("annotations/0/bbox", [8, 8, 32]),
        "annotation field 'bbox' is invalid",
        "annotations[0] (id 1)",
        id="bbox-three-values",
    ),
    pytest.param(
        set_("annotations/1/bbox", [8, "8", 32, 28]),
        "annotation field 'bbox[1]' is invalid",
        "annotations[1] (id 2)",
        id="bbox-string-value",
    ),
    pytest.param(
        delete("annotations/2/category_id"),
        "missing required field 'category_id'",
        "annotations[2] (id 3)",
        id="annotation-no-category-id",
    ),
    pytest.param(
        set_("annotations/0/image_id", True),
        "annotation field 'image_id' is invalid",
        "annotations[0]",
        id="image-id-bool",
    ),
    pytest.param(
        set_("annotations/1", "oops"),
        "annotation entry is a str, not an object",
        "annotations[1]",
        id="annotation-not-object",
    ),
    pytest.param(
        delete("categories/1/name"), "missing required field 'name'", "categories[1] (id 1)", id="category-no-name"
    ),
    pytest.param(
        set_("images/2/id", 1),
        "duplicate image id 1 (already used by images[0])",
        "images[2] (id 1, 'img_3.png')",
        id="duplicate-image-id",
    ),
    pytest.param(
        set_("annotations/1/id", 1), "duplicate annotation id 1", "annotations[1] (id 1)", id="duplicate-annotation-id"
    ),
    pytest.param(
        set_("categories/0/id", 1), "duplicate category id 1", "categories[1] (id 1)", id="duplicate-category-id"
    ),
    pytest.param(
        set_("categories/2/name", "ball"),
        "category name 'ball' is used by 2 category ids",
        "categories",
        id="duplicate-category-name",
    ),
    pytest.param(
        combine(set_("categories", []), set_("annotations", [])), "no categories", COCO_FILE, id="empty-categories"
    ),
    pytest.param(
        set_("annotations/0/image_id", 99),
        "unknown image id 99",
        "annotation id 1 (image id 99)",
        id="unknown-image-id",
    ),
    pytest.param(
        set_("annotations/0/category_id", 7),
        "unknown category id 7",
        "annotation id 1 (image id 1, 'img_1.jpg')",
        id="unknown-category-id",
    ),
    pytest.param(
        set_("annotations/0/bbox", [8, 8, 0, 10]),
        "box with non-positive width or height",
        "annotation id 1 (image id 1, 'img_1.jpg')",
        id="box-zero-width",
    ),
    pytest.param(
        set_("annotations/2/bbox", [8, 8, 10, -5]),
        "box with non-positive width or height",
        "annotation id 3 (image id 2, 'sub/img_2.jpg')",
        id="box-negative-height",
    ),
    pytest.param(
        set_("annotations/1/bbox", [40, 8, 30, 10]),
        "box outside the image (bbox [40, 8, 30, 10]",
        "annotation id 2 (image id 1, 'img_1.jpg')",
        id="box-past-right-edge",
    ),
    pytest.param(
        set_("annotations/0/bbox", [-3, 8, 10, 10]), "box outside the image", "annotation id 1", id="box-negative-x"
    ),
    pytest.param(
        set_("annotations/2/bbox", [0, 10, 20, HEIGHT]),
        "box outside the image",
        "annotation id 3",
        id="box-past-bottom-edge",
    ),
    pytest.param(
        set_("annotations/0/segmentation", [[8, 8, 40, 8, 40]]),
        "odd number of coordinates (5)",
        "annotation id 1",
        id="polygon-odd-coordinates",
    ),
    pytest.param(
        set_("annotations/0/segmentation", [[8, 8, 40, 8]]),
        "has 2 point(s); at least 3",
        "annotation id 1",
        id="polygon-two-points",
    ),
    pytest.param(
        set_("annotations/0/segmentation", [[8, 8, "x", 8, 40, 36]]),
        "not a list of numbers",
        "annotation id 1",
        id="polygon-non-number",
    ),
    pytest.param(remove_file("img_1.jpg"), "image file not found", "image id 1 ('img_1.jpg')", id="image-file-missing"),
    pytest.param(truncate_file("sub/img_2.jpg"), "truncated", "image id 2 ('sub/img_2.jpg')", id="truncated-jpeg"),
    pytest.param(
        text_as_image("img_1.jpg"), "image file cannot be decoded", "image id 1 ('img_1.jpg')", id="text-file-named-jpg"
    ),
    pytest.param(
        set_("images/0/width", 80),
        "declared size 80x48 differs from the image file's 64x48",
        "image id 1 ('img_1.jpg')",
        id="declared-size-differs",
    ),
]


@pytest.mark.parametrize(("mutate", "what", "where"), COCO_CASES)
def test_coco_problem_is_reported(coco_split: Path, mutate: Mutation, what: str, where: str) -> None:
    _apply(coco_split, COCO_FILE, mutate)

    with pytest.raises(DataValidationError) as caught:
        validate_coco(coco_split)

    problem = _assert_single_problem(caught.value, what, where)
    assert problem.where.startswith(f"train/{COCO_FILE}")


def test_coco_missing_annotation_file_names_the_json_files_present(coco_split: Path) -> None:
    (coco_split / COCO_FILE).rename(coco_split / "instances_train.json")

    with pytest.raises(DataValidationError) as caught:
        validate_coco(coco_split)

    problem = _assert_single_problem(caught.value, "COCO annotation file not found", f"train/{COCO_FILE}")
    assert "instances_train.json" in problem.fix


def test_coco_invalid_json_reports_line_and_column(coco_split: Path) -> None:
    (coco_split / COCO_FILE).write_text('{\n  "images": [\n    {"id": 1,, "file_name": "a.jpg"}\n')

    with pytest.raises(DataValidationError) as caught:
        validate_coco(coco_split)

    _assert_single_problem(caught.value, "is not valid JSON", f"train/{COCO_FILE}: line 3, column 14")


def test_report_is_cut_at_max_problems_and_counts_the_rest(coco_split: Path) -> None:
    orphans = [{"id": 100 + i, "image_id": 999, "category_id": 1, "bbox": [1, 1, 5, 5]} for i in range(35)]
    _apply(coco_split, COCO_FILE, set_("annotations", orphans))

    with pytest.raises(DataValidationError) as caught:
        validate_coco(coco_split, max_problems=20)

    error = caught.value
    report = str(error)
    assert (error.total, len(error.problems)) == (35, 20)
    assert "35 problem(s)" in report and "First 20 of 35:" in report
    assert "first 20 of 35" in report.lower()
    assert "20. annotation refers to unknown image id 999 at" in report
    assert "21." not in report and "15 more" in report
    assert report.count("fix: ") == 20


def test_error_survives_pickling_for_worker_processes(coco_split: Path) -> None:
    _apply(coco_split, COCO_FILE, set_("annotations/0/image_id", 99))
    with pytest.raises(DataValidationError) as caught:
        validate_coco(coco_split)

    copied = pickle.loads(pickle.dumps(caught.value))

    assert isinstance(copied, DataValidationError)
    assert (copied.problems, copied.total, str(copied)) == (caught.value.problems, 1, str(caught.value))


def test_max_problems_must_be_positive(coco_split: Path) -> None:
    with pytest.raises(ValueError, match="max_problems"):
        validate_coco(coco_split, max_problems=0)


# --------------------------------------------------------------------------- VIA


def test_valid_single_class_via_split_passes(via_split: Path) -> None:
    def balloon_style(_split: Path, data: Any) -> None:  # no region attributes at all
        for region in data["a.jpg1234"]["regions"].values():
            region["region_attributes"] = {}

    _apply(via_split, VIA_FILE, balloon_style)

    summary = validate_via(via_split, class_names=["balloon"])

    assert summary == SplitSummary(
        split="train",
        path=str(via_split),
        format="via",
        images=3,
        annotations=3,
        categories=["balloon"],
        instances_per_category={"balloon": 3},
    )


def test_valid_labelled_via_split_passes(via_split: Path) -> None:
    summary = validate_via(via_split, label_attribute="label", class_names=["dog", "cat", "bird"])

    assert summary.categories == ["dog", "cat", "bird"]
    assert summary.instances_per_category == {"dog": 1, "cat": 2, "bird": 0}


def test_via_project_file_is_read_like_an_export(via_split: Path) -> None:
    _apply(via_split, VIA_FILE, lambda _split, data: {"_via_settings": {}, "_via_img_metadata": data})

    assert validate_via(via_split, label_attribute="label").annotations == 3


def test_via_classes_default_to_the_labels_found(via_split: Path) -> None:
    summary = validate_via(via_split, label_attribute="label")

    assert summary.instances_per_category == {"cat": 2, "dog": 1}


def test_via_single_class_needs_exactly_one_class_name(via_split: Path) -> None:
    with pytest.raises(ValueError, match="label_attribute"):
        validate_via(via_split, class_names=["cat", "dog"])


A_REGION = "train/via_region_data.json: 'a.jpg', region 0"

VIA_CASES = [
    pytest.param(replace_with([1, 2]), "not an object keyed by image", VIA_FILE, id="top-level-list"),
    pytest.param(replace_with({}), "no images", VIA_FILE, id="no-entries"),
    pytest.param(delete("a.jpg1234/filename"), "entry has no 'filename'", "entry 'a.jpg1234'", id="entry-no-filename"),
    pytest.param(delete("b.jpg5678/regions"), "entry has no 'regions'", "'b.jpg'", id="entry-no-regions"),
    pytest.param(
        set_("a.jpg1234/regions/0/shape_attributes/all_points_y", [5, 10]),
        "polygon has 3 x coordinates but 2 y coordinates",
        A_REGION,
        id="polygon-unequal-lengths",
    ),
    pytest.param(
        set_("a.jpg1234/regions/0/shape_attributes", _polygon([5, 40], [5, 10])),
        "polygon has 2 point(s); at least 3",
        A_REGION,
        id="polygon-two-points",
    ),
    pytest.param(
        set_("a.jpg1234/regions/0/shape_attributes/all_points_x", [5, None, 20]),
        "lists of numbers",
        A_REGION,
        id="polygon-non-number",
    ),
    pytest.param(
        set_("a.jpg1234/regions/0/shape_attributes/all_points_x", [5, 80, 20]),
        "polygon outside the image (x 5..80, y 5..40, image 64x48)",
        A_REGION,
        id="polygon-outside",
    ),
    pytest.param(
        set_("b.jpg5678/regions/0/shape_attributes/all_points_y", [-4, 10, 40]),
        "polygon outside the image",
        "'b.jpg', region 0",
        id="polygon-above-top",
    ),
    pytest.param(
        set_("a.jpg1234/regions/1/shape_attributes/width", 0),
        "rect with non-positive width",
        "'a.jpg', region 1",
        id="rect-zero-width",
    ),
    pytest.param(
        set_("a.jpg1234/regions/1/shape_attributes/height", 40),
        "rect outside the image",
        "'a.jpg', region 1",
        id="rect-outside",
    ),
    pytest.param(
        set_("a.jpg1234/regions/0/shape_attributes", {"name": "circle", "cx": 9, "cy": 9, "r": 4}),
        "unsupported region shape 'circle'",
        A_REGION,
        id="circle-shape",
    ),
    pytest.param(delete("a.jpg1234/regions/0/shape_attributes"), "no 'shape_attributes'", A_REGION, id="no-shape"),
    pytest.param(
        delete("a.jpg1234/regions/0/region_attributes/label"),
        "region has no 'label' attribute",
        A_REGION,
        id="label-missing",
    ),
    pytest.param(
        set_("b.jpg5678/regions/0/region_attributes/label", "horse"),
        "unknown class 'horse'",
        "'b.jpg', region 0",
        id="label-unknown",
    ),
    pytest.param(
        set_("b.jpg5678/regions/0/region_attributes/label", {"cat": True}),
        "not a class name",
        "'b.jpg', region 0",
        id="label-checkbox",
    ),
    pytest.param(
        remove_file("a.jpg"), "image file not found", "train/via_region_data.json: 'a.jpg'", id="image-missing"
    ),
    pytest.param(text_as_image("c.jpg"), "image file cannot be decoded", "'c.jpg'", id="text-file-named-jpg"),
    pytest.param(truncate_file("b.jpg"), "truncated", "'b.jpg'", id="truncated-jpeg"),
]


@pytest.mark.parametrize(("mutate", "what", "where"), VIA_CASES)
def test_via_problem_is_reported(via_split: Path, mutate: Mutation, what: str, where: str) -> None:
    _apply(via_split, VIA_FILE, mutate)

    with pytest.raises(DataValidationError) as caught:
        validate_via(via_split, label_attribute="label", class_names=["cat", "dog"])

    problem = _assert_single_problem(caught.value, what, where)
    assert problem.where.startswith(f"train/{VIA_FILE}")


def test_via_invalid_json_reports_line(via_split: Path) -> None:
    (via_split / VIA_FILE).write_text('{"a.jpg1": {"filename": "a.jpg",\n "regions": [}}')

    with pytest.raises(DataValidationError) as caught:
        validate_via(via_split)

    _assert_single_problem(caught.value, "VIA annotation file is not valid JSON", f"train/{VIA_FILE}: line 2")


def test_via_check_images_false_skips_files_and_bounds(via_split: Path) -> None:
    _apply(via_split, VIA_FILE, set_("a.jpg1234/regions/0/shape_attributes/all_points_x", [5, 80, 20]))
    (via_split / "b.jpg").unlink()

    assert validate_via(via_split, check_images=False).annotations == 3


# --------------------------------------------------------------------------- whole datasets


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    for folder in ("train", "valid", "test"):
        _make_coco_split(tmp_path / "ds" / folder)
    return tmp_path / "ds"


ROBOFLOW_SPLITS = {"train": "train", "val": "valid", "test": "test"}


def test_valid_coco_dataset_returns_a_summary_per_role(coco_root: Path) -> None:
    summaries = validate_dataset(coco_root, "coco", ROBOFLOW_SPLITS, COCO_FILE)

    assert list(summaries) == ["train", "val", "test"]
    assert summaries["val"].split == "val"
    assert summaries["val"].path == str(coco_root / "valid")
    assert {s.annotations for s in summaries.values()} == {3}


def test_valid_via_dataset(tmp_path: Path) -> None:
    for folder in ("train", "val"):
        _make_via_split(tmp_path / folder)

    summaries = validate_dataset(
        tmp_path, "via", {"train": "train", "val": "val"}, VIA_FILE, label_attribute="label", class_names=["cat", "dog"]
    )

    assert summaries["val"].instances_per_category == {"cat": 2, "dog": 1}


def test_missing_split_folder_lists_the_folders_present(coco_root: Path) -> None:
    with pytest.raises(DataValidationError) as caught:
        validate_dataset(coco_root, "coco", {"train": "train", "val": "val"}, COCO_FILE)

    problem = _assert_single_problem(caught.value, "val split folder 'val' not found", str(coco_root))
    assert "'valid'" in problem.fix


def test_missing_annotation_file_in_one_split(coco_root: Path) -> None:
    (coco_root / "test" / COCO_FILE).unlink()

    with pytest.raises(DataValidationError) as caught:
        validate_dataset(coco_root, "coco", ROBOFLOW_SPLITS, COCO_FILE)

    _assert_single_problem(caught.value, "COCO annotation file not found", f"test/{COCO_FILE}")


def test_val_categories_must_be_known_to_train(coco_root: Path) -> None:
    _apply(coco_root / "valid", COCO_FILE, set_("categories/2/name", "kite"))

    with pytest.raises(DataValidationError) as caught:
        validate_dataset(coco_root, "coco", ROBOFLOW_SPLITS, COCO_FILE)

    problem = _assert_single_problem(
        caught.value, "val split has categories that train lacks: ['kite']", f"valid/{COCO_FILE}"
    )
    assert "train has ['shapes', 'ball', 'box']" in problem.fix


def test_problems_of_all_splits_are_raised_together(coco_root: Path) -> None:
    _apply(coco_root / "train", COCO_FILE, set_("annotations/0/bbox", [50, 8, 30, 10]))
    (coco_root / "test" / "img_3.png").unlink()

    with pytest.raises(DataValidationError) as caught:
        validate_dataset(coco_root, "coco", ROBOFLOW_SPLITS, COCO_FILE)

    error = caught.value
    assert error.total == 2
    assert error.path == str(coco_root)
    assert [p.where.split(":")[0] for p in error.problems] == [f"train/{COCO_FILE}", f"test/{COCO_FILE}"]
    assert str(error).startswith(f"Dataset validation failed: 2 problem(s) in {coco_root}. First 2:")


def test_missing_dataset_root(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError) as caught:
        validate_dataset(tmp_path / "nope", "coco", ROBOFLOW_SPLITS, COCO_FILE)

    _assert_single_problem(caught.value, "dataset folder not found", str(tmp_path / "nope"))


def test_unknown_format_is_a_value_error(coco_root: Path) -> None:
    with pytest.raises(ValueError, match="'coco' or 'via'"):
        validate_dataset(coco_root, "yolo", ROBOFLOW_SPLITS, COCO_FILE)  # type: ignore[arg-type]
