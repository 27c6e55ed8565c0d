"""Datasets shaped like the real exports users bring, made in the test.

- A Roboflow COCO export: ``<split>/_annotations.coco.json``, category 0 the project (supercategory
  ``none``, no annotations, the parent of every real class), image files renamed ``<stem>_jpg.rf.<hash>.jpg``.
- A VIA export in the balloon layout: ``via_region_data.json`` with empty ``region_attributes``.

What a model would inherit is followed through the real steps (download, train, evaluate, infer,
register; offline ClearML sessions, detectron2 on the CPU): the phantom class must reach none of
NUM_CLASSES, labels.json, the bundle, the confusion matrix, the ClearML label enumeration or the
nuclio function's CVAT label spec.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image, ImageDraw

from d2ops.config import load_config
from d2ops.data.registration import coco_categories, dataset_classes
from d2ops.data.synthetic import SHAPE_CLASSES, generate_shapes_dataset
from d2ops.utils.offline_session import session_file

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "configs" / "smoke.yaml")
PROJECT = "shapes-rf4x2"


def roboflow_export(root: Path, counts: dict[str, int] | None = None, *, empty_class: bool = False) -> Path:
    """The synthetic shapes as Roboflow exports them (category 0 = the project, ``.rf.`` file names)."""
    generate_shapes_dataset(root, counts=counts or {"train": 24, "valid": 4, "test": 6}, seed=3)
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        ann = split_dir / "_annotations.coco.json"
        data = json.loads(ann.read_text())
        for image in data["images"]:
            stem = Path(image["file_name"]).stem
            renamed = f"{stem}_jpg.rf.{hashlib.md5(stem.encode()).hexdigest()}.jpg"  # the same names every run
            (split_dir / image["file_name"]).rename(split_dir / renamed)
            image["file_name"] = renamed
        categories = [{"id": 0, "name": PROJECT, "supercategory": "none"}]
        categories += [{**c, "supercategory": PROJECT} for c in data["categories"]]
        if empty_class:
            categories.append({"id": 4, "name": "hexagon", "supercategory": PROJECT})
        data["categories"] = categories
        ann.write_text(json.dumps(data))
    return root


def via_export(root: Path) -> Path:
    """Two VIA splits in the balloon layout: polygons, ``region_attributes`` empty."""
    for shade, (split, count) in enumerate((("train", 4), ("val", 2))):
        split_dir = root / split
        split_dir.mkdir(parents=True)
        entries = {}
        for i in range(count):
            name = f"drop{i}.jpg"
            img = Image.new("RGB", (96, 64), (30, 10 * shade, 10 * i))  # no image in two splits
            xs, ys = [20, 50, 50, 20], [10, 10, 40, 40]
            ImageDraw.Draw(img).polygon(list(zip(xs, ys, strict=True)), fill=(200, 200, 255))
            img.save(split_dir / name)
            size = (split_dir / name).stat().st_size
            regions = {"0": {"shape_attributes": {"name": "polygon", "all_points_x": xs, "all_points_y": ys},
                             "region_attributes": {}}}  # fmt: skip
            entries[f"{name}{size}"] = {"filename": name, "size": size, "regions": regions, "file_attributes": {}}
        (split_dir / "via_region_data.json").write_text(json.dumps(entries))
    return root


def _via_overrides(root: Path, tmp_path: Path, label: str) -> list[str]:
    """smoke.yaml on the VIA export at ``root``, single-class: every region is ``label``."""
    return [
        f"data.source={root}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.format=via",
        "data.annotation_file=via_region_data.json",
        "data.splits={train: train, val: val}",
        f"data.class_names=[{label}]",
        "eval.split=val",
    ]


def test_roboflow_supercategory_is_dropped_and_named(tmp_path: Path) -> None:
    root = roboflow_export(tmp_path / "rf", {"train": 6, "valid": 2, "test": 2}, empty_class=True)
    files = {role: root / role / "_annotations.coco.json" for role in ("train", "valid", "test")}
    categories = coco_categories(files)
    assert categories.class_names == [*SHAPE_CLASSES, "hexagon"]
    assert [c["id"] for c in categories.dropped] == [0]
    dropped, empty = categories.notes
    assert f"category 0 {PROJECT!r} is dropped" in dropped
    assert "supercategory of 'circle', 'hexagon', 'square', 'triangle'" in dropped
    assert "'hexagon' has no annotations in any split: it stays class 4" in empty and "never learn" in empty


def test_detectron2_sees_only_the_real_classes(tmp_path: Path) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from d2ops.data.registration import register_splits

    root = roboflow_export(tmp_path / "rf", {"train": 6, "valid": 2, "test": 2})
    cfg = load_config(SMOKE, [f"data.source={root}", f"data.cache_dir={tmp_path / 'cache'}"])
    dataset = register_splits(root, cfg.data)
    assert dataset.class_names == list(SHAPE_CLASSES)
    train = dataset.name("train")
    records = DatasetCatalog.get(train)  # detectron2's own load_coco_json on the registered file
    meta = MetadataCatalog.get(train)
    assert meta.thing_classes == list(SHAPE_CLASSES)
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}
    original = json.loads((root / "train" / "_annotations.coco.json").read_text())
    names = {c["id"]: c["name"] for c in original["categories"]}
    by_file = {Path(r["file_name"]).name: r for r in records}
    for ann in original["annotations"]:
        image = next(i for i in original["images"] if i["id"] == ann["image_id"])
        labels = [meta.thing_classes[a["category_id"]] for a in by_file[image["file_name"]]["annotations"]]
        assert names[ann["category_id"]] in labels
    cleaned = json.loads(Path(meta.json_file).read_text())
    assert [c["id"] for c in cleaned["categories"]] == [1, 2, 3] and cleaned["images"] == original["images"]
    assert Path(meta.json_file).is_relative_to(tmp_path / "cache"), "the export itself is left as it came"


def test_via_single_class_label_is_said_and_recorded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from d2ops.pipeline.steps import StepContext, run_download

    root = via_export(tmp_path / "droplets")
    overrides = _via_overrides(root, tmp_path, "balloon")
    cfg = load_config(SMOKE, overrides)
    with caplog.at_level(logging.WARNING, logger="d2ops"):
        out = run_download(StepContext(cfg=cfg, workdir=tmp_path / "download"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("every VIA region is labelled 'balloon'" in w and "data.label_attribute is null" in w for w in warnings)
    manifest = json.loads(out.files["dataset_manifest"].read_text())
    assert manifest["classes"] == ["balloon"]
    assert "data.class_names=[<your class>]" in manifest["class_notes"][0]
    assert dataset_classes(root, cfg.data) == (["balloon"], manifest["class_notes"])


@pytest.fixture(scope="module")
def roboflow_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The whole offline pipeline on a Roboflow export (a few iterations: the classes, not the quality)."""
    from d2ops.clearml.session import enable_offline
    from d2ops.clearml.step import run_offline

    root = tmp_path_factory.mktemp("roboflow")
    previous = os.environ.get("CLEARML_CACHE_DIR")
    enable_offline(root / "clearml")
    data = roboflow_export(root / "export")
    overrides = [
        f"data.source={data}",
        f"data.cache_dir={root / 'cache'}",
        f"runtime.output_dir={root / 'run'}",
        f"registry.local_dir={root / 'registry'}",
        "runtime.device=cpu",
        "solver.max_iter=6",
        "solver.warmup_iters=2",
        "solver.steps=[]",
        "solver.eval_period=0",
        "solver.checkpoint_period=1000",
        "inference.debug_images=0",
        "registry.quality_gate.min_value=0",
    ]
    run = run_offline(SMOKE, overrides)
    yield {"root": root, "run": run}
    if previous is None:
        os.environ.pop("CLEARML_CACHE_DIR", None)
    else:
        os.environ["CLEARML_CACHE_DIR"] = previous


@pytest.mark.slow
def test_no_phantom_class_reaches_the_model(roboflow_run: dict[str, Any], tmp_path: Path) -> None:
    from d2ops.model.bundle import ModelBundle
    from d2ops.serving.nuclio import export_nuclio

    run, classes = roboflow_run["run"], list(SHAPE_CLASSES)
    train = run.steps["train"]
    assert json.loads(Path(train.artifacts["labels"]).read_text()) == classes
    d2_config = yaml.safe_load(Path(train.artifacts["d2_config"]).read_text())
    assert d2_config["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 3
    metrics = json.loads(Path(run.steps["evaluate"].artifacts["metrics"]).read_text())
    assert metrics["confusion_labels"] == [*classes, "background"]
    assert set(metrics["per_class_ap"]) == set(classes)
    manifest = json.loads(Path(run.steps["download"].artifacts["dataset_manifest"]).read_text())
    assert manifest["classes"] == classes and PROJECT in manifest["class_notes"][0]
    bundle = ModelBundle(Path(run.steps["register"].values["bundle"]))
    assert bundle.labels() == classes
    assert PROJECT in bundle.metadata()["class_notes"][0]
    task = json.loads(session_file(run.steps["register"].session, "task.json") or b"{}")
    (model,) = task["offline_output_models"]
    assert model["init"]["label_enumeration"] == {"square": 1, "circle": 2, "triangle": 3}
    export = export_nuclio(bundle.path, tmp_path / "nuclio")
    spec = yaml.safe_load((export.function_dir("cpu") / "function.yaml").read_text())
    labels = json.loads(spec["metadata"]["annotations"]["spec"])
    assert [label["name"] for label in labels] == classes
    assert _served_labels(bundle.path, tmp_path) == classes


def _served_labels(bundle: Path, tmp_path: Path) -> list[str]:
    """The labels a real ``d2ops serve`` process on the bundle says at ``GET /v1/models``."""
    import socket
    import subprocess
    import sys

    import httpx

    from d2ops.testing import wait_until_ready

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "d2ops", "serve", "--model", str(bundle), "--port", str(port), "--device", "cpu"]
    with (tmp_path / "serve.log").open("wb") as log:
        server = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(port, server, tmp_path / "serve.log")
        reply = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()
    finally:
        server.terminate()
        server.wait(30)
    (model,) = reply["models"]
    return list(model["labels"])


def _leak_train_image_into_valid(root: Path) -> tuple[str, str]:
    """Copy one training image, with its annotations, into valid under another name (as merged exports do)."""
    train = json.loads((root / "train" / "_annotations.coco.json").read_text())
    valid_file = root / "valid" / "_annotations.coco.json"
    valid = json.loads(valid_file.read_text())
    image = train["images"][0]
    copy = {**image, "id": 999, "file_name": "leak_jpg.rf.0000.jpg"}
    shutil.copyfile(root / "train" / image["file_name"], root / "valid" / copy["file_name"])
    next_id = max(a["id"] for a in valid["annotations"]) + 1
    anns = [a for a in train["annotations"] if a["image_id"] == image["id"]]
    valid["images"].append(copy)
    valid["annotations"] += [{**a, "id": next_id + i, "image_id": 999} for i, a in enumerate(anns)]
    valid_file.write_text(json.dumps(valid))
    return f"train/{image['file_name']}", f"valid/{copy['file_name']}"


def test_an_image_in_two_splits_is_an_error_by_default(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from d2ops.data.validation import DataValidationError, validate_dataset
    from d2ops.pipeline.steps import StepContext, run_download

    root = roboflow_export(tmp_path / "rf", {"train": 4, "valid": 2, "test": 2})
    in_train, in_valid = _leak_train_image_into_valid(root)
    splits = {"train": "train", "val": "valid", "test": "test"}
    with pytest.raises(DataValidationError) as caught:
        validate_dataset(root, "coco", splits, "_annotations.coco.json")
    report = str(caught.value)
    assert "the same image is in 2 splits" in report and f"train {in_train} = val {in_valid}" in report
    assert "--set data.duplicate_images=warn" in report
    overrides = [f"data.source={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.duplicate_images=warn"]
    with caplog.at_level(logging.WARNING, logger="d2ops"):
        run_download(StepContext(cfg=load_config(SMOKE, overrides), workdir=tmp_path / "download"))
    assert any("the same image is in 2 splits" in r.getMessage() and in_valid in r.getMessage() for r in caplog.records)


def test_a_wrong_label_attribute_is_one_problem_per_split_naming_what_is_there(tmp_path: Path) -> None:
    from d2ops.data.validation import DataValidationError, validate_dataset

    root = via_export(tmp_path / "droplets")
    for split_file in root.glob("*/via_region_data.json"):
        entries = json.loads(split_file.read_text())
        for entry in entries.values():
            for region in entry["regions"].values():
                region["region_attributes"] = {"kind": "droplet", "note": ""}
        split_file.write_text(json.dumps(entries))
    with pytest.raises(DataValidationError) as caught:
        validate_dataset(
            root, "via", {"train": "train", "val": "val"}, "via_region_data.json", label_attribute="type",
            class_names=["droplet"],
        )  # fmt: skip
    problems = caught.value.problems
    assert [p.where for p in problems] == [
        f"{s}/via_region_data.json: regions[*].region_attributes" for s in ("train", "val")
    ]
    assert problems[0].what == (
        "label attribute 'type' is on no region (of 4); "
        "attributes present: 'kind' (on 4 regions), 'note' (on 4 regions)"
    )
    assert (
        "set data.label_attribute to the attribute holding each region's class (one of those above)" in problems[0].fix
    )


def test_a_missing_val_split_names_the_uri_and_the_set_lines(tmp_path: Path) -> None:
    from d2ops.data.validation import DataValidationError
    from d2ops.pipeline.steps import StepContext, run_download
    from d2ops.storage import s3 as storage
    from d2ops.storage.local_s3 import local_s3_endpoint

    export = roboflow_export(tmp_path / "rf", {"train": 6, "test": 2})  # exported without valid/
    with local_s3_endpoint() as s3:
        uri = s3.uri("datasets", "cells/")
        storage.upload(export, uri, create_bucket=True, progress=False)
        cfg = load_config(SMOKE, [f"data.source={uri}", f"data.cache_dir={tmp_path / 'cache'}"])
        with pytest.raises(DataValidationError) as caught:
            run_download(StepContext(cfg=cfg, workdir=tmp_path / "download"))
    (problem,) = caught.value.problems
    assert problem.what == "val split folder 'valid' not found" and problem.where == uri
    assert problem.fix == (
        f"add the folder 'valid' to {uri} (it has 'test', 'train'), "
        "or carve a seeded validation split from train: --set data.val_fraction=0.1"
    )


@pytest.mark.slow
def test_val_fraction_carves_a_seeded_val_split_from_train(tmp_path: Path) -> None:
    from detectron2.data import DatasetCatalog

    from d2ops.data.registration import carved_val_images, register_splits
    from d2ops.pipeline.steps import StepContext, run_download

    export = roboflow_export(tmp_path / "rf", {"train": 20, "test": 2})
    overrides = [f"data.source={export}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.25"]
    cfg = load_config(SMOKE, overrides)
    out = run_download(StepContext(cfg=cfg, workdir=tmp_path / "download"))
    carved = json.loads(out.files["dataset_manifest"].read_text())["val_carved_from_train"]
    assert len(carved) == 5 and carved == carved_val_images(export, cfg.data), "same seed, same split"
    assert carved != carved_val_images(export, load_config(SMOKE, [*overrides, "data.val_seed=1"]).data)
    dataset = register_splits(export, cfg.data)
    train = {Path(r["file_name"]).name for r in DatasetCatalog.get(dataset.name("train"))}
    val = {Path(r["file_name"]).name for r in DatasetCatalog.get(dataset.name("val"))}
    assert val == set(carved) and len(train) == 15 and not train & val
    assert all(r["annotations"] for r in DatasetCatalog.get(dataset.name("val"))), "annotations follow their image"


def test_val_fraction_never_splits_byte_identical_images(tmp_path: Path) -> None:
    """One photo exported twice under two names goes to val or to train as a pair, whatever the seed, so
    a carved val never holds a training image (the leak the duplicate check exists for)."""
    from d2ops.data.registration import carved_val_images

    export = roboflow_export(tmp_path / "rf", {"train": 8, "test": 2})
    ann = export / "train" / "_annotations.coco.json"
    data = json.loads(ann.read_text())
    first = data["images"][0]
    twin = {**first, "id": 999, "file_name": "twin_jpg.rf.0000.jpg"}
    shutil.copy(export / "train" / first["file_name"], export / "train" / twin["file_name"])
    data["images"].append(twin)
    ann.write_text(json.dumps(data))
    pair = {first["file_name"], twin["file_name"]}
    sides = set()
    for seed in range(48):
        cfg = load_config(SMOKE, [f"data.source={export}", "data.val_fraction=0.25", f"data.val_seed={seed}"])
        carved = set(carved_val_images(export, cfg.data))
        assert len(carved) == 2, "round(9 * 0.25) images: the pair, or two others"
        assert pair <= carved or not pair & carved, f"seed {seed} split the pair: {sorted(carved)}"
        sides.add(pair <= carved)
    assert sides == {True, False}, "some seed puts the pair in val, another leaves it in train"
    for image in data["images"][1:]:  # every train image the same photo: no val can be carved without a leak
        shutil.copy(export / "train" / first["file_name"], export / "train" / image["file_name"])
    cfg = load_config(SMOKE, [f"data.source={export}", "data.val_fraction=0.25"])
    with pytest.raises(ValueError, match=r"data\.val_fraction: every image in .* is byte-identical"):
        carved_val_images(export, cfg.data)


@pytest.mark.slow
def test_a_single_class_model_has_its_per_class_ap(tmp_path: Path) -> None:
    """detectron2's COCOEvaluator gives no AP-<class> when there is one class (``_derive_coco_results``
    returns before them): the one class's AP is the AP, in metrics.json, summary.json and report.html's
    table, not an empty table (seen on the balloon-layout export)."""
    from d2ops.pipeline.steps import StepContext, run_evaluate, run_train

    root = via_export(tmp_path / "droplets")
    overrides = [
        *_via_overrides(root, tmp_path, "droplet"),
        "eval.score_threshold=0",
        "solver.max_iter=2",
        "solver.warmup_iters=1",
        "solver.eval_period=0",
        "runtime.device=cpu",
        f"runtime.output_dir={tmp_path / 'run'}",
    ]
    ctx = StepContext(cfg=load_config(SMOKE, overrides), workdir=tmp_path / "work")
    ctx.inputs = {name: str(path) for name, path in run_train(ctx).files.items()}
    values = run_evaluate(ctx).values
    assert list(values["per_class_ap"]) == ["droplet"]
    (ap,) = values["per_class_ap"].values()
    assert ap == values["bbox"]["AP"] or (ap != ap and values["bbox"]["AP"] != values["bbox"]["AP"]), values
