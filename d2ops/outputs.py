"""The schemas of the JSON files a run ends with: ``summary.json`` and the evaluate step's ``metrics.json``.

They say what each number is and, above all, what ``null`` means: **not measured**, never zero. COCO
evaluation cannot measure some numbers on some data, and Python would write them as ``NaN``, which is not
JSON; d2ops writes ``null`` (:mod:`d2ops.utils.jsonio`). The schemas are pydantic models, so the files
are checked against them in the tests, and ``python -m d2ops.outputs DIR`` writes them as JSON Schema
(``docs/schemas/``, kept in step with this module by a test) for jq users, dashboards and other tools.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Metrics", "Summary", "json_schemas", "main"]

NOT_MEASURED = (
    "null: not measured, never zero. COCO leaves APs, APm or APl unmeasured when no ground-truth object of "
    "that size is in the evaluated split (small: area < 32x32 px, medium: up to 96x96 px, large: above), and "
    "a class with no ground-truth object there has no AP; a metric read from such a result is null too."
)

Measured = Annotated[
    float | None,
    Field(allow_inf_nan=False, description=f"A number (COCO AP in 0..100, ratios in 0..1); {NOT_MEASURED}"),
]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CocoAP(_Schema):
    """COCO average precision of one task (``bbox`` or ``segm``), 0..100."""

    model_config = ConfigDict(extra="allow")  # detectron2 adds AP-<class> keys: numbers, or null
    __pydantic_extra__: dict[str, Measured]

    AP: Measured = Field(description="AP over IoU 0.50:0.95")
    AP50: Measured = Field(description="AP at IoU 0.50")
    AP75: Measured = Field(description="AP at IoU 0.75")
    APs: Measured = Field(description="AP of small objects (area < 32x32 px)")
    APm: Measured = Field(description="AP of medium objects (32x32 to 96x96 px)")
    APl: Measured = Field(description="AP of large objects (area > 96x96 px)")


class SummaryBox(CocoAP):
    per_class: dict[str, Measured] = Field(description="class name -> bbox AP")


class Gate(_Schema):
    """The quality floor: the candidate's ``metric`` against ``min_value``."""

    metric: str = Field(description="a dotted metric name: bbox.AP50, f2, recall, ...")
    value: Measured = Field(description="the candidate's value; null (not measured) fails the gate")
    min_value: float
    passed: bool


class ChampionGate(_Schema):
    """Champion/challenger: whether the candidate replaces the current production model."""

    model_config = ConfigDict(extra="allow")

    promote: bool
    reason: str
    metric: str
    candidate_score: Measured
    champion_id: str | None = Field(description="the current production model; null when there is none yet")
    champion_score: Measured
    min_improvement: float
    floor: Gate
    margin: Measured = Field(description="candidate minus champion; null when there is no champion to compare")
    scored_in: str


class Summary(_Schema):
    """``summary.json``: what an offline run (``make demo``, ``run_pipeline.py --offline``) ends with."""

    bbox: SummaryBox
    segm: CocoAP | None = Field(description="mask AP of a segmenting model; null for a box-only model")
    f2: Measured = Field(description="F-beta at eval.score_threshold and eval.iou_threshold (beta = eval.f_beta)")
    precision: Measured
    recall: Measured
    score_threshold: float
    quality_gate: Gate
    champion_gate: ChampionGate | None
    model_bundle: str = Field(description="the model bundle folder")
    model_registration: dict[str, Any] = Field(description="the registered model: name, id, tags, labels, metadata")
    predictions: str | None = Field(description="the batch inference's COCO predictions file")
    inference_runtime: str | None = Field(
        description="the runtime the batch inference ran on (inference.runtime: pytorch, torchscript, onnx, openvino)"
    )
    inference_seconds_per_image: float | None = Field(description="the batch inference's wall time per image")
    clearml_sessions: dict[str, str] = Field(description="step -> its offline session zip (import_offline_session)")
    train_seconds: float | None
    device: str | None
    total_seconds: float


class Metrics(_Schema):
    """``run/evaluate/metrics.json``, the evaluate step's ``metrics`` artifact: every evaluation number."""

    model_config = ConfigDict(extra="allow")  # f<beta> (f2, f0.5): the same number as f_beta
    __pydantic_extra__: dict[str, Measured]

    bbox: dict[str, Measured] = Field(description="COCO bbox AP: AP, AP50, AP75, APs, APm, APl, AP-<class>")
    per_class_ap: dict[str, Measured] = Field(description="class name -> bbox AP")
    segm: dict[str, Measured] = Field(description="COCO mask AP; empty for a box-only model")
    precision: Measured
    recall: Measured
    f_beta: Measured
    beta: float
    score_threshold: float
    iou_threshold: float
    confusion_matrix: list[list[int]] = Field(description="rows: ground truth, columns: predicted; last: background")
    confusion_labels: list[str]
    images: int


def json_schemas() -> dict[str, dict[str, Any]]:
    """File name -> its JSON Schema."""
    return {
        "summary.schema.json": Summary.model_json_schema(),
        "metrics.schema.json": Metrics.model_json_schema(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m d2ops.outputs", description="write the output JSON Schemas")
    parser.add_argument("out", type=Path, help="folder to write them to (docs/schemas)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, schema in json_schemas().items():
        (args.out / name).write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
