"""The pipeline: download+validate -> train -> evaluate -> infer -> register.

Three modes run the same step functions (:data:`d2ops.steps.STEP_FUNCTIONS`) through the same
:func:`run_step`:
- ``offline``: no server; each step is a ClearML offline session, run one after another here;
- ``local``: a ClearML PipelineController with a server, steps run as local processes;
- ``remote``: the controller goes to the services queue and each step to its own queue,
  in the detectron2 docker image.
"""

from __future__ import annotations

import json
import logging
import shlex
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from d2ops.clearml_adapter import Mode, on_agent, open_step, register_model, scrub_recorded_diff
from d2ops.cluster import step_docker_args
from d2ops.config import ExperimentConfig, load_config
from d2ops.steps import STEP_FUNCTIONS, STEP_INPUTS, STEPS, StepContext, StepOutput

__all__ = [
    "PipelineRun",
    "StepResult",
    "StepTimeLimitExceeded",
    "build_controller",
    "parse_overrides",
    "run_offline",
    "run_step",
    "step_parameters",
]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_overrides(text: str | list[str] | None) -> list[str]:
    """Overrides travel as one string (editable in the ClearML UI): ``key=value`` items, shell-quoted."""
    if not text:
        return []
    if isinstance(text, list):
        return list(text)
    return shlex.split(text)


def join_overrides(items: list[str]) -> str:
    return " ".join(shlex.quote(item) for item in items)


def step_parameters(
    step: str, config: str, overrides: list[str], inputs: dict[str, str] | None = None
) -> dict[str, Any]:
    """The flat parameters a step connects under ``General/`` (no credentials, ever)."""
    params: dict[str, Any] = {"config": config, "overrides": join_overrides(overrides)}
    for name in STEP_INPUTS[step]:
        params[name] = (inputs or {}).get(name, "")
    if step == "download":
        # Filled by the controller at launch (download_cache_key): the step's cache key.
        params["dataset_identity"] = (inputs or {}).get("dataset_identity", "")
    return params


@dataclass
class StepResult:
    step: str
    task_id: str
    artifacts: dict[str, str]
    values: dict[str, Any]
    session_folder: str | None = None


def run_step(
    step: str,
    params: dict[str, Any],
    *,
    mode: Mode,
    queue: str | None = None,
    function: Callable[[StepContext], StepOutput] | None = None,
) -> StepResult:
    """Run one step as a ClearML task: the body of every tasks/*.py script and of the offline pipeline.

    On a clearml-agent the script starts with no arguments: the task already exists and its
    ``General/`` parameters (as the pipeline or the UI set them) arrive through ``connect``, so
    the config is only read after the task is open.
    """
    launch: dict[str, Any] = {}
    if not on_agent():
        cfg = load_config(params["config"], parse_overrides(params.get("overrides")))
        launch = {
            "project": cfg.clearml.project,
            "queue": queue or getattr(cfg.clearml.queues, step),
            "docker_image": cfg.clearml.step(step).docker_image,
            "docker_args": step_docker_args(cfg, step),
            "output_uri": cfg.clearml.output_uri,
            "tags": [cfg.name],
        }
    with open_step(step, params, mode=mode, **launch) as run:
        # On an agent the connected values are the ones edited in the UI / set by the pipeline.
        cfg = load_config(run.params["config"], parse_overrides(run.params.get("overrides")))
        run.reporter.configuration("experiment", cfg.to_yaml(), "the validated d2ops experiment config")
        ctx = StepContext(
            cfg=cfg,
            workdir=Path(cfg.runtime.output_dir),
            inputs={name: str(value) for name, value in run.params.items() if name not in {"config", "overrides"}},
            reporter=run.reporter,
            register_model=partial(register_model, run),
        )
        with step_time_limit(step, cfg.clearml.step(step).time_limit_min):
            output = (function or STEP_FUNCTIONS[step])(ctx)
        artifacts = run.publish(output.files)
        run.reporter.artifact("step_result", json.loads(json.dumps(output.values, default=str)))
        return StepResult(step, run.task.id, dict(artifacts), output.values, run.session_folder)


class StepTimeLimitExceeded(TimeoutError):
    """A step ran past ``clearml.steps.<step>.time_limit_min``; it fails, and so does the pipeline."""


@contextmanager
def step_time_limit(step: str, minutes: float | None) -> Iterator[None]:
    """Raise :class:`StepTimeLimitExceeded` in this (main) thread once ``minutes`` have passed.

    The step process enforces its own limit so the task fails with that reason, here, offline
    and on an agent alike; the controller's ``time_limit`` is only a backstop for a hung process.
    """
    if not minutes or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise StepTimeLimitExceeded(
            f"step {step} ran past its time limit of {minutes:g} min: raise clearml.steps.{step}.time_limit_min "
            "or make the step cheaper (e.g. fewer solver.max_iter)"
        )

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, minutes * 60.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class PipelineRun:
    """What an offline pipeline run produced, step by step."""

    steps: dict[str, StepResult] = field(default_factory=dict)

    @property
    def sessions(self) -> dict[str, str | None]:
        return {name: result.session_folder for name, result in self.steps.items()}

    def to_dict(self) -> dict[str, Any]:
        return {name: asdict(result) for name, result in self.steps.items()}


def run_offline(
    config: str,
    overrides: list[str],
    *,
    functions: Mapping[str, Callable[[StepContext], StepOutput]] | None = None,
) -> PipelineRun:
    """Run every step in order, here, with no server: each step leaves an offline ClearML session.

    Step outputs are handed on exactly as the PipelineController hands them on: the next step's
    input parameter is the previous step's artifact URL (a path inside its offline session).
    ``functions`` replaces step bodies by name (the hand-off benchmark runs near-empty steps).
    """
    result = PipelineRun()
    for step in STEPS:
        inputs = {name: result.steps[src].artifacts[art] for name, (src, art) in STEP_INPUTS[step].items()}
        log.info("=== step %s ===", step)
        params = step_parameters(step, config, overrides, inputs)
        result.steps[step] = run_step(step, params, mode="offline", function=(functions or {}).get(step))
    return result


def _step_task_factory(step: str, cfg: ExperimentConfig, node: Any) -> Any:
    """Create the step's template task from tasks/<step>.py (called by the controller at launch)."""
    from clearml import Task

    from d2ops.cluster import step_task_spec

    spec = step_task_spec(step, cfg)
    task: Any = Task.create(**spec)
    scrub_recorded_diff(task)  # Task.create records the launching checkout's uncommitted diff too
    # Declare the step's parameters so the controller's General/ overrides have slots to fill.
    task.set_parameters({f"General/{key}": value for key, value in step_parameters(step, "", []).items()})
    return task


#: Headline metrics the pipeline page shows: (step title, series) -> (pipeline title, series).
MONITOR_METRICS: dict[str, list[tuple[tuple[str, str], tuple[str, str]]]] = {
    "evaluate": [
        (("Summary", "bbox/AP"), ("evaluate", "bbox AP")),
        (("Summary", "bbox/AP50"), ("evaluate", "bbox AP50")),
        (("Summary", "f2"), ("evaluate", "F2")),
    ],
    "register": [
        (("Summary", "quality_gate_passed"), ("register", "quality gate passed")),
        (("Summary", "gate/promoted"), ("register", "promoted to production")),
    ],
}


def download_cache_key(pipe: Any, node: Any, parameters: dict[str, Any]) -> bool:
    """``pre_execute_callback`` of the download step: put the dataset identity into its parameters.

    ClearML reuses a cached step when the step's script, parameters and configuration hash
    the same. The identity (one S3 listing of keys, ETags and sizes, or the ClearML dataset
    version) is one of those parameters, so new data misses the cache and unchanged data hits it.
    It is computed here, at launch, from the parameters as resolved for this run (a UI clone
    may have changed the dataset).
    """
    parameters["General/dataset_identity"] = dataset_identity_for(
        parameters.get("General/config", ""), parse_overrides(parameters.get("General/overrides"))
    )
    log.info("download step cache key: dataset identity %s", parameters["General/dataset_identity"])
    return True


def dataset_identity_for(config: str, overrides: list[str]) -> str:
    """The identity of the data a config points at: a ClearML dataset version, or a listing of S3/files."""
    from d2ops import storage

    cfg = load_config(config, overrides)
    if cfg.data.dataset_id:
        return f"clearml-dataset:{cfg.data.dataset_id}"
    return storage.remote_identity(cfg.data.source)


def _failure_reason(node: Any) -> str:
    """The status reason of a step's task (what :func:`d2ops.clearml_adapter.open_step` marked it failed with)."""
    job = getattr(node, "job", None)
    return str(getattr(job.task.data, "status_reason", "") or "") if job is not None else ""


def retry_unless_timed_out(pipe: Any, node: Any, retries: int, *, max_retries: int) -> bool:
    """``retry_on_failure``: re-run a failed step (a pre-empted or lost worker) up to ``max_retries``
    times, but not one that ran past its time limit: a retry would only spend that time again."""
    reason = _failure_reason(node)
    if reason.startswith(StepTimeLimitExceeded.__name__):
        log.error("step %s ran past its time limit; not retried: %s", node.name, reason)
        return False
    return retries < max_retries


def report_step_failure(pipe: Any, node: Any, previous_status: str) -> None:
    """``status_change_callback``: a failed step's reason goes into the pipeline's own log."""
    job = getattr(node, "job", None)
    if job is None or not job.is_failed():
        return
    reason = _failure_reason(node) or "see the step's console log"
    log.error("pipeline step %s failed (task %s): %s", node.name, job.task_id(), reason)


def build_controller(config: str, overrides: list[str], cfg: ExperimentConfig | None = None) -> Any:
    """The ClearML PipelineController for ``local`` and ``remote`` modes (buildable offline).

    Pipeline parameters (visible and editable in the UI, so a cloned run can change them): the
    dataset URI or ClearML dataset id, config path, overrides, docker image and one queue per
    step. Each step's ``General/`` parameters are wired to them, and its inputs to the artifact
    URLs of the step that produces them. Per step, from config: queue, docker image and
    arguments, retries and time limit; the download step is cached on the dataset identity.
    """
    from clearml import PipelineController

    cfg = cfg or load_config(config, overrides)
    pipe = PipelineController(
        name=f"{cfg.name} pipeline",
        project=cfg.clearml.project,
        version="1.0.0",
        add_pipeline_tags=True,
        pool_frequency=cfg.clearml.pool_frequency_s / 60.0,
    )
    if pipe._task is not None:
        scrub_recorded_diff(pipe._task)
    if cfg.clearml.pipeline_time_limit_min:
        pipe.set_pipeline_execution_time_limit(cfg.clearml.pipeline_time_limit_min)
    pipe.add_parameter("dataset_uri", cfg.data.source, "s3://host:port/bucket/prefix or a path on the agent")
    pipe.add_parameter("dataset_id", cfg.data.dataset_id or "", "a ClearML Dataset id (empty: use dataset_uri)")
    pipe.add_parameter("config", config, "experiment config, relative to the repository root")
    pipe.add_parameter("overrides", join_overrides(overrides), "extra key=value overrides, space separated")
    pipe.add_parameter("docker_image", cfg.clearml.docker_image, "the image of steps without their own")
    for step in STEPS:
        pipe.add_parameter(f"queue_{step}", getattr(cfg.clearml.queues, step), f"queue of the {step} step")
    for step in STEPS:
        _add_step(pipe, step, cfg)
    return pipe


def _add_step(pipe: Any, step: str, cfg: ExperimentConfig) -> None:
    parents = sorted({src for src, _ in STEP_INPUTS[step].values()}, key=STEPS.index)
    if step != "download" and not parents:
        parents = [STEPS[STEPS.index(step) - 1]]
    override = {
        "General/config": "${pipeline.config}",
        "General/overrides": "${pipeline.overrides} data.source=${pipeline.dataset_uri} "
        "data.dataset_id=${pipeline.dataset_id}",
    }
    for name, (src, art) in STEP_INPUTS[step].items():
        override[f"General/{name}"] = f"${{{src}.artifacts.{art}.url}}"
    execution = cfg.clearml.step(step)
    own_image = cfg.clearml.steps[step].docker_image  # type: ignore[index]
    pipe.add_step(
        name=step,
        base_task_factory=partial(_step_task_factory, step, cfg),
        parents=parents or None,
        execution_queue=f"${{pipeline.queue_{step}}}",
        parameter_override=override,
        task_overrides={
            "container.image": own_image or "${pipeline.docker_image}",
            "container.arguments": step_docker_args(cfg, step),
        },
        cache_executed_step=step == "download",
        pre_execute_callback=download_cache_key if step == "download" else None,
        status_change_callback=report_step_failure,
        retry_on_failure=partial(retry_unless_timed_out, max_retries=execution.retries),
        # ClearML's backstop, in seconds; the step enforces its own limit first (run_step).
        time_limit=_backstop_seconds(execution.time_limit_min),
        monitor_metrics=MONITOR_METRICS.get(step),
        monitor_models=[cfg.registry.model_name] if step == "register" else None,
    )


def _backstop_seconds(time_limit_min: float | None) -> float | None:
    """The controller aborts a step a little after the step's own limit, for a hung process."""
    return None if time_limit_min is None else time_limit_min * 60.0 + 300.0


def start_controller(pipe: Any, mode: Mode, controller_queue: str) -> None:
    """``local``: controller and steps here; ``remote``: controller on ``controller_queue``."""
    if mode == "local":
        pipe.start_locally(run_pipeline_steps_locally=True)
    else:
        pipe.start(queue=controller_queue)
