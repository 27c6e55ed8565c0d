"""Hostile inputs get one clear report line, never a traceback (issue 10 §3).

Each case is built here from a small valid COCO or VIA split; the report must name the file,
the entry and the fix, and only DataValidationError / StorageError may escape.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from d2ops.data.coco import _rle_runs
from d2ops.data.validation import DataValidationError, validate_coco, validate_dataset, validate_via
from d2ops.storage import credentials as s3_credentials
from d2ops.storage import s3 as storage
from d2ops.storage.local_s3 import LocalS3, local_s3_endpoint
from d2ops.storage.s3 import CACHE_INDEX_NAME, StorageError
from d2ops.utils import files

# --------------------------------------------------------------------------- full disk: the cache index

_buckets = itertools.count()


@pytest.fixture(scope="module")
def s3() -> Iterator[LocalS3]:
    with local_s3_endpoint() as endpoint:
        yield endpoint


@pytest.fixture
def remote(s3: LocalS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Two small files uploaded to a fresh bucket; returns their prefix URI."""
    monkeypatch.setattr(s3_credentials, "clearml_credentials", lambda: ())
    monkeypatch.delenv("D2OPS_S3_SECURE", raising=False)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(2000))
    (src / "b.bin").write_bytes(os.urandom(3000))
    uri = s3.uri(f"hostile-{next(_buckets)}", "data/")
    storage.upload(src, uri, create_bucket=True, progress=False)
    return uri


def _disk_full_for_index(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Make writing the cache index fail half-way with ENOSPC; every other write goes through.

    The index is written through :func:`d2ops.utils.files.atomic_write`, which opens its temporary file
    with ``open``: that file gets half of the bytes, then the disk is full."""
    real_open = open
    attempts: list[Path] = []

    class HalfWritten:
        def __init__(self, handle: Any) -> None:
            self.handle = handle

        def __enter__(self) -> HalfWritten:
            return self

        def __exit__(self, *exc: Any) -> None:
            self.handle.close()

        def write(self, data: str) -> int:
            self.handle.write(data[: len(data) // 2])  # half of it got on disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name: str) -> Any:
            return getattr(self.handle, name)

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        if Path(file).name.startswith(f".{CACHE_INDEX_NAME}."):
            attempts.append(Path(file))
            return HalfWritten(handle)
        return handle

    monkeypatch.setattr(files, "open", fake_open, raising=False)
    return attempts


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*.part"))


def test_full_disk_while_writing_the_cache_index_is_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "cache"
    dest.mkdir()
    old = {"a.bin": {"etag": "x", "size": 1, "sha256": "y"}}
    (dest / CACHE_INDEX_NAME).write_text(json.dumps(old))
    attempts = _disk_full_for_index(monkeypatch)
    with pytest.raises(StorageError) as info:
        storage._write_index(dest, {"b.bin": {"etag": "z", "size": 2, "sha256": "w"}})
    message = str(info.value)
    assert attempts, "the index write was not reached"
    assert f"disk is full at {dest / CACHE_INDEX_NAME}" in message
    assert "bytes free" in message and "Free space on that disk" in message and "data.cache_dir" in message
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    # The old index is intact and no half-written temporary file is left.
    assert json.loads((dest / CACHE_INDEX_NAME).read_text()) == old
    assert _leftovers(dest) == [] and not attempts[0].exists()


def test_other_index_write_errors_say_what_to_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(src: Any, dst: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(storage.os, "replace", refuse)
    with pytest.raises(StorageError, match=r"cannot write the download cache index .*writable") as info:
        storage._write_index(tmp_path, {})
    assert "disk is full" not in str(info.value)
    assert _leftovers(tmp_path) == []


def test_download_onto_a_full_disk_fails_cleanly(remote: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    _disk_full_for_index(monkeypatch)
    with pytest.raises(StorageError, match=r"disk is full at .*\.d2ops-manifest\.json"):
        storage.download(remote, out, workers=1, progress=False)
    assert _leftovers(out) == []
    assert not (out / CACHE_INDEX_NAME).exists()


def test_full_disk_index_write_does_not_mask_the_transfer_error(
    remote: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk fills while a file arrives; the index write then fails too. The file's error is reported."""
    out = tmp_path / "out"

    def disk_full(body: Any, fh: Any, on_bytes: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "_copy_stream", disk_full)
    _disk_full_for_index(monkeypatch)
    with pytest.raises(StorageError) as info:
        storage.download(remote, out, workers=1, progress=False)
    assert "No space left on device" in str(info.value) and "/data/" in str(info.value)
    assert "cache index" not in str(info.value)
    assert "disk is full at" in caplog.text  # the second failure is still said, at WARNING
    assert _leftovers(out) == []


def test_full_disk_index_write_does_not_mask_an_interrupt(
    remote: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "_run_parallel", interrupted)
    _disk_full_for_index(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        storage.download(remote, tmp_path / "out", workers=1, progress=False)
    assert _leftovers(tmp_path / "out") == []


# --------------------------------------------------------------------------- hostile annotation files

COCO_FILE = "_annotations.coco.json"
VIA_FILE = "via_region_data.json"
# Shaped like a Roboflow export: its renamed image files, and category 0 the project (supercategory of the class)
RF_IMAGE = "img_1_jpg.rf.5d41402abc4b2a76b9719d911017c592.jpg"
RF_CATEGORIES = [
    {"id": 0, "name": "balls", "supercategory": "none"},
    {"id": 1, "name": "ball", "supercategory": "balls"},
]
WIDTH, HEIGHT = 64, 48
_shades = itertools.count(1)


def _draw(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shade = next(_shades)  # every image its own bytes: the same image in two splits is a problem of its own
    Image.new("RGB", (WIDTH, HEIGHT), (shade % 256, 90, shade // 256 % 256)).save(path)


def _coco(file_name: str = RF_IMAGE, **annotation: Any) -> dict[str, Any]:
    return {
        "images": [{"id": 1, "file_name": file_name, "width": WIDTH, "height": HEIGHT}],
        "annotations": [
            {
                "id": 7,
                "image_id": 1,
                "category_id": 1,
                "bbox": [8, 8, 20, 10],
                "area": 200,
                "iscrowd": 0,
                "segmentation": [[8, 8, 28, 8, 28, 18, 8, 18]],
                **annotation,
            }
        ],
        "categories": RF_CATEGORIES,
    }


def _coco_split(split: Path, data: dict[str, Any] | None = None, text: str | None = None) -> Path:
    _draw(split / RF_IMAGE)
    (split / COCO_FILE).write_text(json.dumps(data or _coco()) if text is None else text)
    return split


def _via(filename: str = "a.jpg", regions: list[Any] | None = None) -> dict[str, Any]:
    square = {"name": "polygon", "all_points_x": [5, 30, 30, 5], "all_points_y": [5, 5, 30, 30]}
    regions = [{"shape_attributes": square, "region_attributes": {}}] if regions is None else regions
    return {f"{filename}123": {"filename": filename, "size": 123, "regions": regions, "file_attributes": {}}}


def _via_split(split: Path, data: dict[str, Any] | None = None, text: str | None = None) -> Path:
    _draw(split / "a.jpg")
    (split / VIA_FILE).write_text(json.dumps(data or _via()) if text is None else text)
    return split


def _one_problem(error: DataValidationError, what: str, where: str, fix: str) -> None:
    """The report holds exactly one problem, and its lines name what, where (file and entry) and the fix."""
    report = str(error)
    assert error.total == 1, report
    assert "Traceback" not in report
    problem = error.problems[0]
    assert what in problem.what, report
    assert where in problem.where, report
    assert fix in problem.fix, report
    assert f"1. {problem.what} at {problem.where}\n     fix: {problem.fix}" in report


# --- 1. deep nesting


@pytest.mark.parametrize("where", ["top", "field"])
def test_coco_nested_100000_levels_is_one_problem(tmp_path: Path, where: str) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    text = deep if where == "top" else json.dumps(_coco()).replace('"segmentation": [', f'"segmentation": [{deep}, ', 1)
    split = _coco_split(tmp_path / "train", text=text)
    with pytest.raises(DataValidationError) as info:
        validate_coco(split)
    _one_problem(info.value, "nested too deeply to read", f"train/{COCO_FILE}", "export the annotations again")


def test_via_nested_100000_levels_is_one_problem(tmp_path: Path) -> None:
    split = _via_split(tmp_path / "train", text='{"a": ' + '{"b": ' * 100_000 + "1" + "}" * 100_001)
    with pytest.raises(DataValidationError) as info:
        validate_via(split)
    _one_problem(info.value, "nested too deeply to read", f"train/{VIA_FILE}", "export the annotations again")


# --- 2. an integer of 5,000 digits


def test_coco_5000_digit_integer_names_file_line_and_column(tmp_path: Path) -> None:
    text = json.dumps(_coco(), indent=1).replace(f'"width": {WIDTH}', '"width": ' + "9" * 5000, 1)
    offset = text.index("9" * 5000)
    line = text.count("\n", 0, offset) + 1
    column = offset - text.rfind("\n", 0, offset)
    split = _coco_split(tmp_path / "train", text=text)
    with pytest.raises(DataValidationError) as info:
        validate_dataset(tmp_path, "coco", {"train": "train"}, COCO_FILE)
    _one_problem(
        info.value,
        "holds an integer of 5000 digits, which Python refuses to read",
        f"train/{COCO_FILE}: line {line}, column {column}",
        "correct or delete the number there, or export the annotations again",
    )
    assert split.is_dir()


def test_via_negative_5000_digit_integer(tmp_path: Path) -> None:
    text = json.dumps(_via()).replace('"size": 123', '"size": -' + "1" * 5000)
    split = _via_split(tmp_path / "val", text=text)
    with pytest.raises(DataValidationError) as info:
        validate_via(split)
    _one_problem(info.value, "integer of 5000 digits", f"val/{VIA_FILE}: line 1, column ", "export the annotations")


# --- 3. file names that lead outside the dataset

_opened: list[str] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@pytest.fixture
def opened() -> Iterator[list[str]]:
    """Every file opened while the test runs (the interpreter's 'open' audit event)."""
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A valid image outside the dataset: a leak would decode it without complaint."""
    path = tmp_path / "outside" / "secret.jpg"
    _draw(path)
    return path


def _outside_names(secret: Path, depth: int) -> list[str]:
    return ["../" * depth + "outside/secret.jpg", str(secret), "sub/../" + "../" * depth + "outside/secret.jpg"]


@pytest.mark.parametrize("check_images", [True, False])
def test_coco_file_name_outside_the_split_is_refused_unopened(
    tmp_path: Path, secret: Path, opened: list[str], check_images: bool
) -> None:
    for index, name in enumerate([*_outside_names(secret, 2), "../../../../etc/passwd"]):
        root = tmp_path / f"ds{index}"
        _coco_split(root / "train", _coco(file_name=name))
        with pytest.raises(DataValidationError) as info:
            validate_dataset(root, "coco", {"train": "train"}, COCO_FILE, check_images=check_images)
        _one_problem(
            info.value,
            "image field 'file_name' is invalid: Input should be a path inside the split folder",
            f"train/{COCO_FILE}: images[0] (id 1, {name!r})",
            "relative to the split folder, inside it (no absolute path, no '..')",
        )
    assert any(path.endswith(COCO_FILE) for path in opened)  # the audit hook sees what is opened
    assert not [path for path in opened if "secret" in path or path.endswith("passwd")]


@pytest.mark.parametrize("check_images", [True, False])
def test_via_filename_outside_the_split_is_refused_unopened(
    tmp_path: Path, secret: Path, opened: list[str], check_images: bool
) -> None:
    for index, name in enumerate([*_outside_names(secret, 2), "/etc/passwd"]):
        root = tmp_path / f"ds{index}"
        _via_split(root / "train", _via(filename=name))
        with pytest.raises(DataValidationError) as info:
            validate_dataset(root, "via", {"train": "train"}, VIA_FILE, check_images=check_images)
        _one_problem(
            info.value,
            "'filename' points outside the split folder",
            f"train/{VIA_FILE}: entry {name + '123'!r} (filename {name!r})",
            "set 'filename' to the image's path relative to the split folder, inside it",
        )
    assert not [path for path in opened if "secret" in path or path.endswith("passwd")]


def test_file_names_inside_the_split_still_pass(tmp_path: Path) -> None:
    split = _coco_split(tmp_path / "train")
    _draw(split / "deep" / "x..y.jpg")  # dots in a name are not '..'
    _draw(split / "..hidden.jpg")
    data = _coco()
    for image_id, name in [(2, "deep/x..y.jpg"), (3, "..hidden.jpg"), (4, "./deep/x..y.jpg")]:
        data["images"].append({"id": image_id, "file_name": name, "width": WIDTH, "height": HEIGHT})
    (split / COCO_FILE).write_text(json.dumps(data))
    assert validate_coco(split).images == 4
    via = _via_split(tmp_path / "via", _via(filename="..a.jpg"))
    _draw(via / "..a.jpg")
    assert validate_via(via).images == 1


# --- 4. RLE segmentation


def _rle_problem(tmp_path: Path, segmentation: Any) -> DataValidationError:
    split = _coco_split(tmp_path / "train", _coco(segmentation=segmentation, iscrowd=1))
    with pytest.raises(DataValidationError) as info:
        validate_coco(split)
    return info.value


@pytest.mark.parametrize(
    ("segmentation", "what"),
    [
        ({"counts": "!!!garbage", "size": [HEIGHT, WIDTH]}, "RLE segmentation 'counts' is not a valid string"),
        ({"counts": "0" * 10, "size": [HEIGHT, WIDTH]}, f"'counts' cover 0 pixels, not {HEIGHT}x{WIDTH} = 3072"),
        ({"counts": "Rg", "size": [HEIGHT, WIDTH]}, "'counts' is not a valid string"),  # ends mid-number
        ({"counts": "2@", "size": [HEIGHT, WIDTH]}, "'counts' is not a valid string"),  # a negative run
        ({"counts": [100, 200], "size": [HEIGHT, WIDTH]}, f"'counts' cover 300 pixels, not {HEIGHT}x{WIDTH}"),
        ({"counts": [3000, -5, 77], "size": [HEIGHT, WIDTH]}, "'counts' is not a valid list of pixel counts"),
        ({"counts": {"a": 1}, "size": [HEIGHT, WIDTH]}, "'counts' is not a valid list of pixel counts"),
        ({"counts": [HEIGHT * WIDTH], "size": [WIDTH, HEIGHT]}, f"size [{WIDTH}, {HEIGHT}] differs from the image's"),
        ({"counts": [HEIGHT * WIDTH], "size": [HEIGHT]}, "RLE segmentation 'size' is [48], not [height, width]"),
        ({"counts": [HEIGHT * WIDTH]}, "RLE segmentation 'size' is None, not [height, width]"),
    ],
)
def test_bad_rle_is_one_problem(tmp_path: Path, segmentation: Any, what: str) -> None:
    _one_problem(
        _rle_problem(tmp_path, segmentation),
        what,
        f"train/{COCO_FILE}: annotation id 7 (image id 1, {RF_IMAGE!r})",
        "export the masks again, or replace the RLE with polygons",
    )


def test_rle_written_by_pycocotools_passes(tmp_path: Path) -> None:
    mask_util = pytest.importorskip("pycocotools.mask")
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8, order="F")
    mask[5:30, 8:40] = 1
    compressed = mask_util.encode(mask)
    compressed["counts"] = compressed["counts"].decode()
    split = _coco_split(tmp_path / "train", _coco(segmentation=compressed, iscrowd=1))
    assert validate_coco(split).annotations == 1
    # The same mask uncompressed: runs of 0s and 1s down the columns (column-major), 0s first.
    runs = [HEIGHT * 8 + 5, *[25, HEIGHT - 25] * 31, 25, HEIGHT - 30 + HEIGHT * (WIDTH - 40)]
    assert _rle_runs(compressed["counts"]) == runs
    (split / COCO_FILE).write_text(json.dumps(_coco(segmentation={"counts": runs, "size": [HEIGHT, WIDTH]})))
    assert validate_coco(split).annotations == 1


def test_compressed_rle_runs_match_pycocotools() -> None:
    """The structural decoder reads pycocotools' strings back to the runs of the mask they encode."""
    mask_util = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for height, width in [(1, 1), (7, 5), (48, 64), (300, 200)]:
        for density in (0.0, 0.02, 0.5, 1.0):
            mask = np.asfortranarray((rng.random((height, width)) < density).astype(np.uint8))
            counts = mask_util.encode(mask)["counts"].decode()
            runs = _rle_runs(counts)
            assert runs is not None and sum(runs) == height * width
            flat = np.repeat(np.arange(len(runs)) % 2, runs).astype(np.uint8)
            assert np.array_equal(flat.reshape((width, height)).T, mask)


# --- 5. negative area


def test_negative_area_is_one_problem(tmp_path: Path) -> None:
    split = _coco_split(tmp_path / "train", _coco(area=-200))
    with pytest.raises(DataValidationError) as info:
        validate_coco(split)
    _one_problem(
        info.value,
        "annotation field 'area' is invalid: Input should be greater than or equal to 0 (got -200)",
        f"train/{COCO_FILE}: annotations[0] (id 7)",
        "set area to the object's area in pixels (0 or more)",
    )


def test_missing_or_zero_area_passes(tmp_path: Path) -> None:
    data = _coco(area=0)
    data["annotations"].append({**_coco()["annotations"][0], "id": 8})
    del data["annotations"][1]["area"]
    assert validate_coco(_coco_split(tmp_path / "train", data)).annotations == 2


# --- 6. a train split without annotations


def test_coco_train_split_without_annotations_is_one_problem(tmp_path: Path) -> None:
    data = _coco()
    data["annotations"] = []
    _coco_split(tmp_path / "train", data)
    with pytest.raises(DataValidationError) as info:
        validate_dataset(tmp_path, "coco", {"train": "train"}, COCO_FILE)
    _one_problem(
        info.value,
        "train split has no annotations (1 images, 0 annotations)",
        f"train/{COCO_FILE}",
        "check the export",
    )


def test_via_train_split_without_regions_is_one_problem(tmp_path: Path) -> None:
    _via_split(tmp_path / "training", _via(regions=[]))
    with pytest.raises(DataValidationError) as info:
        validate_dataset(tmp_path, "via", {"train": "training"}, VIA_FILE)
    _one_problem(info.value, "train split has no annotations (1 images, 0 regions)", f"training/{VIA_FILE}", "export")


def test_val_split_without_annotations_is_allowed(tmp_path: Path) -> None:
    _coco_split(tmp_path / "train")
    data = _coco()
    data["annotations"] = []
    _coco_split(tmp_path / "valid", data)
    summaries = validate_dataset(tmp_path, "coco", {"train": "train", "val": "valid"}, COCO_FILE)
    assert summaries["val"].annotations == 0


def test_nul_in_a_file_name_is_reported_with_the_duplicate_check_on(tmp_path: Path) -> None:
    # the cross-split duplicate check hashes every listed image; a NUL byte cannot even be resolved
    # by the OS, so that check must skip it and leave the report to the per-entry validation
    for role in ("train", "val"):
        _coco_split(tmp_path / role, _coco(file_name="a\x00.jpg"))
    with pytest.raises(DataValidationError) as info:
        validate_dataset(tmp_path, "coco", {"train": "train", "val": "val"}, COCO_FILE, duplicate_images="error")
    assert "'file_name' is invalid" in str(info.value)
    assert "a\\x00.jpg" in str(info.value)
