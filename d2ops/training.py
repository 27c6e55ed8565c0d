"""Training: build the detectron2 config from an experiment and run detectron2's trainer.

Metrics leave the trainer through detectron2's own writer mechanism (:class:`ReporterWriter`),
so the training loop itself is detectron2's, untouched.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from detectron2 import model_zoo
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import DefaultTrainer, HookBase
from detectron2.evaluation import COCOEvaluator
from detectron2.utils.events import EventWriter, get_event_storage

from d2ops import storage
from d2ops.config import ExperimentConfig
from d2ops.datasets import RegisteredDataset
from d2ops.reporting import Reporter

__all__ = [
    "ReporterWriter",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "build_d2_config",
    "resolve_device",
    "train",
]

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the step fails instead of saving a broken model."""


def resolve_device(requested: str) -> str:
    """``auto`` means CUDA when a GPU is visible, else the CPU."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return requested


def _base_config(cfg: ExperimentConfig) -> CfgNode:
    d2 = get_cfg()
    d2.set_new_allowed(True)
    if cfg.model.zoo_config:
        try:
            path = model_zoo.get_config_file(cfg.model.zoo_config)
        except RuntimeError as err:
            raise ValueError(
                f"model.zoo_config {cfg.model.zoo_config!r} is not in detectron2's model zoo "
                "(e.g. COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml)"
            ) from err
    else:
        path = str(cfg.model.config_file)
    d2.merge_from_file(path)
    d2.set_new_allowed(False)
    return d2


def _merge_overrides(d2: CfgNode, overrides: dict[str, Any]) -> None:
    pairs: list[Any] = []
    for key, value in overrides.items():
        pairs += [key, value]
    try:
        d2.merge_from_list(pairs)
    except (KeyError, AttributeError, AssertionError, ValueError) as err:
        raise ValueError(
            f"model.overrides: {err} (keys must exist in detectron2's config, with values of the same type)"
        ) from None


def check_model_config(cfg: ExperimentConfig) -> None:
    """Fail early (before data or GPU time) on a bad model-zoo name or detectron2 override."""
    _merge_overrides(_base_config(cfg), cfg.model.overrides)


def build_d2_config(
    cfg: ExperimentConfig,
    dataset: RegisteredDataset,
    output_dir: Path,
    weights: str | None = None,
) -> CfgNode:
    """The full, frozen detectron2 config for this experiment and dataset."""
    d2 = _base_config(cfg)
    d2.MODEL.WEIGHTS = weights or ""
    d2.DATASETS.TRAIN = (dataset.name("train"),)
    d2.DATASETS.TEST = (dataset.name("val"),)
    d2.DATALOADER.NUM_WORKERS = cfg.solver.num_workers
    d2.SOLVER.IMS_PER_BATCH = cfg.solver.ims_per_batch
    d2.SOLVER.BASE_LR = cfg.solver.base_lr
    d2.SOLVER.MAX_ITER = cfg.solver.max_iter
    d2.SOLVER.WARMUP_ITERS = cfg.solver.warmup_iters
    d2.SOLVER.STEPS = tuple(cfg.solver.steps)
    d2.SOLVER.CHECKPOINT_PERIOD = cfg.solver.checkpoint_period
    d2.TEST.EVAL_PERIOD = cfg.solver.eval_period
    d2.SEED = cfg.solver.seed
    d2.MODEL.ROI_HEADS.NUM_CLASSES = len(dataset.class_names)
    d2.MODEL.RETINANET.NUM_CLASSES = len(dataset.class_names)
    _merge_overrides(d2, cfg.model.overrides)
    d2.MODEL.DEVICE = resolve_device(cfg.runtime.device)
    d2.OUTPUT_DIR = str(output_dir)
    d2.freeze()
    return d2


class ReporterWriter(EventWriter):
    """Forwards every scalar in detectron2's EventStorage (losses, lr, timings, eval AP) to a Reporter.

    Each (name, iteration) pair is reported once; scalars with a smoothing hint are reported
    as their median over ``window`` iterations, like detectron2's own TensorBoard writer.
    """

    def __init__(self, reporter: Reporter, window: int = 20) -> None:
        self._reporter = reporter
        self._window = window
        self._last: dict[str, int] = {}

    def write(self) -> None:
        storage = get_event_storage()
        for name, (value, iteration) in storage.latest_with_smoothing_hint(self._window).items():
            if self._last.get(name, -1) >= iteration:
                continue
            self._last[name] = iteration
            title, _, series = name.rpartition("/")
            self._reporter.scalar(title or "train", series, float(value), int(iteration))


def _diverged_message(iteration: int | str) -> str:
    return (
        f"training diverged: the loss became NaN/inf at iteration {iteration}. "
        "Lower solver.base_lr (e.g. halve it) or raise solver.warmup_iters, then rerun; "
        "no model was saved from this run."
    )


def restore_checkpoints(uri: str, local_dir: Path) -> bool:
    """Bring the checkpoints under ``uri`` into ``local_dir`` so training resumes from them."""
    if storage.is_s3_uri(uri):
        try:
            storage.download(uri, local_dir, progress=False)
        except storage.StorageError as err:
            if "no object" not in str(err):
                raise
            return False
    else:
        src = Path(uri)
        if not (src / "last_checkpoint").is_file():
            return False
        local_dir.mkdir(parents=True, exist_ok=True)
        for item in src.iterdir():
            if item.is_file() and not (local_dir / item.name).exists():
                shutil.copy2(item, local_dir / item.name)
    return (local_dir / "last_checkpoint").is_file()


class CheckpointSync(HookBase):
    """Mirrors detectron2's checkpoints to ``uri`` (S3 or a folder) after each one is written.

    The checkpoint file goes first and the ``last_checkpoint`` pointer after it, so a reader
    never sees a pointer to a file that is not there yet.
    """

    def __init__(self, uri: str, period: int) -> None:
        self.uri = uri.rstrip("/")
        self.period = period

    def after_step(self) -> None:
        if (self.trainer.iter + 1) % self.period == 0:
            self.sync()

    def after_train(self) -> None:
        self.sync()

    def sync(self) -> None:
        out = Path(self.trainer.cfg.OUTPUT_DIR)
        pointer = out / "last_checkpoint"
        if not pointer.is_file():
            return
        for path in (out / pointer.read_text().strip(), pointer):
            if not path.is_file():
                continue
            if storage.is_s3_uri(self.uri):
                storage.upload(path, f"{self.uri}/", progress=False)
            else:
                Path(self.uri).mkdir(parents=True, exist_ok=True)
                tmp = Path(self.uri) / f".{path.name}.part"
                shutil.copy2(path, tmp)
                os.replace(tmp, Path(self.uri) / path.name)


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer, with COCO evaluation and a Reporter writer attached."""

    reporter: Reporter = Reporter()
    checkpoint_uri: str | None = None

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None) -> COCOEvaluator:
        folder = output_folder or str(Path(cfg.OUTPUT_DIR) / "eval")
        return COCOEvaluator(dataset_name, output_dir=folder, tasks=_eval_tasks(cfg))

    def build_writers(self) -> list[EventWriter]:
        return [*super().build_writers(), ReporterWriter(self.reporter)]

    def build_hooks(self) -> list[HookBase]:
        hooks = super().build_hooks()
        if self.checkpoint_uri:
            hooks.append(CheckpointSync(self.checkpoint_uri, self.cfg.SOLVER.CHECKPOINT_PERIOD))
        return hooks


def _eval_tasks(cfg: CfgNode) -> tuple[str, ...]:
    return ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)


@dataclass
class TrainResult:
    """What a training run leaves behind."""

    weights: str
    d2_config: str
    iterations: int
    seconds: float
    device: str
    eval_metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train(
    cfg: ExperimentConfig,
    dataset: RegisteredDataset,
    output_dir: Path,
    *,
    weights: str | None = None,
    reporter: Reporter | None = None,
    resume: bool = True,
    checkpoint_uri: str | None = None,
) -> TrainResult:
    """Train a detector; resume from the last checkpoint when there is one.

    With ``checkpoint_uri`` (``<output_uri>/.../checkpoints``), checkpoints are mirrored there
    and a rerun on another machine resumes from them.
    """
    reporter = reporter or Reporter()
    output_dir.mkdir(parents=True, exist_ok=True)
    if resume and checkpoint_uri and restore_checkpoints(checkpoint_uri, output_dir):
        log.info("restored checkpoints from %s", checkpoint_uri)
    d2 = build_d2_config(cfg, dataset, output_dir, weights)
    config_path = output_dir / "config.yaml"
    config_path.write_text(d2.dump())
    reporter.configuration("detectron2", d2.dump(), "the merged detectron2 config of this run")

    trainer_cls = type("BoundTrainer", (Trainer,), {"reporter": reporter, "checkpoint_uri": checkpoint_uri})
    trainer = trainer_cls(d2)
    trainer.resume_or_load(resume=resume)
    start_iter = trainer.start_iter
    if start_iter >= d2.SOLVER.MAX_ITER:
        log.warning(
            "the checkpoint in %s is already at iteration %d >= solver.max_iter %d: nothing to train; "
            "use a fresh runtime.output_dir (or raise solver.max_iter) to train again",
            output_dir,
            start_iter,
            d2.SOLVER.MAX_ITER,
        )
    log.info("training on %s from iteration %d to %d", d2.MODEL.DEVICE, start_iter, d2.SOLVER.MAX_ITER)
    tic = time.perf_counter()
    try:
        trainer.train()
    except FloatingPointError as err:
        raise TrainingDiverged(_diverged_message(str(err).rsplit("=", 1)[-1].rstrip("!"))) from err
    seconds = time.perf_counter() - tic
    final = output_dir / "model_final.pth"
    if not final.is_file():
        raise RuntimeError(f"training finished but {final} was not written; check the log above")
    return TrainResult(
        weights=str(final),
        d2_config=str(config_path),
        iterations=d2.SOLVER.MAX_ITER - start_iter,
        seconds=seconds,
        device=d2.MODEL.DEVICE,
        eval_metrics=_flatten(getattr(trainer, "_last_eval_results", None) or {}),
    )


def _flatten(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task, metrics in results.items():
        for key, value in (metrics or {}).items():
            out[f"{task}/{key}"] = value
    return out
