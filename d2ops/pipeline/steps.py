"""The pipeline's steps as library functions, shared by tasks/*.py and every pipeline mode.

Each step takes a :class:`StepContext` (the config, its input URIs, a work folder, a reporter)
and returns a :class:`StepOutput` (files to publish as artifacts, plus plain values). Inputs are
URIs: a local path, an ``s3://`` URI, or a ClearML artifact URL, so the same function runs in
one process offline and on separate agents in a cluster.

The wiring between steps (which output feeds which input) is :data:`STEP_INPUTS`; both the
offline runner and the PipelineController are built from it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from d2ops.config import ExperimentConfig, config_hash
from d2ops.data.validation import validate_dataset
from d2ops.model.bundle import ModelBundle, build_bundle, zip_bundle
from d2ops.registry.champion import Champion, ChampionStore, LocalChampionStore, Promotion
from d2ops.registry.gate import (
    GateDecision,
    ScoredChampion,
    gate_decision,
    gate_headline,
    gate_metric_value,
    gate_record,
    labels_mismatch,
    promotes,
    registration_tags,
    report_gate,
)
from d2ops.reporting import Reporter
from d2ops.storage import s3 as storage
from d2ops.storage.s3 import s3_problem
from d2ops.utils.jsonio import write_json

__all__ = [
    "STEPS",
    "STEP_FUNCTIONS",
    "STEP_INPUTS",
    "StepContext",
    "StepOutput",
    "StepRuntime",
    "fetch",
    "inference_detector",
]

log = logging.getLogger(__name__)

STEPS = ("download", "train", "evaluate", "infer", "register")

#: step -> {input name: (producing step, artifact name)}
STEP_INPUTS: dict[str, dict[str, tuple[str, str]]] = {
    "download": {},
    "train": {"dataset_manifest": ("download", "dataset_manifest")},
    "evaluate": {"weights": ("train", "weights"), "d2_config": ("train", "d2_config")},
    "infer": {"weights": ("train", "weights"), "d2_config": ("train", "d2_config")},
    "register": {
        "weights": ("train", "weights"),
        "d2_config": ("train", "d2_config"),
        "labels": ("train", "labels"),
        "metrics": ("evaluate", "metrics"),
        "dataset_manifest": ("download", "dataset_manifest"),
        "train_run": ("train", "train_run"),
    },
}


class StepRuntime:
    """What a step asks of the system it runs in; this base is plain library use (no ClearML).

    :class:`d2ops.clearml.step.ClearMLStepRuntime` answers the same questions from the step's
    ClearML task: its fileserver, datasets, pipeline run, output URI, model registry.
    """

    #: True where the step can register models (the register step then uses :meth:`champion_store`).
    registers_models = False

    def fetch_url(self, uri: str) -> Path:
        """A local copy of a URL that is neither a path nor ``s3://`` (e.g. a ClearML fileserver artifact)."""
        raise FileNotFoundError(f"cannot fetch {uri}: only local paths and s3:// URIs are readable outside ClearML")

    def dataset_local_copy(self, dataset_id: str) -> Path:
        raise ValueError(f"data.dataset_id {dataset_id}: ClearML datasets are read only inside a ClearML task")

    def register_dataset(self, cfg: ExperimentConfig, manifest: dict[str, Any]) -> str | None:
        log.warning("data.register_dataset: not inside a ClearML task; nothing registered")
        return None

    def on_agent(self) -> bool:
        return False

    def run_key(self, machine_rank: int = 0) -> str | None:
        """Which run this training is, where the system says (a pipeline run, a cloned task); None: the
        standalone rule of :func:`d2ops.engine.checkpoints.standalone_run_key` applies."""
        return None

    def output_uri(self) -> str | None:
        """The output URI the system gives this step (an agent's ``default_output_uri``), if any."""
        return None

    def launch_multi_node(self, num_machines: int, num_gpus: int, port: int) -> dict[str, Any] | None:
        return None

    def champion_store(self, cfg: ExperimentConfig) -> ChampionStore:
        gate = cfg.registry.champion
        return LocalChampionStore(cfg.registry.local_dir, cfg.registry.model_name, gate.tag, gate.retired_tag)

    def lineage(self) -> dict[str, str | None]:
        return {"step_task": None, "pipeline_run": None}

    def register_model(self, bundle_zip: Path, **kwargs: Any) -> dict[str, Any]:
        """Register a bundle in a model registry; plain library use has none."""
        return {}


@dataclass
class StepContext:
    """Everything a step needs; nothing in here depends on where it runs."""

    cfg: ExperimentConfig
    workdir: Path
    inputs: dict[str, str] = field(default_factory=dict)
    reporter: Reporter = field(default_factory=Reporter)
    runtime: StepRuntime = field(default_factory=StepRuntime)

    def input_path(self, name: str) -> Path:
        if not self.inputs.get(name):
            raise ValueError(f"step input {name!r} is missing; it is produced by an earlier pipeline step")
        return fetch(self.inputs[name], self.workdir / "inputs" / name, self.runtime)


@dataclass
class StepOutput:
    files: dict[str, Path] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)


def fetch(uri: str, dest: Path, runtime: StepRuntime | None = None) -> Path:
    """A local path for ``uri``: local paths as-is, ``s3://`` via the cached downloader,
    anything else (a ClearML fileserver URL) through the step's runtime."""
    if storage.is_s3_uri(uri):
        return storage.resolve_local(uri, dest, progress=False)
    if "://" not in uri or uri.startswith("file://"):
        path = Path(uri.removeprefix("file://"))
        if not path.exists():
            raise FileNotFoundError(f"input {uri} does not exist")
        return path
    return (runtime or StepRuntime()).fetch_url(uri)


def _dataset_cache(cfg: ExperimentConfig) -> Path:
    """The local download folder of an S3 dataset, one per source URI."""
    name = cfg.data.source.removeprefix("s3://").strip("/").replace("/", "_").replace(":", "_")
    return Path(cfg.data.cache_dir) / name


def sync_dataset(
    cfg: ExperimentConfig, runtime: StepRuntime | None = None, *, progress: bool = True
) -> tuple[storage.TransferStats, Path]:
    """The dataset's local folder and what the transfer did.

    From the ClearML Dataset version ``data.dataset_id`` when set (its identity is that version),
    else from ``data.source``: downloaded (cached by ETag) when it is on S3, used in place when local.
    """
    dataset_id = cfg.data.dataset_id
    if not dataset_id:
        return storage.sync(cfg.data.source, _dataset_cache(cfg), progress=progress)
    local = (runtime or StepRuntime()).dataset_local_copy(dataset_id)
    stats, root = storage.sync(str(local), _dataset_cache(cfg), progress=progress)
    stats.identity = f"clearml-dataset:{dataset_id}"
    return stats, root


def dataset_dir(ctx: StepContext) -> Path:
    """The dataset's local folder (see :func:`sync_dataset`)."""
    return sync_dataset(ctx.cfg, ctx.runtime)[1]


def _validated_dataset(ctx: StepContext, root: Path | None = None) -> tuple[Path, dict[str, Any]]:

    root = root or dataset_dir(ctx)
    data = ctx.cfg.data
    summaries = validate_dataset(
        root,
        data.format,
        data.folders,
        data.annotation_file,
        label_attribute=data.label_attribute,
        class_names=data.class_names,
        duplicate_images=data.duplicate_images,
        source=None if data.dataset_id else data.source,  # a ClearML Dataset did not come from data.source
    )
    return root, {role: s.to_dict() for role, s in summaries.items()}


def _dataset_classes(root: Path, cfg: ExperimentConfig) -> tuple[list[str], list[str]]:
    """The classes the model will have and how they were decided, said at WARNING where data and config
    disagree (a dropped Roboflow supercategory, an empty category, a single-class VIA label)."""
    # lazy: torch and detectron2, only in the steps that use them (the controller imports STEPS)
    from d2ops.data.registration import dataset_classes

    classes, notes = dataset_classes(root, cfg.data)
    for note in notes:
        log.warning("%s", note)
    return classes, notes


def run_download(ctx: StepContext) -> StepOutput:
    """Fetch the dataset (and remote initial weights), validate it, and record its identity."""
    # lazy: torch and detectron2, only in the steps that use them (the controller imports STEPS)
    from d2ops.engine.d2config import check_model_config

    _localize_config_file(ctx)
    check_model_config(ctx.cfg)
    source = ctx.cfg.data.source
    stats, root = sync_dataset(ctx.cfg, ctx.runtime)
    manifest: dict[str, Any] = {"source": source, **stats.to_dict()}
    if ctx.cfg.data.dataset_id:
        manifest["clearml_dataset_id"] = ctx.cfg.data.dataset_id
    _check_cache_key(ctx, stats.identity)
    _, summaries = _validated_dataset(ctx, root)
    manifest["classes"], manifest["class_notes"] = _dataset_classes(root, ctx.cfg)
    if ctx.cfg.data.val_fraction is not None:
        # lazy: torch and detectron2, only in the steps that use them (the controller imports STEPS)
        from d2ops.data.registration import carved_val_images

        manifest["val_carved_from_train"] = carved_val_images(root, ctx.cfg.data)
    if ctx.cfg.data.register_dataset and not ctx.cfg.data.dataset_id:
        manifest["clearml_dataset_id"] = _register_dataset(ctx, manifest)
    if ctx.cfg.model.weights and storage.is_s3_uri(ctx.cfg.model.weights):
        fetch(ctx.cfg.model.weights, ctx.workdir / "weights")
    manifest["splits"] = summaries
    path = ctx.workdir / "dataset_manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, manifest, default=str)
    for role, summary in summaries.items():
        ctx.reporter.single_value(f"data/{role}_images", summary["images"])
    return StepOutput(
        files={"dataset_manifest": path},
        values={"identity": manifest.get("identity"), "bytes_transferred": manifest.get("bytes_transferred")},
    )


def _check_cache_key(ctx: StepContext, identity: str) -> None:
    """The controller keyed this step's cache on the data it listed at launch; say if it changed since."""
    expected = ctx.inputs.get("dataset_identity")
    if expected and expected != identity:
        log.warning(
            "the dataset changed between launch and download (cache key %s, downloaded %s): "
            "this run uses and records the downloaded data",
            expected[:16],
            identity[:16],
        )


def _register_dataset(ctx: StepContext, manifest: dict[str, Any]) -> str | None:
    """Register the S3 data as a ClearML Dataset of links (no copy), for triggers and lineage."""
    if not storage.is_s3_uri(ctx.cfg.data.source):
        log.warning("data.register_dataset: %s is not on S3; only S3 objects can be linked", ctx.cfg.data.source)
        return None
    return ctx.runtime.register_dataset(ctx.cfg, manifest)


def _localize_config_file(ctx: StepContext) -> None:
    """A detectron2 config file on S3 is fetched (cached) and the config pointed at the local copy."""
    source = ctx.cfg.model.config_file
    if source and storage.is_s3_uri(source):
        ctx.cfg = ctx.cfg.model_copy(deep=True)
        ctx.cfg.model.config_file = str(fetch(source, ctx.workdir / "model_config"))


def _initial_weights(ctx: StepContext) -> str | None:
    weights = ctx.cfg.model.weights
    if not weights:
        return None
    return str(fetch(weights, ctx.workdir / "weights"))


def run_train(ctx: StepContext) -> StepOutput:
    """Train on the train split, evaluating periodically on val; resume this run's checkpoints.

    The run key that scopes the checkpoints under ``clearml.output_uri`` is the ClearML pipeline
    run when the step is the task a pipeline controller created (so a retried step resumes and a
    new pipeline run starts fresh), the task's own id for a clone of a step (a new run), else the
    standalone key (training identity, ``max_iter``, output folder: a rerun of the same training
    resumes, or reuses it when it had finished); see :meth:`StepRuntime.run_key`.
    """
    import torch

    # lazy: torch and detectron2, only in the steps that use them (the controller imports STEPS)
    from d2ops.data.registration import register_splits
    from d2ops.engine.checkpoints import model_weights, new_run_record
    from d2ops.engine.distributed import check_gpus, launch_plan
    from d2ops.engine.trainer import train

    runtime = ctx.cfg.runtime
    check_gpus(runtime.num_gpus, device=runtime.device, visible_gpus=torch.cuda.device_count())
    mirror_key = _check_checkpoint_mirror(ctx)  # before the dataset moves
    _localize_config_file(ctx)
    stats, root = sync_dataset(ctx.cfg, ctx.runtime, progress=False)
    _validated_dataset(ctx, root)
    dataset = register_splits(root, ctx.cfg.data)
    shared_checkpoints = ctx.cfg.clearml.output_uri or ctx.runtime.output_uri()
    if runtime.num_machines > 1 and ctx.runtime.on_agent() and not shared_checkpoints:
        # Checked before the other machines are enqueued, not after.
        raise ValueError(
            "runtime.num_machines > 1 needs clearml.output_uri (or the agents' default_output_uri): every machine "
            "must resume from the same checkpoint, and only the first one writes them"
        )
    multi_node = ctx.runtime.launch_multi_node(runtime.num_machines, runtime.num_gpus, runtime.dist_port)
    plan = launch_plan(
        runtime.num_gpus,
        runtime.num_machines,
        device=runtime.device,
        visible_gpus=torch.cuda.device_count(),
        multi_node=multi_node,
    )
    manifest = json.loads(ctx.input_path("dataset_manifest").read_text()) if ctx.inputs.get("dataset_manifest") else {}
    run = new_run_record(ctx.cfg, manifest.get("identity") or stats.identity, ctx.runtime.run_key(plan.machine_rank))
    checkpoint_uri = _checkpoint_uri(ctx.cfg, run.run_key, ctx.runtime.output_uri())
    initial = _initial_weights(ctx)
    try:
        result = train(
            ctx.cfg,
            dataset,
            ctx.workdir / "train",
            weights=initial,
            reporter=ctx.reporter,
            resume=runtime.resume,
            checkpoint_uri=checkpoint_uri,
            run=run,
            data_root=root,
            plan=plan,
        )
    except (storage.StorageError, torch.multiprocessing.ProcessRaisedException) as exc:  # the latter: a DDP worker's
        if not checkpoint_uri or checkpoint_uri not in str(exc):
            raise
        fix = _mirror_fix(mirror_key == "clearml.output_uri")
        raise storage.StorageError(f"{mirror_key}: the checkpoint mirror failed: {exc}; {fix}") from exc
    values = {**result.to_dict(), "run_key": run.run_key, "training_identity": run.identity}
    if not plan.is_master:
        return StepOutput(values=values)
    labels = ctx.workdir / "train" / "labels.json"
    labels.write_text(json.dumps(dataset.class_names))
    # the model alone, without the optimizer state a checkpoint keeps for resuming: half the size downstream
    weights = model_weights(Path(result.weights), ctx.workdir / "train" / "weights" / Path(result.weights).name)
    return StepOutput(
        files={
            "weights": weights,
            "d2_config": Path(result.d2_config),
            "labels": labels,
            "train_run": Path(result.run_record),
        },
        values=values,
    )


def _mirror_fix(own: bool) -> str:
    if own:
        return (
            "make it reachable from this machine, or point clearml.output_uri at a reachable bucket "
            "(--set clearml.output_uri=s3://host:port/bucket, or the clearml/output_uri hyperparameter of a clone)"
        )
    return (
        "make it reachable from this worker, fix or remove sdk.development.default_output_uri in the agent's "
        "clearml.conf, or set clearml.output_uri to a reachable bucket (it wins over the agent's default)"
    )


def _check_checkpoint_mirror(ctx: StepContext) -> str:
    """Where this step's checkpoints are mirrored, checked before the train step moves any data: an
    unreachable S3 bucket fails here, named by its key (``clearml.output_uri``, or the agent's default output
    URI), not later inside training. Returns the message's start for errors while training."""

    own = ctx.cfg.clearml.output_uri
    key = "clearml.output_uri" if own else "the agent's sdk.development.default_output_uri"
    base = own or ctx.runtime.output_uri()
    if base and storage.is_s3_uri(base):
        why = s3_problem(base, "bucket")
        if why:
            raise storage.StorageError(
                f"{key} ({base}), where checkpoints are mirrored: {why}; {_mirror_fix(bool(own))}"
            )
    return key


def _checkpoint_uri(cfg: ExperimentConfig, run_key: str, task_output_uri: str | None = None) -> str | None:
    """``<output_uri>/<project>/<name>/checkpoints/<run key>``: one folder per run, never shared.

    ``output_uri`` is ``clearml.output_uri``, else the task's own (an agent's
    ``sdk.development.default_output_uri``), so a retried step on another worker finds them.
    """
    base = cfg.clearml.output_uri or task_output_uri
    if not base:
        return None
    return f"{base.rstrip('/')}/{cfg.clearml.project}/{cfg.name}/checkpoints/{run_key}"


def _detector(ctx: StepContext) -> tuple[Any, Any, Path]:
    # lazy: torch and detectron2, only in the steps that use them (the controller imports STEPS)
    from d2ops.data.registration import register_splits
    from d2ops.model.detector import Detector

    root, _ = _validated_dataset(ctx)
    dataset = register_splits(root, ctx.cfg.data)
    detector = Detector.from_files(
        ctx.input_path("d2_config"), ctx.input_path("weights"), dataset.class_names, ctx.cfg.runtime.device
    )
    return detector, dataset, root


def run_evaluate(ctx: StepContext) -> StepOutput:
    """COCO AP and precision/recall/F-beta on the configured evaluation split."""
    # lazy: torch and detectron2, only in the steps that use them (the controller imports STEPS)
    from d2ops.evaluation.metrics import evaluate

    detector, dataset, _ = _detector(ctx)
    result = evaluate(
        detector, dataset.name(ctx.cfg.eval.split), ctx.cfg.eval, ctx.workdir / "evaluate", reporter=ctx.reporter
    )
    return StepOutput(files={"metrics": ctx.workdir / "evaluate" / "metrics.json"}, values=result.to_dict())


def _eval_images(ctx: StepContext, root: Path) -> Path:
    """The folder of the eval split's images; a val split carved from train is linked into the workdir."""
    # lazy: torch and detectron2, only in the steps that use them (the controller imports STEPS)
    from d2ops.data.registration import carved_val_images

    data = ctx.cfg.data
    if ctx.cfg.eval.split != "val" or data.val_fraction is None:
        return root / data.splits[ctx.cfg.eval.split]
    train, folder = root / data.splits["train"], ctx.workdir / "val_images"
    shutil.rmtree(folder, ignore_errors=True)
    for name in carved_val_images(root, data):
        link = folder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to((train / name).resolve())
    return folder


def run_infer(ctx: StepContext) -> StepOutput:
    """Batch inference over inference.source (a folder or S3 prefix), default the eval split."""
    # lazy: torch and detectron2, only in the steps that use them (the controller imports STEPS)
    from d2ops.evaluation.inference import infer_folder

    detector, dataset, root = _detector(ctx)
    source = ctx.cfg.inference.source
    folder = fetch(source, ctx.workdir / "infer_source") if source else _eval_images(ctx, root)
    result = infer_folder(
        inference_detector(ctx, detector, dataset.class_names, folder),
        folder,
        ctx.workdir / "infer",
        score_threshold=ctx.cfg.inference.score_threshold,
        debug_images=ctx.cfg.inference.debug_images,
        reporter=ctx.reporter,
    )
    return StepOutput(
        files={"predictions": Path(result.predictions_json), "coco_results": Path(result.coco_results_json)},
        values=result.to_dict(),
    )


#: ``inference.runtime: auto`` exports to these (where installed) and keeps the fastest measured.
AUTO_EXPORTS = ("onnx", "openvino")


def inference_detector(ctx: StepContext, eager: Any, labels: list[str], folder: Path) -> Any:
    """The detector batch inference runs: ``eager`` for ``inference.runtime: pytorch``, else the trained model
    exported in the step's work folder through the same parity gate as ``d2ops export``, checked (and timed
    beside PyTorch) on the source's first images.

    ``auto`` (on the CPU) exports to ONNX Runtime and OpenVINO where installed, the runtimes that optimise the
    graph (TorchScript runs eager PyTorch's kernels: 0.99-1.02x in bench/RESULTS.md, not worth its export),
    and predicts with the fastest measured, eager PyTorch included; a runtime whose export fails the gate is
    skipped with a warning. A runtime asked for by name fails the step instead, so a run never predicts with a
    graph that gives other answers.
    """
    # lazy: torch and detectron2, only in the steps that use them (the controller imports STEPS)
    from d2ops.model.detector import Detector
    from d2ops.model.export import ExportError, export_bundle
    from d2ops.model.runtimes import available_runtimes, installed_runtimes

    requested, device = ctx.cfg.inference.runtime, eager.cfg.MODEL.DEVICE
    if requested == "pytorch":
        return eager
    candidates = [rt for rt in installed_runtimes() if rt in AUTO_EXPORTS] if requested == "auto" else [requested]
    if requested == "auto" and (device != "cpu" or not candidates):
        return eager  # the exported graphs run on the CPU only
    models = ctx.workdir / "infer_model"
    shutil.rmtree(models, ignore_errors=True)
    bundle = build_bundle(
        models / "pytorch",
        weights=ctx.input_path("weights"),
        d2_config=ctx.input_path("d2_config"),
        labels=labels,
        metrics={},
        metadata={"experiment": ctx.cfg.name, "purpose": "batch inference"},
    )
    try:
        images = _parity_images(folder, "the inference source")
    except ExportError as err:
        return _export_failed(requested, " or ".join(candidates), err, eager)
    for runtime in candidates:  # each export adds its graph to the bundle before it
        try:
            exported = export_bundle(bundle, runtime, models / runtime, images=images).path
        except ExportError as err:
            _export_failed(requested, runtime, err, eager)
            continue
        if bundle.name != "pytorch":
            shutil.rmtree(bundle)  # the new bundle holds the earlier graphs too
        bundle = exported
    final = ModelBundle(bundle)
    chosen = available_runtimes(final, device)[0] if requested == "auto" else requested
    speeds = {rt: entry.get("speed") for rt, entry in final.runtimes().items()}
    log.info("batch inference on %s (measured beside PyTorch: %s)", chosen, speeds)
    if chosen == "pytorch":
        return eager
    return Detector.from_bundle(bundle, device=device, runtime=chosen, threads=eager.threads)


def _parity_images(folder: Path, option: str) -> list[Any]:
    """The first :data:`~d2ops.model.export.MAX_PARITY_IMAGES` images under ``folder`` (nested ones included, as
    batch inference reads them), decoded for an export's parity check; an unreadable one names ``option``."""
    # lazy: torch and detectron2, only in the steps that use them (the controller imports STEPS)
    from d2ops.evaluation.inference import list_images
    from d2ops.model.export import MAX_PARITY_IMAGES, read_image_files

    return read_image_files(list_images(folder)[:MAX_PARITY_IMAGES], option)


def _export_failed(requested: str, runtime: str, err: Exception, eager: Any) -> Any:
    """``auto``: warn and go on (``eager`` is the fallback); a runtime named: fail the step, saying what to set."""
    from d2ops.model.export import ExportError  # lazy: torch and detectron2, as in inference_detector

    if requested != "auto":
        raise ExportError(
            f"inference.runtime {runtime}: {err}. Set inference.runtime: pytorch (or auto, which skips a runtime "
            "that fails), or point inference.source at images the model finds objects in"
        ) from err
    log.warning("inference.runtime auto: %s; not predicting with %s", err, runtime)
    return eager


def run_register(ctx: StepContext) -> StepOutput:
    """Bundle the model, gate it against the production model (champion/challenger) and register it.

    The candidate is published and tagged ``registry.champion.tag`` only if it passes the absolute
    ``quality_gate`` (a floor) and beats the current champion on ``registry.champion.metric`` by
    ``min_improvement``; with no champion the floor alone decides (:func:`d2ops.registry.gate.gate_decision`).
    When there is a champion, both models are evaluated here (:func:`_score_beside_champion`).
    Where the champion lives (ClearML registry or ``registry.local_dir``) is the store's business.
    """
    reg = ctx.cfg.registry
    metrics = json.loads(ctx.input_path("metrics").read_text())
    manifest = json.loads(ctx.input_path("dataset_manifest").read_text())
    labels = json.loads(ctx.input_path("labels").read_text())
    gate_metric_value(reg, metrics)  # a misspelt metric fails before any evaluation
    store = ctx.runtime.champion_store(ctx.cfg)
    champion = store.current() if reg.champion.enabled else None
    scored, rescored_champion = (metrics, None) if champion is None else _score_beside_champion(ctx, champion, labels)
    decision = gate_decision(reg, scored, rescored_champion)
    record = gate_record(decision, rescored=champion is not None)
    lineage = _lineage(ctx, manifest)
    exports = reg.export if decision.promote else []
    if reg.export and not decision.promote:
        log.info("registry.export %s: skipped, the candidate is not promoted", ", ".join(reg.export))
    registered = ctx.workdir / "bundle" / reg.model_name  # the bundle registered, with its exports if any
    bundle = build_bundle(
        ctx.workdir / "exported" / "pytorch" / reg.model_name if exports else registered,
        weights=ctx.input_path("weights"),
        d2_config=ctx.input_path("d2_config"),
        labels=labels,
        metrics=metrics,
        metadata={**lineage, "quality_gate": decision.floor.to_dict(), "champion_gate": record},
    )
    if exports:
        bundle = _with_exports(ctx, bundle, exports, registered)
    archive = zip_bundle(bundle)
    registration, promotion = _register_and_promote(ctx, store, bundle, archive, labels, decision, champion)
    report_gate(ctx.reporter, decision, record)
    log.info("%s", gate_headline(decision, reg.champion.tag))
    return StepOutput(
        # The registered model is the bundle's one copy on ClearML; an artifact would be a second one.
        files={} if registration else {"model_bundle": archive},
        values={
            "bundle": str(bundle),
            "gate": decision.floor.to_dict(),
            "champion_gate": record,
            "promotion": promotion.to_dict() if promotion else None,
            "lineage": {**lineage, "code_version": ModelBundle(bundle).metadata()["code_version"]},
            "registration": registration,
        },
    )


def _with_exports(ctx: StepContext, bundle: Path, runtimes: Sequence[str], out: Path) -> Path:
    """``bundle`` exported to each of ``runtimes`` in turn (the last export written to ``out``), each checked
    against PyTorch on the eval split's images. A failed export fails the step: the registry never holds a graph
    that gives other answers, and a promoted model is not registered without the runtimes asked for."""
    # lazy: torch and detectron2, only in the steps that use them (the controller imports STEPS)
    from d2ops.model.export import ExportError, export_bundle

    images = _parity_images(_eval_images(ctx, dataset_dir(ctx)), f"eval.split {ctx.cfg.eval.split}")
    for i, runtime in enumerate(runtimes):
        target = out if i == len(runtimes) - 1 else ctx.workdir / "exported" / runtime / out.name
        shutil.rmtree(target, ignore_errors=True)  # this step's own export from an earlier run in its workdir
        try:
            result = export_bundle(bundle, runtime, target, images=images)
        except ExportError as err:
            raise ExportError(
                f"registry.export {runtime}: {err}. Remove {runtime} from registry.export to register the model "
                "without it"
            ) from err
        log.info("registry.export %s: parity %s, speed %s", runtime, result.summary(), result.speed())
        bundle = result.path
    return bundle


def _score_beside_champion(
    ctx: StepContext, champion: Champion, labels: list[str]
) -> tuple[dict[str, Any], ScoredChampion]:
    """The candidate's and the champion's metrics on the configured eval split, by the same code on the same device.

    The candidate is re-scored rather than taken from the evaluate step, so the two numbers compared can only
    differ by the models (the evaluate step may have run on another machine or device). A champion whose labels
    differ from the dataset's is not scored (``not_comparable`` says why).
    """
    # lazy: torch and detectron2, only in the steps that use them (the controller imports STEPS)
    from d2ops.data.registration import register_splits
    from d2ops.evaluation.metrics import evaluate_model

    root, _ = _validated_dataset(ctx)
    dataset = register_splits(root, ctx.cfg.data)
    split, device, out = dataset.name(ctx.cfg.eval.split), ctx.cfg.runtime.device, ctx.workdir / "register"
    candidate = (ctx.input_path("d2_config"), ctx.input_path("weights"), labels)
    scored = evaluate_model(*candidate, split, ctx.cfg.eval, out / "candidate", device)
    champion_bundle = ModelBundle(champion.bundle)
    champion_labels = champion_bundle.labels()
    not_comparable = labels_mismatch(champion_labels, dataset.class_names)
    if not_comparable:
        return scored, ScoredChampion(champion.id, not_comparable=not_comparable)
    champ = (champion_bundle.config_file, champion_bundle.weights, champion_labels)
    return scored, ScoredChampion(champion.id, evaluate_model(*champ, split, ctx.cfg.eval, out / "champion", device))


def _lineage(ctx: StepContext, manifest: dict[str, Any]) -> dict[str, Any]:
    """Where the model came from, recorded with the bundle: the dataset (``manifest``, the download step's),
    the step task and pipeline run, the run it resumed, the config."""
    return {
        "dataset_source": ctx.cfg.data.source,
        "dataset_identity": manifest.get("identity"),
        "dataset_clearml_id": manifest.get("clearml_dataset_id") or manifest.get("dataset_id"),
        "class_notes": manifest.get("class_notes", []),
        **ctx.runtime.lineage(),
        "resumed_from": _resumed_from(ctx),
        "config_hash": config_hash(ctx.cfg),
        "experiment": ctx.cfg.name,
    }


def _register_and_promote(
    ctx: StepContext,
    store: ChampionStore,
    bundle: Path,
    archive: Path,
    labels: list[str],
    decision: GateDecision,
    champion: Champion | None,
) -> tuple[dict[str, Any], Promotion | None]:
    """Register the bundle where the runtime keeps models (published when the gate passed it), then make it
    the champion when it won (:func:`d2ops.registry.gate.promotes`), retiring ``champion``.
    Returns the registration (empty without a model registry) and the promotion (None when not promoted)."""
    reg = ctx.cfg.registry
    promoting = promotes(decision, reg.champion)
    registration: dict[str, Any] = {}
    if ctx.runtime.registers_models:
        model = ModelBundle(bundle)
        registration = ctx.runtime.register_model(
            archive,
            name=reg.model_name,
            tags=registration_tags(reg, promoting, store.tag_on_register),
            labels=labels,
            metadata=model.metadata(),
            publish=decision.promote,
            config=yaml.safe_load(model.config_file.read_text()),
            headline=gate_headline(decision, reg.champion.tag),
        )
    if not promoting:
        return registration, None
    return registration, store.promote(bundle, registration=registration, decision=decision, previous=champion)


def _resumed_from(ctx: StepContext) -> dict[str, Any] | None:
    """The other run this training continued (``runtime.resume_from``), from its run record; None if its own."""
    if not ctx.inputs.get("train_run"):
        return None
    record: dict[str, Any] = json.loads(ctx.input_path("train_run").read_text())
    return record.get("resumed_from")


STEP_FUNCTIONS: dict[str, Callable[[StepContext], StepOutput]] = {
    "download": run_download,
    "train": run_train,
    "evaluate": run_evaluate,
    "infer": run_infer,
    "register": run_register,
}
