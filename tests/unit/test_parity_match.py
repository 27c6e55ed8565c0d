"""The export's parity matching (d2ops.model.export._match) on hand-made detections: what it forgives
(rounding at the score threshold and at the top-k cut) and what it does not."""

from __future__ import annotations

import pytest

from d2ops.model.detector import Detection
from d2ops.model.export import ImageParity, Tolerance, _match, measured_speed
from d2ops.model.runtimes import _speedup

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


def test_only_the_full_side_gets_the_cut() -> None:
    # The graph kept its full top 3, PyTorch only 2 (its third fell under the threshold): PyTorch's 0.501 may be
    # missing from the graph (it is at the graph's cut), but the graph's own 0.6 is an extra detection.
    ref = _ranked([0.9, 0.8, 0.501])
    got = [_det(0.9), _det(0.8, x=20.0), _det(0.5, x=80.0)]
    assert _match("a", ref, got, 0.0, TOL, top_k=3).problems == []
    got_extra = [_det(0.9), _det(0.8, x=20.0), _det(0.6, x=80.0)]
    problems = _match("a", ref[:2], got_extra, 0.0, TOL, top_k=3).problems
    assert problems == ["an extra square 0.600 at [80.0, 0.0, 90.0, 10.0]"]


def test_a_confident_extra_detection_is_a_problem_even_when_both_sides_are_full() -> None:
    ref = _ranked([0.9, 0.8, 0.5])
    got = [_det(0.9), _det(0.85, x=100.0), _det(0.8, x=20.0)]  # a new 0.85 pushed PyTorch's 0.5 out
    problems = _match("a", ref, got, 0.0, TOL, top_k=3).problems
    assert any("extra square 0.850" in p for p in problems), problems


@pytest.mark.parametrize("top_k", [0, -1])
def test_no_top_k_means_no_cut(top_k: int) -> None:
    ref = _ranked([0.9, 0.8, 0.500])
    got = [_det(0.9), _det(0.8, x=20.0), _det(0.499, x=60.0)]
    assert len(_match("a", ref, got, 0.0, TOL, top_k=top_k).problems) == 2


def _timed(pytorch_s: float, s: float) -> ImageParity:
    return ImageParity("a", 1, 1, pytorch_seconds=pytorch_s, seconds=s)


def test_measured_speed_leaves_the_warm_up_out() -> None:
    speed = measured_speed([_timed(9.0, 30.0), _timed(2.0, 1.0), _timed(2.2, 1.0), _timed(1.8, 1.0)])
    assert speed == {"images": 3, "seconds_per_image": 1.0, "pytorch_seconds_per_image": 2.0, "speedup": 2.0}
    assert measured_speed([_timed(2.0, 1.0)]) is None, "one image is only a warm-up"
    assert measured_speed([_timed(1.0, 1.0), _timed(1.0, 0.0)])["speedup"] is None  # type: ignore[index]


@pytest.mark.parametrize(
    ("speed", "expected"),
    [
        ({"speedup": 1.5}, 1.5),
        ({"speedup": 0}, None),
        ({"speedup": -1.0}, None),
        ({"speedup": "fast"}, None),
        ({"speedup": None}, None),
        (None, None),
        ("1.5", None),
    ],
)
def test_a_recorded_speedup_is_used_only_when_it_is_a_positive_number(speed: object, expected: float | None) -> None:
    assert _speedup({"file": "model.onnx", "speed": speed}) == expected
