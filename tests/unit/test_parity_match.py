"""The export's parity matching (d2ops.model.export._match) on hand-made detections: what it forgives
(rounding at the score threshold and at the top-k cut) and what it does not."""

from __future__ import annotations

from d2ops.model.detector import Detection
from d2ops.model.export import Tolerance, _match

TOL = Tolerance()


def _det(score: float, x: float = 0.0, label: str = "square") -> Detection:
    return Detection(label=label, category_index=0, score=score, box=[x, 0.0, x + 10.0, 10.0])


def _ranked(scores: list[float]) -> list[Detection]:
    return [_det(s, x=20.0 * i) for i, s in enumerate(scores)]


def test_identical_detections_match() -> None:
    ref = _ranked([0.9, 0.8, 0.7])
    assert _match("a", ref, list(ref), 0.05, TOL, top_k=100).problems == []


def test_a_moved_box_or_changed_score_is_a_problem() -> None:
    ref = _ranked([0.9, 0.8])
    moved = [_det(0.9, x=1.0), _det(0.8, x=20.0)]
    rescored = [_det(0.9), _det(0.79, x=20.0)]
    assert _match("a", ref, moved, 0.05, TOL, top_k=100).problems
    assert _match("a", ref, rescored, 0.05, TOL, top_k=100).problems


def test_the_top_k_cut_may_swap_candidates_within_the_score_tolerance() -> None:
    # Both sides kept their full top 3; the third place went to different candidates 0.001 apart.
    ref = _ranked([0.9, 0.8, 0.500])
    got = [_det(0.9), _det(0.8, x=20.0), _det(0.499, x=60.0)]
    assert _match("a", ref, got, 0.0, TOL, top_k=3).problems == []
    # Without the cut (room for more detections) the same difference is a lost and an extra detection.
    assert len(_match("a", ref, got, 0.0, TOL, top_k=100).problems) == 2


def test_the_top_k_cut_does_not_forgive_a_confident_detection() -> None:
    ref = _ranked([0.9, 0.8, 0.5])
    got = [_det(0.9), _det(0.5, x=40.0), _det(0.45, x=60.0)]  # the 0.8 detection is gone
    problems = _match("a", ref, got, 0.0, TOL, top_k=3).problems
    assert any("0.800" in p and "no match" in p for p in problems)
