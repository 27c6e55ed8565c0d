"""Precision/recall/F-beta matching and the confusion matrix, on hand-made boxes."""

from __future__ import annotations

import pytest

from d2ops.evaluation.metrics import detection_counts, f_beta
from d2ops.registry.gate import check_gate


def _gt(image_id: int, cat: int, box: list[float]) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": box}


def _pred(image_id: int, cat: int, box: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}


def test_f_beta_weighs_recall() -> None:
    assert f_beta(1.0, 1.0, 2.0) == pytest.approx(1.0)
    assert f_beta(0.0, 0.0, 2.0) == 0.0
    # F2 with P=0.5, R=1.0: 5*0.5/(4*0.5+1) = 0.8333
    assert f_beta(0.5, 1.0, 2.0) == pytest.approx(2.5 / 3.0)
    assert f_beta(1.0, 0.5, 2.0) < f_beta(0.5, 1.0, 2.0)


def test_counts_and_confusion_matrix() -> None:
    gt = {
        1: [_gt(1, 1, [0, 0, 10, 10]), _gt(1, 2, [20, 20, 10, 10])],
        2: [_gt(2, 1, [0, 0, 10, 10])],
    }
    preds = {
        1: [
            _pred(1, 1, [0, 0, 10, 10], 0.9),  # TP class 1
            _pred(1, 1, [20, 20, 10, 10], 0.8),  # right box, wrong class -> off-diagonal
            _pred(1, 2, [50, 50, 5, 5], 0.7),  # spurious
        ],
        2: [_pred(2, 1, [1, 1, 10, 10], 0.6), _pred(2, 1, [0, 0, 10, 10], 0.95)],  # one TP, one duplicate
    }
    tp, fp, fn, matrix = detection_counts(gt, preds, [1, 2], 0.5)
    assert (tp, fp, fn) == (2, 3, 1)
    # rows: gt square, gt circle, background; cols: pred square, pred circle, background
    assert matrix.tolist() == [[2, 0, 0], [1, 0, 0], [1, 1, 0]]


def test_quality_gate_lookup() -> None:
    metrics = {"bbox": {"AP50": 91.0}, "f2": 0.8}
    assert check_gate(metrics, "bbox.AP50", 90).passed
    assert not check_gate(metrics, "f2", 0.9).passed
    with pytest.raises(KeyError, match=r"bbox\.AP99"):
        check_gate(metrics, "bbox.AP99", 1)
