"""The end-of-run summary a person reads: what it prints for a box model and for a segmenting one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from d2ops.pipeline.report import format_summary


def _summary(segm: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "bbox": {"AP": 82.13, "AP50": 100.0, "AP75": 99.0, "APl": None, "per_class": {"balloon": 82.13}},
        "segm": segm,
        "f2": 0.98,
        "precision": 0.97,
        "recall": 0.99,
        "score_threshold": 0.7,
        "quality_gate": {"metric": "bbox.AP50", "min_value": 75.0, "value": 100.0, "passed": True},
        "champion_gate": None,
        "model_bundle": "/out/run/bundle/balloon-mask-rcnn",
        "predictions": "/out/run/infer/predictions.coco.json",
        "clearml_sessions": {"train": "/out/clearml/offline/offline-1.zip"},
        "train_seconds": 1200.4,
        "device": "cpu",
        "total_seconds": 1276.0,
    }


def test_a_segmenting_model_prints_its_mask_ap_beside_the_box_ap() -> None:
    text = format_summary(_summary({"AP": 78.43, "AP50": 100.0, "AP75": None}), Path("/out/summary.json"))
    assert "  bbox AP 82.1  AP50 100.0  AP75 99.0   per class: balloon 82.1" in text
    assert "  segm AP 78.4  AP50 100.0  AP75 n/a" in text  # null (not measured) reads n/a
    assert "quality gate bbox.AP50 >= 75.0: PASSED" in text
    assert "    train     /out/clearml/offline/offline-1.zip" in text


def test_a_box_model_prints_no_mask_line() -> None:
    text = format_summary(_summary(None), Path("/out/summary.json"))
    assert "segm" not in text and "bbox AP 82.1" in text
