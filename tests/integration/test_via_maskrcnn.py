"""The balloon-style path: a VIA polygon dataset, validated, registered and trained with Mask R-CNN."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2ops.config import load_config

REPO = Path(__file__).resolve().parents[2]


def _coco_to_via(coco_split: Path, via_split: Path) -> None:
    """Rewrite a synthetic COCO split as VIA polygons (each box's outline), images copied."""
    import shutil

    via_split.mkdir(parents=True)
    coco = json.loads((coco_split / "_annotations.coco.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    entries = {}
    for image in coco["images"]:
        shutil.copy(coco_split / image["file_name"], via_split / image["file_name"])
        regions = []
        for ann in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
            x, y, w, h = ann["bbox"]
            regions.append(
                {
                    "shape_attributes": {
                        "name": "polygon",
                        "all_points_x": [x, x + w - 1, x + w - 1, x],
                        "all_points_y": [y, y, y + h - 1, y + h - 1],
                    },
                    "region_attributes": {"label": names[ann["category_id"]]},
                }
            )
        size = (via_split / image["file_name"]).stat().st_size
        entries[f"{image['file_name']}{size}"] = {
            "filename": image["file_name"],
            "size": size,
            "regions": regions,
            "file_attributes": {},
        }
    (via_split / "via_region_data.json").write_text(json.dumps(entries))


@pytest.fixture(scope="module")
def via_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from d2ops.data.synthetic import generate_shapes_dataset

    coco = generate_shapes_dataset(tmp_path_factory.mktemp("coco"), counts={"train": 6, "val": 3})
    root = tmp_path_factory.mktemp("via")
    for split in ("train", "val"):
        _coco_to_via(coco / split, root / split)
    return root


def _cfg(root: Path, tmp: Path):  # type: ignore[no-untyped-def]
    return load_config(
        REPO / "configs" / "smoke.yaml",
        [
            f"data.source={root}",
            "data.format=via",
            "data.annotation_file=via_region_data.json",
            "data.splits={train: train, val: val}",
            "data.class_names=[square, circle, triangle]",
            "data.label_attribute=label",
            "model.zoo_config=COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
            "solver.max_iter=3",
            "solver.eval_period=0",
            "eval.split=val",
            f"runtime.output_dir={tmp}",
        ],
    )


def test_via_dataset_registers_with_polygons(via_dataset: Path, tmp_path: Path) -> None:
    from detectron2.data import DatasetCatalog

    from d2ops.data.registration import register_splits
    from d2ops.data.validation import validate_dataset

    cfg = _cfg(via_dataset, tmp_path)
    summaries = validate_dataset(
        via_dataset,
        "via",
        {"train": "train", "val": "val"},
        "via_region_data.json",
        label_attribute="label",
        class_names=["square", "circle", "triangle"],
    )
    assert summaries["train"].images == 6
    dataset = register_splits(via_dataset, cfg.data)
    assert dataset.class_names == ["square", "circle", "triangle"]
    records = DatasetCatalog.get(dataset.name("train"))
    assert len(records) == 6
    obj = records[0]["annotations"][0]
    assert len(obj["segmentation"][0]) == 8 and obj["category_id"] in (0, 1, 2)


@pytest.mark.slow
def test_mask_rcnn_trains_evaluates_and_predicts_polygons(via_dataset: Path, tmp_path: Path) -> None:
    from detectron2.data.detection_utils import read_image

    from d2ops.pipeline.steps import StepContext, run_evaluate, run_train

    ctx = StepContext(cfg=_cfg(via_dataset, tmp_path), workdir=tmp_path)
    trained = run_train(ctx)
    assert trained.values["iterations"] == 3
    ctx.inputs = {name: str(path) for name, path in trained.files.items()}
    evaluated = run_evaluate(ctx)
    assert "AP" in evaluated.values["segm"], "Mask R-CNN must be scored on masks too"
    assert evaluated.values["images"] == 3

    from detectron2.config import get_cfg

    from d2ops.model.detector import Detector

    d2 = get_cfg()
    d2.set_new_allowed(True)
    d2.merge_from_file(str(trained.files["d2_config"]))
    d2.defrost()
    d2.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    detector = Detector(d2, str(trained.files["weights"]), ["square", "circle", "triangle"], "cpu")
    image = read_image(str(next((via_dataset / "val").glob("*.jpg"))), format="BGR")
    detections = detector.predict([image])[0]
    assert detections, "an untrained model with threshold 0 still proposes boxes"
    assert all(d.mask is not None and d.mask_box is not None for d in detections), "detections carry masks"
    from d2ops.serving.replies import to_cvat

    assert len(to_cvat(detections)) == len(detections), "one CVAT shape per object"
