"""Model bundles, the gate that decides which one ships, and where the shipped one is kept.

A bundle holds ``model_final.pth``, the detectron2 ``config.yaml``, ``labels.json``,
``metrics.json`` and ``metadata.json`` (lineage: dataset identity, pipeline run, code version,
config hash; and the gate decision).

The champion/challenger gate (:func:`decide`) is a pure function of two scores, and
:func:`gate_decision` takes them from the metrics dicts and the registry config: the whole policy
is testable without a model. Where the current champion lives is behind the small
:class:`ChampionStore` protocol, so the register step reads the same in every mode:
:class:`LocalChampionStore` (a folder; offline and tests) here, ``ClearMLChampionStore`` (the
ClearML model registry) in :mod:`d2ops.clearml.models`.
This module is pure files.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from d2ops.config import ChampionGate, RegistryConfig
    from d2ops.reporting import Reporter

__all__ = [
    "GateDecision",
    "GateResult",
    "ScoredChampion",
    "check_gate",
    "decide",
    "gate_decision",
    "gate_headline",
    "gate_metric",
    "gate_metric_value",
    "gate_record",
    "labels_mismatch",
    "metric_value",
    "promotes",
    "registration_tags",
    "report_gate",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateResult:
    """Whether a model may be published: ``metric`` must reach ``min_value``."""

    metric: str
    value: float
    min_value: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def metric_value(metrics: dict[str, Any], metric: str, setting: str = "registry.quality_gate.metric") -> float:
    """A number from a metrics dict by dotted name (``bbox.AP50``, ``f2``); ``setting`` names the config key."""
    node: Any = metrics
    for part in metric.split("."):
        if not isinstance(node, dict) or part not in node:
            known = sorted(k for k, v in metrics.items() if not isinstance(v, list))
            raise KeyError(f"{setting} {metric!r} is not in the evaluation metrics (top-level keys: {known})")
        node = node[part]
    return math.nan if node is None else float(node)  # null in metrics.json: not measured


def check_gate(metrics: dict[str, Any], metric: str, min_value: float) -> GateResult:
    """Evaluate the quality gate on a metrics dict (dotted lookup, e.g. ``bbox.AP50``)."""
    value = metric_value(metrics, metric)
    return GateResult(metric, value, min_value, value >= min_value)


@dataclass(frozen=True)
class GateDecision:
    """Whether the candidate becomes the champion, and why: both scores, the margin, the floor."""

    promote: bool
    reason: str
    metric: str
    candidate_score: float
    champion_id: str | None
    champion_score: float | None
    min_improvement: float
    floor: GateResult

    @property
    def margin(self) -> float | None:
        """Candidate minus champion (``None`` without a comparable champion)."""
        if self.champion_score is None or not math.isfinite(self.champion_score):
            return None
        return self.candidate_score - self.champion_score

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "margin": self.margin}


def decide(
    floor: GateResult,
    *,
    metric: str,
    candidate_score: float,
    champion_id: str | None,
    champion_score: float | None,
    min_improvement: float,
    not_comparable: str | None = None,
    compare: bool = True,
) -> GateDecision:
    """Champion/challenger: promote a candidate that passes the floor and beats the champion.

    "Beats" means strictly better and by at least ``min_improvement``, so a tie never replaces
    the champion (no churn between equal models). With no champion the floor alone decides;
    likewise when the champion could not be scored comparably (``not_comparable`` says why,
    e.g. its labels differ from the dataset's), which the reason records, and when the
    comparison is switched off (``compare=False``: ``registry.champion.enabled: false``).
    """

    def result(promote: bool, reason: str) -> GateDecision:
        return GateDecision(
            promote, reason, metric, candidate_score, champion_id, champion_score, min_improvement, floor
        )

    if not floor.passed:
        return result(False, f"below the quality floor: {floor.metric} {floor.value:.3f} < {floor.min_value:.3f}")
    if not compare:
        return result(True, "champion/challenger is off (registry.champion.enabled: false); the floor passes")
    if champion_id is None:
        return result(True, "no champion yet; the candidate passes the quality floor")
    if not_comparable or champion_score is None or not math.isfinite(champion_score):
        why = not_comparable or f"champion {metric} is {champion_score}"
        return result(True, f"champion {champion_id} is not comparable ({why}); the quality floor decides")
    if not math.isfinite(candidate_score):
        return result(False, f"candidate {metric} is {candidate_score}, not a number")
    margin = candidate_score - champion_score
    scores = f"{metric} {candidate_score:.3f} vs champion {champion_id} {champion_score:.3f} ({margin:+.3f})"
    if margin > 0 and margin + 1e-9 >= min_improvement:
        return result(True, f"beats the champion: {scores}, needed +{min_improvement:g}")
    return result(False, f"does not beat the champion by {min_improvement:g}: {scores}")


def gate_headline(decision: GateDecision, tag: str) -> str:
    """One line for logs and the registered model's comment: floor, verdict, reason."""
    floor = "passed" if decision.floor.passed else "failed"
    verdict = f"promoted to {tag}" if decision.promote else f"not promoted to {tag}"
    return f"d2ops detectron2 bundle; quality gate {floor}; {verdict}: {decision.reason}"


def report_gate(reporter: Reporter, decision: GateDecision, record: dict[str, Any]) -> None:
    """Both scores, the margin and the verdict as single values (the ClearML summary table), plus the record."""
    reporter.single_value("quality_gate_passed", float(decision.floor.passed))
    reporter.single_value("gate/promoted", float(decision.promote))
    reporter.single_value(f"gate/candidate {decision.metric}", decision.candidate_score)
    if decision.champion_score is not None and decision.margin is not None:
        reporter.single_value(f"gate/champion {decision.metric}", decision.champion_score)
        reporter.single_value(f"gate/margin {decision.metric}", decision.margin)
    reporter.artifact("gate_decision", record)


def labels_mismatch(champion_labels: list[str], dataset_labels: list[str]) -> str | None:
    """Why a champion cannot be scored on this dataset (its classes differ), or ``None`` when it can."""
    if list(champion_labels) == list(dataset_labels):
        return None
    return f"its labels {list(champion_labels)} differ from the dataset's {list(dataset_labels)}"


@dataclass(frozen=True)
class ScoredChampion:
    """The current champion as the register step scored it: its metrics on the candidate's split, or
    why it could not be scored comparably (``not_comparable``, e.g. from :func:`labels_mismatch`)."""

    id: str
    metrics: dict[str, Any] | None = None
    not_comparable: str | None = None


def gate_metric(registry: RegistryConfig) -> str:
    """The metric the verdict is taken on: ``registry.champion.metric`` when champion/challenger is on,
    else the quality floor's ``registry.quality_gate.metric``."""
    return registry.champion.metric if registry.champion.enabled else registry.quality_gate.metric


def gate_metric_value(registry: RegistryConfig, metrics: dict[str, Any]) -> float:
    """The :func:`gate_metric` of a metrics dict; a missing one raises :class:`KeyError` naming its config key."""
    setting = "registry.champion.metric" if registry.champion.enabled else "registry.quality_gate.metric"
    return metric_value(metrics, gate_metric(registry), setting)


def gate_decision(
    registry: RegistryConfig, candidate: dict[str, Any], champion: ScoredChampion | None = None
) -> GateDecision:
    """The register step's verdict from the candidate's metrics, the champion's (scored on the same split)
    and the registry config: the quality floor, then champion/challenger (:func:`decide`).

    ``champion`` is None when there is none (or champion/challenger is off). A metric missing from a
    metrics dict raises :class:`KeyError` naming it and its config key.
    """
    gate = registry.champion
    metric = gate_metric(registry)
    champion_score = None
    if champion is not None and champion.metrics is not None and not champion.not_comparable:
        champion_score = metric_value(champion.metrics, gate.metric, "registry.champion.metric")
    floor = check_gate(candidate, registry.quality_gate.metric, registry.quality_gate.min_value)
    return decide(
        floor,
        metric=metric,
        candidate_score=gate_metric_value(registry, candidate),
        champion_id=champion.id if champion else None,
        champion_score=champion_score,
        min_improvement=gate.min_improvement,
        not_comparable=champion.not_comparable if champion else None,
        compare=gate.enabled,
    )


def gate_record(decision: GateDecision, rescored: bool) -> dict[str, Any]:
    """The decision as recorded with the bundle and reported; ``rescored``: the candidate was scored again
    in the register step (beside a champion), not taken from the evaluate step."""
    return {**decision.to_dict(), "scored_in": "register step" if rescored else "evaluate step"}


def promotes(decision: GateDecision, gate: ChampionGate) -> bool:
    """Whether the candidate becomes the champion (``gate.tag``, the old one retired). With champion/challenger
    off (``registry.champion.enabled: false``) a model that passes the floor is published, never promoted."""
    return decision.promote and gate.enabled


def registration_tags(registry: RegistryConfig, promoting: bool, tag_on_register: bool) -> list[str]:
    """The registered model's tags: ``registry.tags``, plus the champion tag when it is promoted and the
    store tags at registration (:attr:`d2ops.registry.champion.ChampionStore.tag_on_register`)."""
    return [*registry.tags, *([registry.champion.tag] if promoting and tag_on_register else [])]
