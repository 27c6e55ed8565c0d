"""A pipeline step as a ClearML task: the session, its parameters, its reporter, and how it ends.

:func:`run_step` is the body of every ``tasks/<step>.py`` script and of each step of the
offline pipeline. It opens the step's task (:func:`open_step`), in one of three modes:

- ``offline``: no server; the session is kept as ``<CLEARML_CACHE_DIR>/offline/<task id>.zip`` (ClearML
  writes a folder and zips it at close; the folder is then removed), which
  ``Task.import_offline_session`` can later replay into a server;
- ``local``: a server, the step runs in this process;
- ``remote``: the step is enqueued with ``execute_remotely`` and continues on a clearml-agent.

Where the launcher runs (the laptop, the offline runner, the pipeline's step template), the
validated experiment is written to the task as flat hyperparameters
(:mod:`d2ops.clearml.hyperparams`); the step then always runs on the values read back from
the task, so an agent, a pipeline override and a UI edit all run exactly what the task shows.

How a step ends, whatever ends it:

- it returns: artifacts are uploaded, the task completes;
- it raises: the task is marked failed with the error as its status reason;
- it runs past ``clearml.steps.<step>.time_limit_min``: :class:`~d2ops.pipeline.runner.StepTimeLimitExceeded`
  is raised in the step, the task is tagged :data:`TIME_LIMIT_TAG` (the pipeline never retries it)
  and fails; a process too stuck to raise is ended by a watchdog a few minutes later;
- it gets SIGTERM (an agent aborting it, a pre-empted worker): :class:`StepStopped` is raised in
  the step (training saves a checkpoint on the way out), and the task ends *aborted* when the
  server already says it is being stopped (a user's abort), else *failed*, so the pipeline's
  retry resumes from that checkpoint. ClearML's own exit hook would otherwise keep the process
  alive after SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from clearml import StorageManager, Task

from d2ops.clearml import datasets as clearml_datasets
from d2ops.clearml.cluster import step_docker_args
from d2ops.clearml.hyperparams import experiment_from_parameters, experiment_parameters
from d2ops.clearml.models import open_champion_store, register_model
from d2ops.clearml.secrets import scrub_recorded_diff
from d2ops.clearml.session import (
    TASK_TYPES,
    enable_offline,
    launch_multi_node,
    on_agent,
    step_lineage,
    step_run_key,
    task_output_uri,
)
from d2ops.config import ConfigError, ExperimentConfig, load_config
from d2ops.pipeline.runner import (
    PipelineRun,
    StepResult,
    StepStopped,
    StepTimeLimitExceeded,
    parse_overrides,
    raise_on_signal,
    run_in_order,
    step_time_limit,
)
from d2ops.pipeline.steps import STEP_FUNCTIONS, StepContext, StepOutput, StepRuntime
from d2ops.registry.champion import ChampionStore
from d2ops.reporting import Reporter
from d2ops.utils import jsonio
from d2ops.utils.offline_session import keep_zip_only

__all__ = [
    "STOPPED_TAG",
    "TIME_LIMIT_TAG",
    "ClearMLReporter",
    "ClearMLStepRuntime",
    "Mode",
    "StepRun",
    "open_step",
    "read_experiment",
    "record_experiment",
    "run_offline",
    "run_step",
]

log = logging.getLogger(__name__)

Mode = Literal["offline", "local", "remote"]

#: Written on a step's task when it ran past its time limit. A tag, not the status reason: the
#: agent overwrites the reason with its own exit-code message, and tags survive (see the retry callback).
TIME_LIMIT_TAG = "d2ops:time-limit"
#: Written on a step's task when SIGTERM stopped it (an abort, or a pre-empted worker).
STOPPED_TAG = "d2ops:stopped"
#: How long after its own time limit a step that could not raise is ended by the watchdog.
WATCHDOG_GRACE_S = 300.0
#: General/ parameters that are not step inputs.
_NOT_INPUTS = {"config"}


class ClearMLReporter(Reporter):
    """A :class:`Reporter` writing to a ClearML task's logger, artifacts and configuration."""

    #: Single values are also reported as scalars under this title (iteration 0): ClearML's pipeline
    #: monitor (``monitor_metrics``) and scalar comparisons read the scalar histograms, which leave
    #: single values out.
    HEADLINE_TITLE = "headline"

    def __init__(self, task: Any) -> None:
        self.task = task
        self.logger = task.get_logger()

    def scalar(self, title: str, series: str, value: float, iteration: int) -> None:
        self.logger.report_scalar(title, series, value=float(value), iteration=int(iteration))

    def single_value(self, name: str, value: float) -> None:
        self.logger.report_single_value(name, float(value))
        self.logger.report_scalar(self.HEADLINE_TITLE, name, value=float(value), iteration=0)

    def curve(
        self,
        title: str,
        series: str,
        xs: Sequence[float],
        ys: Sequence[float],
        *,
        xlabel: str = "",
        ylabel: str = "",
    ) -> None:
        points = np.column_stack([np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)])
        self.logger.report_scatter2d(
            title, series, scatter=points, iteration=0, xaxis=xlabel, yaxis=ylabel, mode="lines"
        )

    def confusion_matrix(self, title: str, matrix: np.ndarray, labels: Sequence[str]) -> None:
        self.logger.report_confusion_matrix(
            title,
            "counts",
            matrix=np.asarray(matrix),
            iteration=0,
            xaxis="predicted",
            yaxis="ground truth",
            xlabels=list(labels),
            ylabels=list(labels),
        )

    def image(self, title: str, series: str, image: np.ndarray, iteration: int = 0) -> None:
        self.logger.report_image(title, series, iteration=iteration, image=image)

    def artifact(self, name: str, obj: Path | dict[str, Any]) -> None:
        # A dict is stored as ClearML's JSON artifact: strict (NaN -> null), as every d2ops output.
        payload = str(obj) if isinstance(obj, Path) else jsonio.strict(obj)
        self.task.upload_artifact(name, artifact_object=payload, wait_on_upload=True)

    def configuration(self, name: str, text: str, description: str = "") -> None:
        self.task.set_configuration_object(name=name, config_text=text, config_type="yaml", description=description)


@dataclass
class StepRun:
    """A running step: its ClearML task, reporter, experiment and (possibly overridden) inputs."""

    name: str
    task: Any
    reporter: ClearMLReporter
    cfg: ExperimentConfig
    params: dict[str, Any]
    mode: Mode
    artifacts: dict[str, str] = field(default_factory=dict)

    #: The offline session once the step has closed: its zip (see :func:`keep_zip_only`); ``None`` with a server.
    session: str | None = None

    def publish(self, files: dict[str, Path]) -> dict[str, str]:
        """Upload output files as artifacts; returns name -> what the next step reads.

        With a server that is the artifact's URL. Offline it is the file itself, the one copy:
        ClearML's copy goes into the session's zip, where ``Task.import_offline_session`` uploads it
        from, and the session folder it was copied into is removed when the step closes.
        """
        for name, path in files.items():
            self.reporter.artifact(name, Path(path))
            offline = self.mode == "offline"
            self.artifacts[name] = str(Path(path).resolve()) if offline else str(self.task.artifacts[name].url)
        return self.artifacts


# --------------------------------------------------------------------------- the experiment on a task


def record_experiment(task: Any, cfg: ExperimentConfig, *, prefix: str = "") -> None:
    """Write the validated experiment as flat typed hyperparameters (``prefix`` ``"Args/"`` for a controller)."""
    values, types = experiment_parameters(cfg, prefix)
    task.update_parameters(values, __parameters_types=types)


def read_experiment(task: Any, *, prefix: str = "") -> ExperimentConfig:
    """The experiment a task's hyperparameters say (validated; a bad UI edit fails here, naming the key)."""
    return experiment_from_parameters(task.get_parameters(), prefix=prefix, source=f"task {task.id}")


def _check_general(task: Any, step: str, inputs: Mapping[str, Any]) -> None:
    """Every ``General/`` parameter is one the step reads (its inputs, ``config``): an unknown one fails, named."""
    general = [key for key in task.get_parameters() or {} if key.startswith("General/")]
    unknown = sorted(key for key in general if key[len("General/") :] not in inputs)
    if unknown:
        known = ", ".join(f"General/{name}" for name in inputs)
        raise ConfigError(
            f"task {task.id}: hyperparameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"{'are' if len(unknown) > 1 else 'is'} not read by the {step} step (it reads {known} and the "
            "experiment's sections): correct the name or delete it"
        )


# --------------------------------------------------------------------------- opening and ending a step


@contextmanager
def open_step(
    step: str,
    cfg: ExperimentConfig | None,
    inputs: Mapping[str, Any],
    *,
    mode: Mode,
    queue: str | None = None,
) -> Iterator[StepRun]:
    """Open a ClearML task for a step: init, record or read the experiment, optionally go remote, close.

    ``cfg`` is the experiment as launched (``None`` on an agent, where it is read from the task).
    In ``remote`` mode this process enqueues the task and exits; the same script then runs on
    the agent, where ``Task.init`` attaches to the enqueued task and the parameters are read
    back as the pipeline or the UI left them.
    """
    if mode == "offline":
        enable_offline()
    launching = cfg is not None and not on_agent()
    task: Any = Task.init(
        project_name=cfg.clearml.project if launching and cfg else None,
        task_name=step,
        task_type=TASK_TYPES.get(step, "custom"),
        tags=[cfg.name] if launching and cfg else [],
        reuse_last_task_id=False,
        auto_connect_frameworks=False,
        auto_connect_arg_parser=False,
        auto_resource_monitoring=mode != "offline",
        output_uri=cfg.clearml.output_uri if launching and cfg else None,
    )
    if Task.running_locally():
        scrub_recorded_diff(task)
        if cfg is None:
            raise ValueError(f"step {step}: no experiment to record (pass --config)")
        record_experiment(task, cfg)
    connected = dict(task.connect(dict(inputs), name="General"))
    if mode == "remote" and Task.running_locally():
        assert cfg is not None  # checked above
        queue = queue or getattr(cfg.clearml.queues, step)
        if not queue:
            raise ValueError(f"--remote needs a queue for step {step!r} (--queue or clearml.queues.{step})")
        docker_args = step_docker_args(cfg, step) or None
        task.set_base_docker(docker_image=cfg.clearml.step(step).docker_image, docker_arguments=docker_args)
        task.execute_remotely(queue_name=queue, exit_process=True)
    ending: tuple[str, str] | None = None
    run: StepRun | None = None
    try:
        experiment = read_experiment(task)
        _check_general(task, step, inputs)
        experiment_yaml = experiment.to_yaml()
        task.set_configuration_object(
            name="experiment",
            config_text=experiment_yaml,
            config_type="yaml",
            description="the validated experiment, written from the hyperparameters (edit those, not this)",
        )
        run = StepRun(step, task, ClearMLReporter(task), experiment, connected, mode)
        with _stop_on_sigterm(step), _watchdog(task, step, experiment.clearml.step(step).time_limit_min):
            yield run
    except BaseException as err:
        ending = _record_failure(task, step, err)
        raise
    finally:
        # Write every queued report before closing. Task.close waits for them only when ClearML's exit
        # hook saw no exit code, and that hook records any sys.exit in the process, caught or not, for
        # good (clearml task.py Task.__shutdown; utilities/process/exit_hooks.py ExitHooks.exit).
        task.flush(wait_for_uploads=True)
        folder = task.get_offline_mode_folder() if mode == "offline" else None
        task.close()
        if folder is not None and run is not None:
            # ClearML zipped the folder at close; the zip is the session, the folder a second copy of it
            run.session = str(keep_zip_only(folder))
        # After close: ClearML's own shutdown marks a locally run task completed when its exit hook saw no
        # exception (it has not, yet) and no signal (d2ops handled SIGTERM), which would undo the status.
        if ending is not None:
            _mark_ended(task, *ending)


def _record_failure(task: Any, step: str, err: BaseException) -> tuple[str, str]:
    """Tag the task for time limits and stops, and say how it ended: ``("stopped", reason)`` for a
    user's abort, else ``("failed", reason)``; :func:`_mark_ended` records it."""
    reason = f"{type(err).__name__}: {err}"[:250]
    log.error("step %s failed: %s", step, err)
    ending = "failed"
    try:
        if isinstance(err, StepTimeLimitExceeded):
            task.add_tags([TIME_LIMIT_TAG])
        if isinstance(err, StepStopped):
            task.add_tags([STOPPED_TAG])
            if _abort_requested(task):
                ending = "stopped"
    except Exception:  # offline sessions cannot always be edited; the error is re-raised anyway
        log.debug("could not tag task %s", getattr(task, "id", "?"), exc_info=True)
    return ending, reason


def _mark_ended(task: Any, status: str, reason: str) -> None:
    """Set the task's final status (forced: the task may already be closed or marked by ClearML)."""
    try:
        if status == "stopped":
            task.mark_stopped(force=True, status_message=reason)
        else:
            task.mark_failed(status_reason=reason, force=True)
    except Exception:  # offline sessions keep no status; the error is re-raised by the caller anyway
        log.debug("could not mark task %s %s", getattr(task, "id", "?"), status, exc_info=True)


def _abort_requested(task: Any) -> bool:
    """True when the server already says the task is being stopped (a user's abort), not pre-empted."""
    if Task.is_offline():
        return False
    task.reload()
    status = str(task.get_status())
    message = str(getattr(task.data, "status_message", "") or "")
    return status in {"stopped", "closed"} or "stopping" in message.lower()


@contextmanager
def _stop_on_sigterm(step: str) -> Iterator[None]:
    """Turn SIGTERM into :class:`StepStopped` in the step's (main) thread, for the length of the step.

    ClearML's exit hook, installed by ``Task.init``, catches SIGTERM and keeps the process
    running; agents stop tasks, and clouds pre-empt workers, with SIGTERM. Raising instead
    unwinds the step through its ``finally`` blocks: training saves a checkpoint, the task is
    marked, and the session is closed.
    """

    def stopped() -> StepStopped:
        return StepStopped(
            f"step {step} received SIGTERM (aborted, or its worker was pre-empted); "
            "a rerun of the step resumes from its last checkpoint"
        )

    with raise_on_signal(signal.SIGTERM, stopped):
        yield


@contextmanager
def _watchdog(task: Any, step: str, minutes: float | None) -> Iterator[None]:
    """The backstop of a step's own time limit, for a process too stuck to raise: a few minutes after
    the limit, mark the task failed (tagged :data:`TIME_LIMIT_TAG`) and end the process.

    ClearML's own per-step ``time_limit`` cannot be used: clearml 2.1.12's controller crashes on it
    while the step is queued (clearml/clearml#1640, see :mod:`d2ops.clearml.controller`).
    """
    if not minutes:
        yield
        return

    def expire() -> None:
        err = StepTimeLimitExceeded(f"step {step} ran {WATCHDOG_GRACE_S:g} s past its time limit of {minutes:g} min")
        _mark_ended(task, *_record_failure(task, step, err))
        os._exit(124)

    timer = threading.Timer(minutes * 60.0 + WATCHDOG_GRACE_S, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


# --------------------------------------------------------------------------- the runtime a step gets


class ClearMLStepRuntime(StepRuntime):
    """What a step asks of ClearML, inside an open :class:`StepRun`."""

    registers_models = True

    def __init__(self, run: StepRun) -> None:
        self.run = run

    def fetch_url(self, uri: str) -> Path:
        local = StorageManager.get_local_copy(uri)
        if not local:
            raise FileNotFoundError(f"could not fetch {uri} (check the ClearML fileserver and credentials)")
        return Path(local)

    def dataset_local_copy(self, dataset_id: str) -> Path:
        return Path(clearml_datasets.dataset_local_copy(dataset_id))

    def register_dataset(self, cfg: ExperimentConfig, manifest: dict[str, Any]) -> str | None:
        if Task.is_offline():
            log.warning("data.register_dataset: ClearML is offline, and offline datasets cannot be created in a step")
            return None
        # Finalized, not published: `d2ops schedule on-data` watches published versions, and a version the
        # pipeline registers itself must not trigger a second run on the same data.
        return clearml_datasets.register_s3_dataset(
            cfg.data.source,
            f"{cfg.clearml.project}/data",
            cfg.name,
            tags=[cfg.name, "d2ops-pipeline"],
            manifest=manifest,
            publish=False,
        )

    def on_agent(self) -> bool:
        return on_agent()

    def run_key(self, machine_rank: int = 0) -> str | None:
        return step_run_key(machine_rank)

    def output_uri(self) -> str | None:
        return task_output_uri()

    def launch_multi_node(self, num_machines: int, num_gpus: int, port: int) -> dict[str, Any] | None:
        return launch_multi_node(num_machines, num_gpus, port)

    def champion_store(self, cfg: ExperimentConfig) -> ChampionStore:
        return open_champion_store(cfg)

    def lineage(self) -> dict[str, str | None]:
        return step_lineage()

    def register_model(self, bundle_zip: Path, **kwargs: Any) -> dict[str, Any]:
        return register_model(self.run, bundle_zip, **kwargs)


# --------------------------------------------------------------------------- the step script's body


def run_step(
    step: str,
    params: dict[str, Any],
    *,
    mode: Mode,
    queue: str | None = None,
    function: Callable[[StepContext], StepOutput] | None = None,
) -> StepResult:
    """Run one step as a ClearML task: the body of every tasks/*.py script and of the offline pipeline.

    ``params`` holds ``config`` and ``overrides`` (read only where the step is launched) and the
    step's inputs. On a clearml-agent the script starts with no arguments: the task already
    exists, and its experiment and inputs are read back from it.
    """
    config = str(params.get("config") or "")
    cfg = None if on_agent() else load_config(config, parse_overrides(params.get("overrides")))
    inputs = {name: value for name, value in params.items() if name not in {"overrides"}}
    with open_step(step, cfg, inputs, mode=mode, queue=queue) as run:
        ctx = StepContext(
            cfg=run.cfg,
            workdir=Path(run.cfg.runtime.output_dir),
            inputs={name: str(value) for name, value in run.params.items() if name not in _NOT_INPUTS},
            reporter=run.reporter,
            runtime=ClearMLStepRuntime(run),
        )
        with step_time_limit(step, run.cfg.clearml.step(step).time_limit_min):
            output = (function or STEP_FUNCTIONS[step])(ctx)
        artifacts = run.publish(output.files)
        run.reporter.artifact("step_result", json.loads(json.dumps(output.values, default=str)))
    return StepResult(step, run.task.id, dict(artifacts), output.values, run.session)


def run_offline(
    config: str,
    overrides: list[str],
    *,
    functions: Mapping[str, Callable[[StepContext], StepOutput]] | None = None,
) -> PipelineRun:
    """The whole pipeline here, with no server: each step in order, each an offline ClearML session."""

    def runner(step: str, params: dict[str, Any], function: Callable[[StepContext], StepOutput] | None) -> StepResult:
        return run_step(step, params, mode="offline", function=function)

    return run_in_order(config, overrides, runner, functions=functions)
