"""Checkpoints that survive pre-emption: atomic writes, a run record, a mirror on ``output_uri``.

A train step can be killed at any moment (a pre-empted spot instance, an agent restart, a
retried pipeline step). This module makes its rerun resume exactly where the killed run left
off, and refuse a checkpoint that is not its own.

**When a run resumes (the one rule).** A run resumes only its own checkpoints, and a run is
its *run key*:

- inside a ClearML pipeline, the pipeline run (a retried step is the same run and resumes, on
  any machine; a new pipeline run is a new run);
- a clone of a ClearML step task (a UI clone keeps the original's pipeline controller as its
  parent): the clone's own task id, so the clone is a new run, whatever its edits;
- outside one, :func:`standalone_run_key`: a hash of the training identity, ``solver.max_iter``,
  ``runtime.output_dir`` (as configured, so the same config on another machine is the same run)
  and ``runtime.resume_from``. Rerunning the same command resumes it (or reuses its finished
  training); a run with another ``max_iter`` or ``output_dir`` is another run and trains from
  iteration 0, whatever other runs left on ``output_uri``.

Checkpoints are looked for only under the run's own key (``<output_uri>/.../checkpoints/<run
key>/`` and the local folder, whose run record must name the same key, training identity and
``resume_from``); a local folder of another run key is moved aside, and a record with this key
but another training is refused (:class:`CheckpointConflict`). Continuing *another* run's
checkpoints (say, training a finished run further with a higher ``max_iter``) happens only when
``runtime.resume_from`` names it (:func:`explicit_resume_point`): it must be the same training
identity, it is logged at WARNING, and it is recorded as ``resumed_from`` (run key, checkpoint,
iteration) in the run record (kept by retries) and in the train result, for the bundle's lineage.

The pieces:

- :class:`AtomicCheckpointer` (detectron2's checkpointer) writes each checkpoint to a temp file,
  fsyncs it and renames it into place, then the run record, then the ``last_checkpoint``
  pointer (also renamed into place): a kill leaves the old state or the new one, never a
  pointer to a torn file.
- :class:`RunRecord` (``d2ops_run.json`` beside the checkpoints) says which training wrote
  them: the run key, the training identity (config + data), ``max_iter`` and every checkpoint
  it saved with its iteration. A checkpoint not listed in a matching record is never resumed.
- :class:`CheckpointSync` mirrors the newest checkpoint, then the record, then the pointer to
  ``output_uri`` (S3 or a folder); :func:`restore_checkpoints` brings them back on a fresh machine.
- :func:`find_resume_point` decides where training continues, and whether a finished training
  of this very run can be reused, before any GPU time is spent; :func:`explicit_resume_point`
  finds the checkpoint ``runtime.resume_from`` names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import HookBase
from detectron2.utils import comm

from d2ops.config import ExperimentConfig, config_hash
from d2ops.storage import s3 as storage
from d2ops.utils.files import atomic_write, temp_beside

__all__ = [
    "FINAL",
    "POINTER",
    "RUN_RECORD",
    "AtomicCheckpointer",
    "CheckpointConflict",
    "CheckpointOnStop",
    "CheckpointSync",
    "ResumePoint",
    "RunRecord",
    "explicit_resume_point",
    "find_resume_point",
    "model_weights",
    "new_run_record",
    "prepare_output_dir",
    "restore_checkpoints",
    "standalone_run_key",
    "training_identity",
]

log = logging.getLogger(__name__)

RUN_RECORD = "d2ops_run.json"
POINTER = "last_checkpoint"
FINAL = "model_final.pth"
_TMP_SUFFIX = ".tmp"
_RESTORE_DIR = ".d2ops-restore"
_RESUME_FROM_DIR = ".d2ops-resume-from"

# Solver keys that change how a run is operated, not what it learns: not part of the training
# identity. (max_iter is part of the run key outside a pipeline: see standalone_run_key.)
_OPERATIONAL_SOLVER_KEYS = ("max_iter", "checkpoint_period", "eval_period", "num_workers")


class CheckpointConflict(ValueError):
    """Checkpoints exist where this run would resume, but they are not this run's to use.

    A ``ValueError``, so the step scripts report it as one clear message (exit code 2).
    """


def training_identity(cfg: ExperimentConfig, dataset_identity: str) -> str:
    """A short hash of everything that decides what a training run learns.

    The model, the data (its identity from the download manifest, and how it is read) and the
    optimisation settings; not the operational ones (``solver.max_iter``, periods, workers),
    where it runs, or where it writes. Two runs of one training (say a 20-iteration probe and
    a long run) share it; which run is which is the run key (:func:`standalone_run_key`).
    """
    data = cfg.data.model_dump(mode="json", exclude={"source", "cache_dir"})
    solver = cfg.solver.model_dump(mode="json", exclude=set(_OPERATIONAL_SOLVER_KEYS))
    blob = {"data": data, "dataset": dataset_identity, "model": cfg.model.model_dump(mode="json"), "solver": solver}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def standalone_run_key(cfg: ExperimentConfig, identity: str, resume_from: str = "") -> str:
    """The run key of a run outside a ClearML pipeline: which checkpoints are this run's own.

    A hash of the training identity, ``solver.max_iter``, ``runtime.output_dir`` as configured
    (not resolved: the same config on another machine is the same run) and ``resume_from``.
    """
    blob = {
        "identity": identity,
        "max_iter": cfg.solver.max_iter,
        "output_dir": os.path.normpath(cfg.runtime.output_dir),
        "resume_from": resume_from,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class RunRecord:
    """Which training wrote the checkpoints of a folder, and which checkpoints it wrote.

    ``run_key`` scopes the checkpoint location (the ClearML pipeline run, else
    :func:`standalone_run_key`); ``identity`` is :func:`training_identity`; ``checkpoints`` maps
    file name -> the iteration it holds (detectron2 stores the iteration that just finished;
    training resumes at +1). ``resume_from`` is ``runtime.resume_from`` as configured (empty:
    none), and ``resumed_from`` where that led: ``{"run_key", "checkpoint", "iteration"}`` of the
    other run's checkpoint this training continued (None when it started from iteration 0).
    """

    run_key: str
    identity: str
    max_iter: int
    dataset_identity: str = ""
    config_hash: str = ""
    checkpoints: dict[str, int] = field(default_factory=dict)
    resume_from: str = ""
    resumed_from: dict[str, Any] | None = None

    def same_run(self, other: RunRecord) -> bool:
        return (self.run_key, self.identity, self.resume_from) == (other.run_key, other.identity, other.resume_from)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def read(cls, folder: Path) -> RunRecord | None:
        """The record in ``folder``, or None when there is none; an unreadable one is an error."""
        path = folder / RUN_RECORD
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            return cls(**{**raw, "checkpoints": {str(k): int(v) for k, v in raw.get("checkpoints", {}).items()}})
        except (ValueError, TypeError) as err:
            raise CheckpointConflict(
                f"{path} is not a d2ops run record ({err}); remove the folder's checkpoints or set "
                "runtime.resume=false to train from scratch"
            ) from None


def new_run_record(
    cfg: ExperimentConfig, dataset_identity: str, run_key: str | None = None, *, resume_from: str | None = None
) -> RunRecord:
    """The record of a run about to start.

    ``run_key`` is the ClearML pipeline run inside one; without it, :func:`standalone_run_key`.
    ``resume_from`` defaults to ``cfg.runtime.resume_from`` (where the config has that key).
    """
    identity = training_identity(cfg, dataset_identity)
    origin = resume_from if resume_from is not None else getattr(cfg.runtime, "resume_from", None)
    origin = (origin or "").strip()
    return RunRecord(
        run_key=run_key or standalone_run_key(cfg, identity, origin),
        identity=identity,
        max_iter=cfg.solver.max_iter,
        dataset_identity=dataset_identity,
        config_hash=config_hash(cfg),
        resume_from=origin,
    )


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a kill leaves the old content or the new, never half."""
    with atomic_write(path, "w", temp=temp_beside(path, _TMP_SUFFIX)) as fh:
        fh.write(text)


def model_weights(checkpoint: Path, dest: Path) -> Path:
    """Write the model's weights alone from a training checkpoint to ``dest`` (atomically); returns ``dest``.

    A checkpoint also holds the optimizer's momentum and the scheduler (``trainer``): about as large
    again as the model, needed to resume and never to predict. The weights that leave training (the
    train step's artifact, the bundle, the registered model) are the model and its iteration only, which
    detectron2's ``DetectionCheckpointer`` loads as it loads the model zoo's files.
    """
    data = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError(f"{checkpoint} is not a detectron2 checkpoint (no 'model' in it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _torch_save_atomically({"model": data["model"], "iteration": data.get("iteration")}, dest)
    return dest


def _torch_save_atomically(data: dict[str, Any], path: Path) -> None:
    """``torch.save`` through a fsynced temp file renamed into place: a kill leaves the old file or the new."""
    with atomic_write(path, "wb", temp=temp_beside(path, _TMP_SUFFIX)) as fh:
        torch.save(data, fh)


class AtomicCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer with crash-safe writes and the run record kept up to date.

    ``save`` writes ``<name>.pth`` through a fsynced temp file renamed into place, then the run
    record listing it, then the ``last_checkpoint`` pointer, so the pointer only ever names a
    complete file of this run. Only the main process writes (as detectron2's own checkpointer).
    """

    def __init__(self, model: Any, save_dir: str, *, record: RunRecord | None = None, **checkpointables: Any) -> None:
        super().__init__(model, save_dir, **checkpointables)
        self.record = record

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data: dict[str, Any] = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = Path(self.save_dir) / basename
        self.logger.info("Saving checkpoint to %s", path)
        _torch_save_atomically(data, path)
        if self.record is not None:
            self.record.checkpoints[basename] = int(
                kwargs.get("iteration", data.get("trainer", {}).get("iteration", -1))
            )
            write_text_atomic(Path(self.save_dir) / RUN_RECORD, self.record.to_json())
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        write_text_atomic(Path(self.save_dir) / POINTER, last_filename_basename)


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues: the checkpoint file and the iteration it holds."""

    path: Path
    iteration: int
    reusable: bool  # this run's own finished training: nothing left to train
    run_key: str = ""  # the run that wrote it (set for another run's checkpoint, runtime.resume_from)
    source: str = ""  # where it was found: ``<folder or S3 prefix>/<file>``

    @property
    def start_iter(self) -> int:
        return self.iteration + 1


def _newest_recorded(folder: Path, record: RunRecord) -> str | None:
    present = [(it, name == FINAL, name) for name, it in record.checkpoints.items() if (folder / name).is_file()]
    return max(present)[2] if present else None


def _mismatch_message(folder: Path | str, found: RunRecord, expected: RunRecord) -> str:
    if (found.run_key, found.identity) == (expected.run_key, expected.identity):
        return (
            f"the checkpoints in {folder} are this run's, but they started from "
            f"runtime.resume_from={found.resume_from!r} and this run says {expected.resume_from!r}; they "
            "are not resumed. Set runtime.resume=false to start this run again, or use a fresh "
            "runtime.output_dir."
        )
    return (
        f"the checkpoints in {folder} belong to another training (run key {found.run_key}, identity "
        f"{found.identity}; this run: run key {expected.run_key}, identity {expected.identity}); "
        "they are not resumed. Use a fresh runtime.output_dir / clearml.output_uri, or set "
        "runtime.resume=false to train from scratch and overwrite them."
    )


def _past_max_iter_message(checkpoint: Path | str, iteration: int, max_iter: int, why: str) -> str:
    return (
        f"checkpoint {checkpoint} has already trained {iteration + 1} iterations, and solver.max_iter is "
        f"{max_iter}: there is nothing left to train, and {why}. Raise solver.max_iter above {iteration} to "
        "train on from it, or use a fresh runtime.output_dir / clearml.output_uri (or runtime.resume=false) "
        "to train anew."
    )


def find_resume_point(folder: Path, expected: RunRecord) -> ResumePoint | None:
    """The checkpoint of this run to continue from in ``folder``, if any.

    Raises :class:`CheckpointConflict` when the folder's checkpoints are another training's, or
    when this run's checkpoint is already at or past ``max_iter`` without being its own finished
    training at this ``max_iter`` (which is reused: ``reusable=True``).
    """
    record = RunRecord.read(folder)
    pointer = folder / POINTER
    if record is None:
        if pointer.is_file():
            raise CheckpointConflict(
                f"{folder} has a checkpoint ({pointer.read_text().strip()}) but no run record ({RUN_RECORD}), "
                "so nothing says which training wrote it; it is not resumed. Use a fresh runtime.output_dir, "
                "or set runtime.resume=false to train from scratch and overwrite it."
            )
        return None
    if not record.same_run(expected):
        raise CheckpointConflict(_mismatch_message(folder, record, expected))
    name = pointer.read_text().strip() if pointer.is_file() else ""
    if name not in record.checkpoints or not (folder / name).is_file():
        fallback = _newest_recorded(folder, record)
        if fallback is None:
            return None
        log.warning("%s names %r, not a checkpoint of this run; resuming from %s", pointer, name, fallback)
        name = fallback
    point = ResumePoint(folder / name, record.checkpoints[name], False)
    if point.start_iter < expected.max_iter:
        return point
    if name == FINAL and point.start_iter == expected.max_iter and record.max_iter == expected.max_iter:
        return ResumePoint(point.path, point.iteration, True)
    raise CheckpointConflict(
        _past_max_iter_message(
            point.path,
            point.iteration,
            expected.max_iter,
            f"it is not this run's finished training (that run had max_iter {record.max_iter})",
        )
    )


def _locate(spec: str, checkpoint_uri: str | None) -> tuple[str, str | None]:
    """The folder (S3 prefix or local path) and checkpoint file (or None: its newest) ``spec`` names."""
    spec = spec.strip().removeprefix("file://").rstrip("/")
    if not storage.is_s3_uri(spec) and "/" not in spec and not spec.endswith(".pth"):
        if not checkpoint_uri:
            raise CheckpointConflict(
                f"runtime.resume_from={spec!r} is a run key, but this run has no checkpoint location to find "
                "it beside (clearml.output_uri, or the agent's default output URI). Give the checkpoint "
                "folder, S3 prefix or .pth file instead."
            )
        return f"{checkpoint_uri.rstrip('/').rsplit('/', 1)[0]}/{spec}", None
    if spec.endswith(".pth"):
        folder, _, name = spec.rpartition("/")
        return folder or ".", name
    return spec, None


def _source_file(folder: str, name: str, staging: Path) -> Path | None:
    """``<folder>/<name>``: fetched into ``staging`` from S3, used in place when local; None if absent."""
    if storage.is_s3_uri(folder):
        return _fetch(folder, name, staging)
    path = Path(folder) / name
    return path if path.is_file() else None


def explicit_resume_point(
    spec: str,
    expected: RunRecord,
    *,
    checkpoint_uri: str | None,
    local_dir: Path,
    moved: tuple[Path, Path] | None = None,
) -> ResumePoint:
    """The other run's checkpoint that ``runtime.resume_from`` (``spec``) names for the run in ``local_dir``.

    ``spec`` is a run key (looked for beside ``checkpoint_uri``, i.e. under the same
    ``<output_uri>/<project>/<name>/checkpoints/``), a checkpoint folder or S3 prefix (its newest
    checkpoint), or a ``.pth`` file in one. It must be a d2ops run of the same training identity
    (its run record says so), and not already at ``max_iter``; otherwise :class:`CheckpointConflict`.
    The optimizer, scheduler and iteration are continued; to start from another training's
    weights alone, use ``model.weights``. ``moved`` is ``(folder, where it went)`` when
    :func:`prepare_output_dir` just set the named local folder aside. Local checkpoints are read
    in place; those on S3 are fetched into a folder of ``local_dir``.
    """
    staging = local_dir / _RESUME_FROM_DIR
    folder, name = _locate(spec, checkpoint_uri)
    if moved is not None and not storage.is_s3_uri(folder) and Path(folder).resolve() == moved[0].resolve():
        folder = str(moved[1])
    where = f"runtime.resume_from={spec!r} ({folder})"
    record_file = _source_file(folder, RUN_RECORD, staging)
    if record_file is None:
        raise CheckpointConflict(
            f"{where} has no d2ops run record ({RUN_RECORD}): only checkpoints a d2ops run wrote can be "
            "continued (a run writes them to <runtime.output_dir>/train and <output_uri>/<project>/<name>/"
            "checkpoints/<run key>). To start from a model's weights alone, set model.weights instead."
        )
    record = RunRecord.read(record_file.parent)
    assert record is not None
    if record.run_key == expected.run_key:
        raise CheckpointConflict(
            f"{where} names this run's own checkpoints (run key {record.run_key}); they are resumed without "
            "runtime.resume_from. Remove it."
        )
    if record.identity != expected.identity:
        raise CheckpointConflict(
            f"{where} holds another training (identity {record.identity}; this run: {expected.identity}: the "
            "model, data or optimisation settings differ). runtime.resume_from continues the same training "
            "only; to start from its weights with a fresh optimizer and schedule, set model.weights to its "
            "checkpoint."
        )
    if name is None:
        pointer = _source_file(folder, POINTER, staging)
        name = pointer.read_text().strip() if pointer else ""
        if name not in record.checkpoints and record.checkpoints:
            name = max(record.checkpoints.items(), key=lambda kv: (kv[1], kv[0] == FINAL))[0]
    if name not in record.checkpoints:
        raise CheckpointConflict(f"{where}: {name or 'no checkpoint'} is not listed in its run record")
    iteration = record.checkpoints[name]
    source = f"{folder}/{name}"
    if iteration + 1 >= expected.max_iter:
        raise CheckpointConflict(
            _past_max_iter_message(source, iteration, expected.max_iter, "runtime.resume_from names it")
        )
    path = _source_file(folder, name, staging)
    if path is None:
        raise CheckpointConflict(f"{where}: {source} is listed in its run record but missing")
    return ResumePoint(path, iteration, False, run_key=record.run_key, source=source)


def _remove_torn_files(folder: Path) -> None:
    for tmp in folder.glob(f".*{_TMP_SUFFIX}"):
        log.info("removing %s, left by an interrupted write", tmp)
        tmp.unlink(missing_ok=True)


def prepare_output_dir(folder: Path, *, resume: bool, expected: RunRecord | None = None) -> Path | None:
    """Create ``folder`` and drop leftovers of a killed write; without resume, forget old checkpoints.

    A local folder left by another run (another run key: an earlier pipeline run in the same
    checkout or agent folder) is moved aside to ``<folder>.run-<its key>``, kept, and this run
    starts in an empty folder. (Checkpoints of the same run key but another training identity
    still stop the step, in :func:`find_resume_point`.)
    ``resume=False`` removes the pointer and run record (not the checkpoint files), so a rerun
    of this fresh run never resumes from the checkpoints it was told to ignore.
    Returns where the other run's folder went, or None.
    """
    found = RunRecord.read(folder) if expected is not None and folder.is_dir() else None
    if found is not None and expected is not None and found.run_key != expected.run_key:
        aside = folder.with_name(f"{folder.name}.run-{found.run_key[:24]}")
        if aside.exists():
            shutil.rmtree(aside)
        folder.rename(aside)
        log.warning(
            "%s held run %s's checkpoints; moved to %s, and this run (%s) does not resume them",
            folder,
            found.run_key,
            aside,
            expected.run_key,
        )
    else:
        aside = None
    folder.mkdir(parents=True, exist_ok=True)
    _remove_torn_files(folder)
    if not resume:
        for name in (POINTER, RUN_RECORD):
            (folder / name).unlink(missing_ok=True)
    return aside


def _fetch(uri: str, name: str, staging: Path) -> Path | None:
    """``<uri>/<name>`` (S3 or a folder) as a local file in ``staging``, or None when it is not there."""
    if storage.is_s3_uri(uri):
        try:
            storage.download(f"{uri}/{name}", staging, progress=False)
        except storage.StorageError as err:
            if "no objects under" not in str(err):
                raise
            return None
    else:
        src = Path(uri) / name
        if not src.is_file():
            return None
        staging.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, staging / name)
    return staging / name if (staging / name).is_file() else None


def _local_iteration(folder: Path, expected: RunRecord) -> int:
    try:
        point = find_resume_point(folder, expected)
    except CheckpointConflict:
        return -1
    return point.iteration if point else -1


def restore_checkpoints(uri: str, local_dir: Path, expected: RunRecord) -> bool:
    """Bring this run's newest checkpoint under ``uri`` into ``local_dir`` (if newer than the local one).

    Reads the small run record first and raises :class:`CheckpointConflict` for another
    training's checkpoints before any large file is fetched; then fetches only the checkpoint
    the pointer names, and installs it, the record and the pointer in that order.
    Returns whether a checkpoint was restored.
    """
    uri = uri.rstrip("/")
    staging = local_dir / _RESTORE_DIR
    record_file = _fetch(uri, RUN_RECORD, staging)
    if record_file is None:
        return False
    record = RunRecord.read(staging)
    assert record is not None
    if not record.same_run(expected):
        raise CheckpointConflict(_mismatch_message(uri, record, expected))
    pointer = _fetch(uri, POINTER, staging)
    name = pointer.read_text().strip() if pointer else ""
    if name not in record.checkpoints:
        candidates = sorted(record.checkpoints.items(), key=lambda kv: (kv[1], kv[0] == FINAL))
        name = candidates[-1][0] if candidates else ""
    if not name or record.checkpoints[name] <= _local_iteration(local_dir, expected):
        return False
    checkpoint = _fetch(uri, name, staging)
    if checkpoint is None:
        raise CheckpointConflict(
            f"{uri}/{POINTER} names {name}, which is missing there; restore it or use a fresh clearml.output_uri"
        )
    os.replace(checkpoint, local_dir / name)
    os.replace(record_file, local_dir / RUN_RECORD)
    write_text_atomic(local_dir / POINTER, name)
    log.info("restored %s (iteration %d) from %s", name, record.checkpoints[name], uri)
    return True


class CheckpointOnStop(HookBase):
    """Stops training at an iteration boundary when told to from outside, saving a checkpoint there.

    SIGTERM (an agent's abort, a pre-empted worker) becomes :class:`d2ops.pipeline.runner.StepStopped` in the
    step runner's handler. While detectron2's loop runs, this hook defers it to the start of the next
    iteration: raised in the middle of one (inside the optimizer's parameter loop, or after the LR
    scheduler hook stepped but before the iteration counter moved), the saved weights, optimizer and
    scheduler would disagree about how far training got, and the rerun would step the scheduler past
    its end. A second SIGTERM stops at once. A stop that arrives during the last iteration is raised
    by :meth:`raise_pending` once ``train()`` has returned (its final checkpoint is already saved).

    Training that ends on an exception marked ``checkpoint_on_stop = True`` saves the state as of the
    last completed iteration before the exception leaves detectron2's loop (``after_train`` runs in its
    ``finally``). It is listed in the run record like any checkpoint, and :class:`CheckpointSync`,
    after it, mirrors it. Errors (a diverged loss, a bug) save nothing: their state is not worth resuming.
    """

    def __init__(self) -> None:
        self._pending: Callable[[], Any] | None = None
        self._previous: Any = None

    def before_train(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):
            return  # no handler that stops the step (the default one ends the process by itself)

        def defer(signum: int, frame: Any) -> None:
            if self._pending is not None:
                previous(signum, frame)  # told twice: stop now
            self._pending = partial(previous, signum, frame)
            log.warning("SIGTERM: training stops after iteration %d (send it again to stop at once)", self.trainer.iter)

        self._previous = previous
        signal.signal(signal.SIGTERM, defer)

    def before_step(self) -> None:
        self.raise_pending()

    def raise_pending(self) -> None:
        """Raise the deferred stop (the step runner's handler raises it), if one came."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending()

    def after_train(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        stopped = sys.exc_info()[1]
        if stopped is None or not getattr(stopped, "checkpoint_on_stop", False) or not comm.is_main_process():
            return
        # Raised in before_step of iteration `iter`: the last completed one is iter - 1.
        iteration = self.trainer.iter - 1
        if iteration < self.trainer.start_iter:
            return
        self.trainer.iter = iteration  # the trainer's own state_dict records it; the rerun starts at + 1
        self.trainer.checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
        log.warning("training stopped (%s): saved a checkpoint at iteration %d to resume from", stopped, iteration)


class CheckpointSync(HookBase):
    """Mirrors each new checkpoint to ``uri`` (S3 or a folder), in a crash-safe order.

    The checkpoint file goes first, then the run record, then the ``last_checkpoint`` pointer,
    so a reader never sees a pointer to a file that is not there yet. Main process only.
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
        if not comm.is_main_process():
            return
        out = Path(self.trainer.cfg.OUTPUT_DIR)
        pointer = out / POINTER
        if not pointer.is_file():
            return
        for path in (out / pointer.read_text().strip(), out / RUN_RECORD, pointer):
            if path.is_file():
                self._upload(path)

    def _upload(self, path: Path) -> None:
        if storage.is_s3_uri(self.uri):
            storage.upload(path, f"{self.uri}/", progress=False)
            return
        Path(self.uri).mkdir(parents=True, exist_ok=True)
        tmp = Path(self.uri) / f".{path.name}.part"
        shutil.copy2(path, tmp)
        os.replace(tmp, Path(self.uri) / path.name)
