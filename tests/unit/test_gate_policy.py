"""The register step's gate policy (d2ops.registry.gate), on hand-made metrics dicts and configs.

What the register step decides, from the candidate's metrics, the champion's and the registry config:
the quality floor, the verdict against the champion (with ``registry.champion.min_improvement``), a champion
that cannot be compared, whether the candidate is promoted and which tags it is registered with. No model is
trained or loaded; the slow end-to-end versions are in tests/e2e/test_gate.py, and so are the tests of
:func:`~d2ops.registry.gate.decide` given two scores.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from d2ops.config import ChampionGate, ExperimentConfig, QualityGate, RegistryConfig, parse_config
from d2ops.registry.gate import (
    ScoredChampion,
    gate_decision,
    gate_metric,
    gate_metric_value,
    gate_record,
    labels_mismatch,
    promotes,
    registration_tags,
)


def _metrics(ap: float | None, ap50: float = 90.0, **extra: Any) -> dict[str, Any]:
    """A metrics dict shaped like metrics.json: nested per task, plus top-level scalars and lists."""
    return {"bbox": {"AP": ap, "AP50": ap50}, "f2": 0.5, "per_class": [], **extra}


def _registry(min_value: float = 50.0, min_improvement: float = 0.0, **champion: Any) -> RegistryConfig:
    return RegistryConfig(
        tags=["smoke"],
        quality_gate=QualityGate(metric="bbox.AP50", min_value=min_value),
        champion=ChampionGate(metric="bbox.AP", min_improvement=min_improvement, **champion),
    )


def _champion(ap: float | None, **kw: Any) -> ScoredChampion:
    return ScoredChampion("champ-1", _metrics(ap, **kw))


# --------------------------------------------------------------------------- the quality floor


def test_the_floor_is_read_from_its_own_metric_and_passes_at_the_minimum() -> None:
    decision = gate_decision(_registry(min_value=50.0), _metrics(40.0, ap50=50.0))
    assert decision.floor.to_dict() == {"metric": "bbox.AP50", "value": 50.0, "min_value": 50.0, "passed": True}
    assert decision.promote is True and decision.metric == "bbox.AP" and decision.candidate_score == 40.0


def test_a_candidate_below_the_floor_is_not_promoted_even_when_it_beats_the_champion() -> None:
    reg = _registry(min_value=50.0)
    decision = gate_decision(reg, _metrics(80.0, ap50=49.9), _champion(10.0))
    assert decision.floor.passed is False and decision.floor.value == pytest.approx(49.9)
    assert decision.promote is False and not promotes(decision, reg.champion)
    assert decision.reason == "below the quality floor: bbox.AP50 49.900 < 50.000"
    assert registration_tags(reg, promotes(decision, reg.champion), tag_on_register=True) == ["smoke"]


def test_a_floor_of_null_metric_fails() -> None:
    decision = gate_decision(
        RegistryConfig(quality_gate=QualityGate(metric="bbox.AP", min_value=0.0)), _metrics(None), None
    )
    assert math.isnan(decision.floor.value) and decision.floor.passed is False and decision.promote is False


# --------------------------------------------------------------------------- challenger vs champion


@pytest.mark.parametrize(
    ("candidate", "champion", "min_improvement", "promote"),
    [
        (61.0, 60.0, 0.5, True),  # beats it by more than the margin
        (60.5, 60.0, 0.5, True),  # by exactly the margin
        (60.3, 60.0, 0.5, False),  # better, but by less than the margin
        (60.0, 60.0, 0.5, False),  # a tie, with a margin
        (60.0, 60.0, 0.0, False),  # a tie, without one: ties never win
        (55.0, 60.0, 0.0, False),  # worse
    ],
)
def test_challenger_against_the_champion_with_the_configured_margin(
    candidate: float, champion: float, min_improvement: float, promote: bool
) -> None:
    reg = _registry(min_improvement=min_improvement)
    decision = gate_decision(reg, _metrics(candidate), _champion(champion))
    assert decision.promote is promote and promotes(decision, reg.champion) is promote
    assert (decision.candidate_score, decision.champion_score) == (candidate, champion)
    assert decision.champion_id == "champ-1" and decision.min_improvement == min_improvement
    assert decision.margin == pytest.approx(candidate - champion)
    assert decision.reason.startswith("beats the champion" if promote else "does not beat the champion")
    assert f"bbox.AP {candidate:.3f} vs champion champ-1 {champion:.3f}" in decision.reason
    tags = registration_tags(reg, promotes(decision, reg.champion), tag_on_register=True)
    assert tags == (["smoke", "production"] if promote else ["smoke"])


def test_the_champion_is_compared_on_the_champion_metric_not_the_floor_metric() -> None:
    """AP50 (the floor's metric) says the champion is better; AP (the comparison's) says the candidate is."""
    reg = _registry(min_value=0.0)
    decision = gate_decision(reg, _metrics(45.0, ap50=70.0), _champion(40.0, ap50=95.0))
    assert decision.promote is True and decision.metric == "bbox.AP" and decision.margin == pytest.approx(5.0)
    other = RegistryConfig(champion=ChampionGate(metric="f2"))
    by_f2 = gate_decision(other, _metrics(45.0, f2=0.7), ScoredChampion("champ-1", _metrics(40.0, f2=0.8)))
    assert by_f2.promote is False and by_f2.metric == "f2" and by_f2.margin == pytest.approx(-0.1)


def test_a_record_says_where_the_candidate_was_scored() -> None:
    reg = _registry()
    rescored = gate_record(gate_decision(reg, _metrics(61.0), _champion(60.0)), rescored=True)
    assert rescored["scored_in"] == "register step" and rescored["margin"] == pytest.approx(1.0)
    assert rescored["floor"]["metric"] == "bbox.AP50" and rescored["champion_id"] == "champ-1"
    first = gate_record(gate_decision(reg, _metrics(61.0)), rescored=False)
    assert first["scored_in"] == "evaluate step" and first["champion_id"] is None and first["margin"] is None


# --------------------------------------------------------------------------- no champion, incomparable champion


def test_no_champion_yet_the_floor_decides_and_the_candidate_is_promoted() -> None:
    reg = _registry(min_improvement=5.0)
    decision = gate_decision(reg, _metrics(1.0))
    assert decision.promote is True and "no champion yet" in decision.reason
    assert (decision.champion_id, decision.champion_score, decision.margin) == (None, None, None)
    assert promotes(decision, reg.champion) is True
    assert registration_tags(reg, True, tag_on_register=True) == ["smoke", "production"]
    assert registration_tags(reg, True, tag_on_register=False) == ["smoke"], "a registry store tags it on promote"


def test_a_champion_with_other_labels_is_not_compared_and_the_floor_decides() -> None:
    reg = _registry(min_improvement=0.5)
    why = labels_mismatch(["cat", "dog"], ["circle", "square", "triangle"])
    decision = gate_decision(reg, _metrics(1.0), ScoredChampion("champ-1", not_comparable=why))
    assert decision.promote is True and promotes(decision, reg.champion)
    assert decision.reason == f"champion champ-1 is not comparable ({why}); the quality floor decides"
    assert "['cat', 'dog']" in decision.reason and "['circle', 'square', 'triangle']" in decision.reason
    assert (decision.champion_id, decision.champion_score, decision.margin) == ("champ-1", None, None)
    below = gate_decision(reg, _metrics(1.0, ap50=10.0), ScoredChampion("champ-1", not_comparable=why))
    assert below.promote is False and "below the quality floor" in below.reason


def test_a_champion_whose_metric_is_null_is_not_compared() -> None:
    decision = gate_decision(_registry(), _metrics(30.0), _champion(None))
    assert decision.promote is True and "not comparable (champion bbox.AP is nan)" in decision.reason
    assert decision.champion_score is not None and math.isnan(decision.champion_score) and decision.margin is None


# --------------------------------------------------------------------------- champion/challenger off


def test_with_champion_challenger_off_the_floor_metric_decides_and_nothing_is_promoted() -> None:
    reg = _registry(min_value=50.0, enabled=False)
    assert gate_metric(reg) == "bbox.AP50" and gate_metric(_registry()) == "bbox.AP"
    decision = gate_decision(reg, _metrics(None, ap50=60.0))
    assert decision.promote is True, "published: it passes the floor"
    assert decision.metric == "bbox.AP50" and decision.candidate_score == 60.0
    assert promotes(decision, reg.champion) is False, "but never the champion"
    assert registration_tags(reg, promotes(decision, reg.champion), tag_on_register=True) == ["smoke"]
    assert gate_decision(reg, _metrics(None, ap50=40.0)).promote is False
    with pytest.raises(KeyError, match=r"^\"registry\.quality_gate\.metric 'bbox\.AP50' is not in"):
        gate_metric_value(reg, {"bbox": {"AP": 1.0}})


# --------------------------------------------------------------------------- a metric missing from a dict


@pytest.mark.parametrize(
    ("candidate", "champion", "expected"),
    [
        ({"bbox": {"AP50": 90.0}}, None, r"registry\.champion\.metric 'bbox\.AP' is not in the evaluation metrics"),
        (_metrics(60.0), {"segm": {"AP": 1.0}}, r"registry\.champion\.metric 'bbox\.AP' .*\['segm'\]"),
        ({"bbox": {"AP": 60.0}}, None, r"registry\.quality_gate\.metric 'bbox\.AP50' .*top-level keys: \['bbox'\]"),
    ],
)
def test_a_missing_metric_is_a_key_error_naming_it_and_its_setting(
    candidate: dict[str, Any], champion: dict[str, Any] | None, expected: str
) -> None:
    scored = ScoredChampion("champ-1", champion) if champion is not None else None
    with pytest.raises(KeyError, match=expected):
        gate_decision(_registry(), candidate, scored)


def test_the_policy_reads_a_whole_experiment_config() -> None:
    cfg = parse_config(
        {
            "data": {"source": "outputs/datasets/shapes"},
            "model": {"zoo_config": "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"},
            "registry": {
                "tags": ["shapes"],
                "quality_gate": {"metric": "bbox.AP50", "min_value": 20},
                "champion": {"metric": "bbox.AP", "min_improvement": 2, "tag": "prod", "retired_tag": "old"},
            },
        }
    )
    assert isinstance(cfg, ExperimentConfig)
    decision = gate_decision(cfg.registry, _metrics(42.0, ap50=30.0), _champion(40.0))
    assert decision.promote is True and decision.min_improvement == 2.0
    assert registration_tags(cfg.registry, promotes(decision, cfg.registry.champion), True) == ["shapes", "prod"]
    assert gate_decision(cfg.registry, _metrics(41.9, ap50=30.0), _champion(40.0)).promote is False
