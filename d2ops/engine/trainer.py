"""Training: build the detectron2 config from an experiment and run detectron2's trainer.

Metrics leave the trainer through detectron2's own writer mechanism (:class:`ReporterWriter`),
so the training loop itself is detectron2's, untouched. Checkpoints are crash-safe and scoped
to the run (:mod:`d2ops.engine.checkpoints`): a killed or retried run resumes where it stopped, and a
checkpoint of another training is never taken for this one's. Several GPUs or machines go
through detectron2's ``launch`` (:mod:`d2ops.engine.distributed`).

Resume rule (stated in full in :mod:`d2ops.engine.checkpoints`): a run resumes only its own
checkpoints, those of its run key (the pipeline run; outside a pipeline the training identity
with ``solver.max_iter``, ``runtime.output_dir`` and ``runtime.resume_from``). Another run's
checkpoints are continued only when ``runtime.resume_from`` names them; that is logged at
WARNING and returned as :attr:`TrainResult.resumed_from` for the bundle's lineage.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from detectron2.config import CfgNode
from detectron2.engine import DefaultTrainer, HookBase
from detectron2.evaluation import COCOEvaluator
from detectron2.utils.events import EventWriter, get_event_storage

from d2ops.config import DataConfig, ExperimentConfig
from d2ops.data.registration import RegisteredDataset, register_splits
from d2ops.engine.checkpoints import (
    RUN_RECORD,
    AtomicCheckpointer,
    CheckpointConflict,
    CheckpointOnStop,
    CheckpointSync,
    ResumePoint,
    RunRecord,
    explicit_resume_point,
    find_resume_point,
    new_run_record,
    prepare_output_dir,
    restore_checkpoints,
)
from d2ops.engine.d2config import build_d2_config
from d2ops.engine.distributed import EventRelay, FileReporter, LaunchPlan, launch_plan
from d2ops.reporting import Reporter
from d2ops.utils.device import resolve_device
from d2ops.utils.jsonio import write_json
from d2ops.utils.logs import setup_logging

__all__ = [
    "CheckpointConflict",
    "ReporterWriter",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "load_resume_point",
    "resolve_device",
    "train",
]

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the step fails instead of saving a broken model."""


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


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with COCO evaluation, a Reporter writer, crash-safe checkpoints
    (:class:`AtomicCheckpointer`, keeping ``run_record`` up to date) and their mirror on
    ``checkpoint_uri``."""

    def __init__(
        self,
        cfg: CfgNode,
        *,
        reporter: Reporter | None = None,
        checkpoint_uri: str | None = None,
        run_record: RunRecord | None = None,
    ) -> None:
        # Set before DefaultTrainer.__init__, which calls build_hooks (and through it build_writers): both read them.
        self.reporter = reporter if reporter is not None else Reporter()
        self.checkpoint_uri = checkpoint_uri
        self.run_record = run_record
        super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None) -> COCOEvaluator:
        folder = output_folder or str(Path(cfg.OUTPUT_DIR) / "eval")
        return COCOEvaluator(dataset_name, output_dir=folder, tasks=_eval_tasks(cfg))

    def build_writers(self) -> list[EventWriter]:
        return [*super().build_writers(), ReporterWriter(self.reporter)]

    def build_hooks(self) -> list[HookBase]:
        # DefaultTrainer builds its PeriodicCheckpointer here, around self.checkpointer: swap it first.
        old: Any = self.checkpointer  # type: ignore[has-type]
        self.checkpointer = AtomicCheckpointer(old.model, old.save_dir, record=self.run_record, **old.checkpointables)
        hooks = [*super().build_hooks(), CheckpointOnStop()]
        if self.checkpoint_uri:
            hooks.append(CheckpointSync(self.checkpoint_uri, self.cfg.SOLVER.CHECKPOINT_PERIOD))
        return hooks


def _eval_tasks(cfg: CfgNode) -> tuple[str, ...]:
    return ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)


@dataclass
class TrainResult:
    """What a training run leaves behind.

    ``iterations`` were trained by this call, from ``start_iter`` to ``solver.max_iter``;
    ``resumed_checkpoint`` names the checkpoint file this call continued from (this run's own,
    written by an earlier attempt, or another run's); ``reused`` is True when this run's own
    finished training was found and returned without training (a retried step).
    ``resumed_from`` is the lineage: ``{"run_key", "checkpoint", "iteration"}`` of another run's
    checkpoint this training continues (``runtime.resume_from``; kept by retries of this run),
    None when it trained from iteration 0 (from scratch or ``model.weights``). ``run_record`` is
    the run's ``d2ops_run.json`` (run key, identity, ``resume_from``, ``resumed_from``,
    checkpoints), a file to hand on for lineage.
    On a machine other than the first of a multi-machine run, ``weights`` and ``run_record`` are empty.
    """

    weights: str
    d2_config: str
    iterations: int
    seconds: float
    device: str
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    start_iter: int = 0
    resumed_checkpoint: str | None = None
    resumed_from: dict[str, Any] | None = None
    reused: bool = False
    world_size: int = 1
    run_record: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainJob:
    """Everything one training process needs; picklable, for detectron2's spawned workers."""

    d2: CfgNode
    record: RunRecord
    checkpoint_uri: str | None = None
    resume_from: ResumePoint | None = None
    data_root: Path | None = None
    data: DataConfig | None = None


def load_resume_point(trainer: Trainer, point: ResumePoint) -> None:
    """Load the checkpoint with all its state (model, optimizer, scheduler, iteration)."""
    trainer.checkpointer.load(str(point.path))
    trainer.start_iter = trainer.iter + 1
    if trainer.start_iter != point.start_iter:
        raise CheckpointConflict(
            f"{point.path} holds iteration {trainer.iter} but its run record says {point.iteration}; "
            "the checkpoint folder was modified by hand: use a fresh runtime.output_dir"
        )


def _fit(job: TrainJob, reporter: Reporter) -> dict[str, Any]:
    """Build the trainer, load the resume point (or the initial weights) and train to max_iter."""
    trainer = Trainer(job.d2, reporter=reporter, checkpoint_uri=job.checkpoint_uri, run_record=job.record)
    if job.resume_from is not None:
        load_resume_point(trainer, job.resume_from)
    else:
        trainer.resume_or_load(resume=False)
    log.info("training on %s from iteration %d to %d", job.d2.MODEL.DEVICE, trainer.start_iter, trainer.max_iter)
    try:
        trainer.train()
        for hook in trainer._hooks:  # detectron2 keeps the registered hooks there (no public accessor)
            if isinstance(hook, CheckpointOnStop):
                hook.raise_pending()  # a stop that came during the last iteration
    except FloatingPointError as err:
        # detectron2 raises it from the loss check ("... at iteration=N!") and from the proposal
        # generator ("Predicted boxes or scores contain Inf/NaN"); trainer.iter is right for both
        raise TrainingDiverged(_diverged_message(trainer.iter)) from err
    metrics = _flatten(getattr(trainer, "_last_eval_results", None) or {})
    return {"start_iter": trainer.start_iter, "eval_metrics": metrics}


def _allow_cpu_ddp() -> None:
    """Let DefaultTrainer wrap a CPU model in DDP (gloo): detectron2 passes ``device_ids=[rank]``,
    which PyTorch accepts only for GPU modules. Patched in the spawned worker process only."""
    from functools import partial

    from detectron2.engine import defaults

    defaults.create_ddp_model = partial(defaults.create_ddp_model, device_ids=None)


def _train_worker(job: TrainJob, events: Path, result: Path) -> None:
    """One process of a multi-process run (spawned by detectron2's launch): register the data,
    train; the first process reports through ``events`` and writes its outcome to ``result``."""
    from detectron2.utils import comm

    main = comm.is_main_process()
    if job.d2.MODEL.DEVICE == "cpu":
        _allow_cpu_ddp()
    setup_logging(logging.INFO if main else logging.WARNING)
    if job.data_root is not None and job.data is not None:
        register_splits(job.data_root, job.data)
    outcome = _fit(job, FileReporter(events) if main else Reporter())
    if main:
        write_json(result, outcome, indent=None, default=str)


def _launch(job: TrainJob, plan: LaunchPlan, reporter: Reporter, output_dir: Path) -> dict[str, Any]:
    """Train in this process (one GPU or the CPU) or in ``plan``'s processes via detectron2's launch."""
    if plan.world_size == 1:
        return _fit(job, reporter)
    from detectron2.engine import launch
    from torch.multiprocessing import ProcessRaisedException

    events, result = output_dir / "d2ops_events.jsonl", output_dir / "d2ops_rank0.json"
    result.unlink(missing_ok=True)
    log.info(
        "launching %d process(es) on machine %d of %d", plan.num_gpus_per_machine, plan.machine_rank, plan.num_machines
    )
    try:
        with EventRelay(events, reporter):
            launch(
                _train_worker,
                plan.num_gpus_per_machine,
                num_machines=plan.num_machines,
                machine_rank=plan.machine_rank,
                dist_url=plan.dist_url,
                args=(job, events, result),
            )
    except ProcessRaisedException as err:
        if "TrainingDiverged" in str(err):
            raise TrainingDiverged(str(err).strip().splitlines()[-1].partition(": ")[2]) from None
        raise
    except BaseException:
        # A time limit or Ctrl-C interrupts the wait in this process; the workers (non-daemon) would
        # otherwise keep training and hold the process open until they finish.
        _stop_workers()
        raise
    if not plan.is_master:
        return {"start_iter": job.resume_from.start_iter if job.resume_from else 0, "eval_metrics": {}}
    return dict(json.loads(result.read_text()))


def _stop_workers(grace_s: float = 10.0) -> None:
    import multiprocessing

    workers = multiprocessing.active_children()
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join(grace_s)
        if worker.is_alive():
            worker.kill()
    if workers:
        log.warning("stopped %d training worker process(es)", len(workers))


def _resume_point(output_dir: Path, checkpoint_uri: str | None, record: RunRecord, resume: bool) -> ResumePoint | None:
    """Where this run continues, by the rule of :mod:`d2ops.engine.checkpoints`; updates ``record`` to match.

    First this run's own checkpoints (unless ``resume`` is False); failing those, the other run's
    checkpoint that ``record.resume_from`` names, which is logged at WARNING and recorded in
    ``record.resumed_from``. None: train from iteration 0.
    """
    aside = prepare_output_dir(output_dir, resume=resume, expected=record)
    own = None
    if resume:
        if checkpoint_uri and restore_checkpoints(checkpoint_uri, output_dir, record):
            log.info("restored checkpoints of run %s from %s", record.run_key, checkpoint_uri)
        own = find_resume_point(output_dir, record)
    if own is not None:
        found = RunRecord.read(output_dir)
        record.checkpoints = dict(found.checkpoints) if found else {}
        record.resumed_from = found.resumed_from if found else None
        if not own.reusable:
            log.info(
                "resuming this run's own checkpoint %s (run key %s, written by an earlier attempt) at iteration %d",
                own.path,
                record.run_key,
                own.start_iter,
            )
        return own
    if not record.resume_from:
        return None
    point = explicit_resume_point(
        record.resume_from,
        record,
        checkpoint_uri=checkpoint_uri,
        local_dir=output_dir,
        moved=(output_dir, aside) if aside is not None else None,
    )
    record.resumed_from = {"run_key": point.run_key, "checkpoint": point.source, "iteration": point.iteration}
    log.warning(
        "continuing ANOTHER run's training: %s (run %s, iteration %d) with its optimizer and scheduler state, "
        "from iteration %d to %d, as runtime.resume_from=%s says; recorded as resumed_from in this run's record "
        "and train result",
        point.source,
        point.run_key,
        point.iteration,
        point.start_iter,
        record.max_iter,
        record.resume_from,
    )
    return point


def _reused(
    point: ResumePoint, config_path: Path, device: str, reporter: Reporter, resumed_from: dict[str, Any] | None
) -> TrainResult:
    log.info(
        "reusing %s: this run's own training already finished at iteration %d (solver.max_iter); "
        "nothing is trained again",
        point.path,
        point.start_iter,
    )
    reporter.single_value("train/reused_checkpoint", 1.0)
    return TrainResult(
        weights=str(point.path),
        d2_config=str(config_path),
        iterations=0,
        seconds=0.0,
        device=device,
        start_iter=point.start_iter,
        resumed_checkpoint=point.path.name,
        resumed_from=resumed_from,
        reused=True,
        run_record=str(point.path.parent / RUN_RECORD),
    )


def train(
    cfg: ExperimentConfig,
    dataset: RegisteredDataset,
    output_dir: Path,
    *,
    weights: str | None = None,
    reporter: Reporter | None = None,
    resume: bool = True,
    checkpoint_uri: str | None = None,
    run: RunRecord | None = None,
    data_root: Path | None = None,
    plan: LaunchPlan | None = None,
) -> TrainResult:
    """Train a detector; resume from this run's last checkpoint when there is one.

    ``run`` identifies the run (:func:`d2ops.engine.checkpoints.new_run_record`; default: from ``cfg``
    alone, as outside a pipeline). With ``checkpoint_uri`` (``<output_uri>/.../checkpoints/<run
    key>``), checkpoints are mirrored there and a rerun of this run on another machine resumes
    from them. Only this run's checkpoints are resumed (``resume=False``: not even those);
    another run's only when ``run.resume_from`` names it (``runtime.resume_from``), recorded in
    ``resumed_from``. A checkpoint of another training, or one already at ``max_iter`` that is
    not this run's finished training, raises :class:`CheckpointConflict`; this run's finished
    training is returned as is (``reused=True``). ``plan`` (default: from ``cfg.runtime``, one machine)
    says how many processes train; more than one needs ``data_root`` so that each can
    register the dataset.
    """
    reporter = reporter or Reporter()
    record = replace(run or new_run_record(cfg, ""), checkpoints={}, resumed_from=None)
    plan = plan or launch_plan(
        cfg.runtime.num_gpus,
        cfg.runtime.num_machines,
        device=cfg.runtime.device,
        visible_gpus=torch.cuda.device_count(),
    )
    if plan.world_size > 1 and data_root is None:
        raise ValueError("training in several processes needs data_root, the dataset folder each process registers")
    point = _resume_point(output_dir, checkpoint_uri, record, resume)
    d2 = build_d2_config(cfg, dataset, output_dir, weights)
    config_path = output_dir / "config.yaml"
    config_path.write_text(d2.dump())
    reporter.configuration("detectron2", d2.dump(), "the merged detectron2 config of this run")
    if point is not None and point.reusable:
        return _reused(point, config_path, d2.MODEL.DEVICE, reporter, record.resumed_from)
    job = TrainJob(d2, record, checkpoint_uri, point, data_root, cfg.data)
    tic = time.perf_counter()
    outcome = _launch(job, plan, reporter, output_dir)
    seconds = time.perf_counter() - tic
    final = output_dir / "model_final.pth"
    if plan.is_master and not final.is_file():
        raise RuntimeError(f"training finished but {final} was not written; check the log above")
    return TrainResult(
        weights=str(final) if plan.is_master else "",
        d2_config=str(config_path),
        iterations=d2.SOLVER.MAX_ITER - outcome["start_iter"],
        seconds=seconds,
        device=d2.MODEL.DEVICE,
        eval_metrics=outcome["eval_metrics"],
        start_iter=outcome["start_iter"],
        resumed_checkpoint=point.path.name if point else None,
        resumed_from=record.resumed_from,
        world_size=plan.world_size,
        run_record=str(output_dir / RUN_RECORD) if plan.is_master else "",
    )


def _flatten(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task, metrics in results.items():
        for key, value in (metrics or {}).items():
            out[f"{task}/{key}"] = value
    return out
