"""Evaluation: COCO AP (overall and per class), plus precision, recall and F-beta at a threshold.

AP comes from detectron2's COCOEvaluator (pycocotools underneath). Precision, recall and F-beta
follow the usual detection definition: a prediction above the score threshold is a true positive
when it matches an unmatched ground-truth box of the same class with IoU >= ``iou_threshold``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from d2ops.config import EvalConfig
from d2ops.model.detector import Detector
from d2ops.reporting import Reporter
from d2ops.utils.jsonio import write_json

__all__ = ["EvalResult", "detection_counts", "evaluate", "evaluate_model", "f_beta"]

log = logging.getLogger(__name__)


def f_beta(precision: float, recall: float, beta: float) -> float:
    """F-beta score; beta=2 weighs recall four times as much as precision."""
    if precision <= 0 and recall <= 0:
        return 0.0
    b2 = beta * beta
    return (1 + b2) * precision * recall / (b2 * precision + recall)


@dataclass
class EvalResult:
    """Every number the evaluate step produces; ``to_dict`` is the metrics JSON artifact."""

    bbox: dict[str, float]
    per_class_ap: dict[str, float]
    precision: float
    recall: float
    f_beta: float
    beta: float
    score_threshold: float
    iou_threshold: float
    confusion_matrix: list[list[int]]
    confusion_labels: list[str]
    segm: dict[str, float] = field(default_factory=dict)
    images: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out[f"f{self.beta:g}"] = self.f_beta
        return out

    def metric(self, dotted: str) -> float:
        """Look up a metric by a dotted name such as ``bbox.AP50``, ``f2`` or ``recall``."""
        node: Any = self.to_dict()
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(
                    f"unknown metric {dotted!r}; known: bbox.AP, bbox.AP50, bbox.AP75, f2, precision, recall"
                )
            node = node[part]
        return float(node)


def _clean(value: float) -> float:
    return float(value) if math.isfinite(value) else float("nan")


def _match_image(gt: list[dict], preds: list[dict], iou_threshold: float, class_aware: bool) -> list[tuple[int, int]]:
    """Greedy matching by descending score; returns (gt index, pred index) pairs."""
    if not gt or not preds:
        return []
    ious = mask_utils.iou([p["bbox"] for p in preds], [g["bbox"] for g in gt], [0] * len(gt))
    pairs, used = [], set()
    for p_idx in sorted(range(len(preds)), key=lambda i: -preds[i]["score"]):
        best, best_iou = -1, iou_threshold
        for g_idx in range(len(gt)):
            if g_idx in used or (class_aware and gt[g_idx]["category_id"] != preds[p_idx]["category_id"]):
                continue
            if ious[p_idx][g_idx] >= best_iou:
                best, best_iou = g_idx, ious[p_idx][g_idx]
        if best >= 0:
            used.add(best)
            pairs.append((best, p_idx))
    return pairs


def detection_counts(
    gt_by_image: dict[int, list[dict]],
    preds_by_image: dict[int, list[dict]],
    category_ids: list[int],
    iou_threshold: float,
) -> tuple[int, int, int, np.ndarray]:
    """True positives, false positives, false negatives and a (K+1)x(K+1) confusion matrix.

    The confusion matrix is class-agnostic in its matching (so a right box with the wrong class
    shows up off the diagonal); the last row/column is "background" (missed / spurious).
    """
    index = {cid: i for i, cid in enumerate(category_ids)}
    k = len(category_ids)
    matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
    tp = fp = fn = 0
    for image_id in set(gt_by_image) | set(preds_by_image):
        gt, preds = gt_by_image.get(image_id, []), preds_by_image.get(image_id, [])
        matched = len(_match_image(gt, preds, iou_threshold, class_aware=True))
        tp, fp, fn = tp + matched, fp + len(preds) - matched, fn + len(gt) - matched
        pairs = _match_image(gt, preds, iou_threshold, class_aware=False)
        for g_idx, p_idx in pairs:
            matrix[index[gt[g_idx]["category_id"]], index[preds[p_idx]["category_id"]]] += 1
        for g_idx in set(range(len(gt))) - {g for g, _ in pairs}:
            matrix[index[gt[g_idx]["category_id"]], k] += 1
        for p_idx in set(range(len(preds))) - {p for _, p in pairs}:
            matrix[k, index[preds[p_idx]["category_id"]]] += 1
    return tp, fp, fn, matrix


def _group(items: list[dict]) -> dict[int, list[dict]]:
    grouped: dict[int, list[dict]] = {}
    for item in items:
        grouped.setdefault(item["image_id"], []).append(item)
    return grouped


def _report_pr_curves(coco_gt: COCO, results: list[dict], labels: list[str], reporter: Reporter) -> None:
    """Per-class precision/recall curves at IoU 0.5 from pycocotools' accumulated tables."""
    if not results:
        return
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
    coco_eval.params.iouThrs = np.array([0.5])
    coco_eval.evaluate()
    coco_eval.accumulate()
    precision = coco_eval.eval["precision"]  # [T=1, R=101, K, A, M]
    recall_axis = coco_eval.params.recThrs.tolist()
    for k, cat_id in enumerate(coco_eval.params.catIds):
        curve = precision[0, :, k, 0, -1]
        name = coco_gt.cats[cat_id]["name"]
        ys = [max(float(v), 0.0) for v in curve]
        reporter.curve("PR curve @IoU0.5", name, recall_axis, ys, xlabel="recall", ylabel="precision")


def evaluate(
    detector: Detector,
    dataset_name: str,
    eval_cfg: EvalConfig,
    output_dir: Path,
    reporter: Reporter | None = None,
) -> EvalResult:
    """Evaluate ``detector`` on a registered dataset split and report plots and headline numbers."""
    reporter = reporter or Reporter()
    output_dir.mkdir(parents=True, exist_ok=True)
    tasks = ("bbox", "segm") if detector.cfg.MODEL.MASK_ON else ("bbox",)
    evaluator = COCOEvaluator(dataset_name, tasks=tasks, output_dir=str(output_dir))
    loader = build_detection_test_loader(detector.cfg, dataset_name)
    coco_results = inference_on_dataset(detector, loader, evaluator)
    results = json.loads((output_dir / "coco_instances_results.json").read_text())
    coco_gt = COCO(MetadataCatalog.get(dataset_name).json_file)
    category_ids = sorted(coco_gt.cats)
    labels = [coco_gt.cats[c]["name"] for c in category_ids]

    above = [r for r in results if r["score"] >= eval_cfg.score_threshold]
    tp, fp, fn, matrix = detection_counts(
        _group(coco_gt.loadAnns(coco_gt.getAnnIds(iscrowd=False))), _group(above), category_ids, eval_cfg.iou_threshold
    )
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    bbox = {k: _clean(v) for k, v in coco_results["bbox"].items() if not k.startswith("AP-")}
    per_class = {k[3:]: _clean(v) for k, v in coco_results["bbox"].items() if k.startswith("AP-")}
    if not per_class and len(labels) == 1:
        # COCOEvaluator._derive_coco_results returns no AP-<class> for a single class: its AP is the AP
        per_class = {labels[0]: bbox.get("AP", float("nan"))}
    result = EvalResult(
        bbox=bbox,
        per_class_ap=per_class,
        precision=precision,
        recall=recall,
        f_beta=f_beta(precision, recall, eval_cfg.f_beta),
        beta=eval_cfg.f_beta,
        score_threshold=eval_cfg.score_threshold,
        iou_threshold=eval_cfg.iou_threshold,
        confusion_matrix=matrix.tolist(),
        confusion_labels=[*labels, "background"],
        segm={k: _clean(v) for k, v in coco_results.get("segm", {}).items() if not k.startswith("AP-")},
        images=len(coco_gt.imgs),
    )
    _report(result, coco_gt, results, labels, reporter)
    write_json(output_dir / "metrics.json", result.to_dict())
    reporter.artifact("metrics", output_dir / "metrics.json")
    return result


def _report(result: EvalResult, coco_gt: COCO, results: list[dict], labels: list[str], reporter: Reporter) -> None:
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        value = result.bbox.get(key, float("nan"))
        if math.isfinite(value):
            reporter.single_value(f"bbox/{key}", value)
    for name, value in result.per_class_ap.items():
        if math.isfinite(value):
            reporter.single_value(f"bbox/AP-{name}", value)
    reporter.single_value("precision", result.precision)
    reporter.single_value("recall", result.recall)
    reporter.single_value(f"f{result.beta:g}", result.f_beta)
    reporter.confusion_matrix("confusion matrix", np.array(result.confusion_matrix), result.confusion_labels)
    _report_pr_curves(coco_gt, results, labels, reporter)


def evaluate_model(
    d2_config: Path,
    weights: Path,
    labels: list[str],
    dataset_name: str,
    eval_cfg: EvalConfig,
    out_dir: Path,
    device: str = "auto",
) -> dict[str, Any]:
    """The metrics dict of one model on a registered dataset split, by the evaluate step's own code
    (:class:`~d2ops.model.detector.Detector` and :func:`evaluate`), reporting nothing.

    The register step scores the champion and the candidate with it, so both numbers come from
    the same code on the same images on the same device.
    """
    detector = Detector.from_files(d2_config, weights, labels, device)
    return evaluate(detector, dataset_name, eval_cfg, out_dir).to_dict()
