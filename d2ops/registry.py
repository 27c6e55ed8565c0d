"""Model bundles, the gate that decides which one ships, and where the shipped one is kept.

A bundle holds ``model_final.pth``, the detectron2 ``config.yaml``, ``labels.json``,
``metrics.json`` and ``metadata.json`` (lineage: dataset identity, pipeline run, code version,
config hash; and the gate decision).

The champion/challenger gate (:func:`decide`) is a pure function of two scores. Where the
current champion lives is behind the small :class:`ChampionStore` protocol, so the register
step reads the same in every mode: :class:`LocalChampionStore` (a folder; offline and tests)
here, ``ClearMLChampionStore`` (the ClearML model registry) in :mod:`d2ops.clearml.models`.
This module is pure files.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import d2ops
from d2ops.model.bundle import ModelBundle
from d2ops.utils.jsonio import write_json

if TYPE_CHECKING:
    from d2ops.config import EvalConfig
    from d2ops.reporting import Reporter

__all__ = [
    "Champion",
    "ChampionConflictError",
    "ChampionStore",
    "GateDecision",
    "GateResult",
    "LocalChampionStore",
    "Promotion",
    "build_bundle",
    "check_gate",
    "code_version",
    "decide",
    "evaluate_model",
    "gate_headline",
    "labels_mismatch",
    "metric_value",
    "report_gate",
    "retired_tags",
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
    (:class:`~d2ops.model.detector.Detector` and :func:`~d2ops.evaluation.evaluate`), reporting nothing.

    The register step scores the champion and the candidate with it, so both numbers come from
    the same code on the same images on the same device.
    """
    from d2ops.evaluation import evaluate
    from d2ops.model.detector import Detector

    detector = Detector.from_files(d2_config, weights, labels, device)
    return evaluate(detector, dataset_name, eval_cfg, out_dir).to_dict()


def labels_mismatch(champion_labels: list[str], dataset_labels: list[str]) -> str | None:
    """Why a champion cannot be scored on this dataset (its classes differ), or ``None`` when it can."""
    if list(champion_labels) == list(dataset_labels):
        return None
    return f"its labels {list(champion_labels)} differ from the dataset's {list(dataset_labels)}"


def retired_tags(retired_tag: str, when: datetime) -> list[str]:
    """The tags a replaced champion gets: ``retired_tag`` and a dated one (``production-retired-2025-01-31``)."""
    return [retired_tag, f"{retired_tag}-{when:%Y-%m-%d}"]


@dataclass(frozen=True)
class Champion:
    """The current production model: its registry id, a local copy of its bundle, its tags."""

    id: str
    bundle: Path
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Promotion:
    """What a promotion changed: the new champion, and the old one's id and new tags."""

    champion_id: str
    retired_id: str | None
    retired_tags: list[str]
    store: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ChampionConflictError(RuntimeError):
    """The champion changed while this step was evaluating; the decision is stale. Rerun the step."""


class ChampionStore(Protocol):
    """Where the production model is found and replaced (a ClearML registry, or a local folder)."""

    #: Whether the registered model carries the production tag from the start (an offline record of
    #: the verdict), or gets it from :meth:`promote` once the old champion is retired (a registry).
    tag_on_register: bool

    def current(self) -> Champion | None:
        """The champion with a local bundle to evaluate, or ``None`` when nothing is in production."""
        ...

    def promote(
        self, bundle: Path, *, registration: dict[str, Any], decision: GateDecision, previous: Champion | None
    ) -> Promotion:
        """Make ``bundle`` the champion; ``previous`` keeps its record under the retired tags."""
        ...


class LocalChampionStore:
    """A model registry in a folder, for offline runs: ``<root>/<model_name>/``.

    - ``models/<id>/``: each promoted bundle, with ``record.json`` (its tags, when promoted and
      retired, the gate decision); records are never deleted;
    - ``<tag>.json`` (``production.json``): the pointer to the champion, replaced atomically;
    - ``history.json``: every promotion and retirement, oldest first.

    Promotions take an exclusive lock on the folder, and fail with :class:`ChampionConflictError`
    when the champion changed since the caller read it.
    """

    tag_on_register = True

    def __init__(
        self, root: Path | str, model_name: str, tag: str = "production", retired_tag: str = "production-retired"
    ):
        self.folder = Path(root) / model_name
        self.tag = tag
        self.retired_tag = retired_tag

    @property
    def pointer(self) -> Path:
        return self.folder / f"{self.tag}.json"

    @property
    def history_file(self) -> Path:
        return self.folder / "history.json"

    def history(self) -> list[dict[str, Any]]:
        """Every promotion and retirement so far, oldest first."""
        return json.loads(self.history_file.read_text()) if self.history_file.is_file() else []

    def record(self, model_id: str) -> dict[str, Any]:
        """The record of a promoted (possibly since retired) model."""
        return json.loads((self.folder / "models" / model_id / "record.json").read_text())

    def current(self) -> Champion | None:
        if not self.pointer.is_file():
            return None
        model_id = json.loads(self.pointer.read_text())["id"]
        bundle = self.folder / "models" / model_id
        if not (bundle / ModelBundle.WEIGHTS).is_file():
            raise FileNotFoundError(
                f"{self.pointer} names model {model_id}, but {bundle} holds no bundle: restore the folder, "
                f"or delete {self.pointer} to start without a champion"
            )
        metadata = ModelBundle(bundle).metadata()
        return Champion(model_id, bundle, tuple(self.record(model_id)["tags"]), metadata)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def promote(
        self, bundle: Path, *, registration: dict[str, Any], decision: GateDecision, previous: Champion | None
    ) -> Promotion:
        now = datetime.now(timezone.utc)
        model_id = f"{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:6]}"
        with self._locked():
            current = self.current()
            if (current.id if current else None) != (previous.id if previous else None):
                raise ChampionConflictError(
                    f"the {self.tag} model of {self.folder} changed to {current.id if current else None} while this "
                    f"step compared against {previous.id if previous else None}; rerun the register step"
                )
            self._add_bundle(bundle, model_id, now, registration, decision)
            write_json(
                self.pointer, {"id": model_id, "bundle": f"models/{model_id}", "since": now.isoformat()}, default=str
            )
            events: list[dict[str, Any]] = [
                {
                    "at": now.isoformat(),
                    "event": "promoted",
                    "id": model_id,
                    "tags": [self.tag],
                    "replaced": previous.id if previous else None,
                    "decision": decision.to_dict(),
                }
            ]
            retired: list[str] = []
            if previous is not None:
                retired = self._retire(previous.id, now, replaced_by=model_id)
                events.append(
                    {
                        "at": now.isoformat(),
                        "event": "retired",
                        "id": previous.id,
                        "tags": retired,
                        "replaced_by": model_id,
                    }
                )
            write_json(self.history_file, [*self.history(), *events], default=str)
        log.info("%s is now the %s model in %s", model_id, self.tag, self.folder)
        return Promotion(model_id, previous.id if previous else None, retired, "local")

    def _add_bundle(
        self, bundle: Path, model_id: str, now: datetime, registration: dict[str, Any], decision: GateDecision
    ) -> None:
        models = self.folder / "models"
        models.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{model_id}.", dir=models))
        try:
            shutil.copytree(bundle, staging, dirs_exist_ok=True)
            record = {
                "id": model_id,
                "tags": [self.tag],
                "promoted_at": now.isoformat(),
                "retired_at": None,
                "registration_id": registration.get("id"),
                "decision": decision.to_dict(),
            }
            write_json(staging / "record.json", record, default=str)
            os.replace(staging, models / model_id)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _retire(self, model_id: str, now: datetime, replaced_by: str) -> list[str]:
        record = self.record(model_id)
        tags = [t for t in record["tags"] if t != self.tag]
        tags += [t for t in retired_tags(self.retired_tag, now) if t not in tags]
        record.update(tags=tags, retired_at=now.isoformat(), replaced_by=replaced_by)
        write_json(self.folder / "models" / model_id / "record.json", record, default=str)
        return tags


def code_version() -> str:
    """The git commit of the working tree (with ``-dirty``), or the package version outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{commit}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return f"d2ops-{d2ops.__version__}"


def build_bundle(
    out_dir: Path,
    *,
    weights: Path,
    d2_config: Path,
    labels: list[str],
    metrics: dict[str, Any],
    metadata: dict[str, Any],
) -> Path:
    """Write a bundle folder atomically (:meth:`ModelBundle.write`), recording the code that built it."""
    meta = {"code_version": code_version(), "d2ops_version": d2ops.__version__, **metadata}
    bundle = ModelBundle.write(out_dir, weights=weights, d2_config=d2_config, labels=labels, metrics=metrics,
                               metadata=meta)  # fmt: skip
    log.info("model bundle written to %s", bundle.path)
    return bundle.path


def zip_bundle(bundle_dir: Path) -> Path:
    """A zip of the bundle beside it (what gets uploaded as the registered model's weights)."""
    return ModelBundle(Path(bundle_dir)).zip()
