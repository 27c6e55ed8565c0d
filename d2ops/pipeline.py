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
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from d2ops.clearml_adapter import Mode, on_agent, open_step, register_model
from d2ops.config import ExperimentConfig, load_config
from d2ops.steps import STEP_FUNCTIONS, STEP_INPUTS, STEPS, StepContext

__all__ = [
    "PipelineRun",
    "StepResult",
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
            "docker_image": cfg.clearml.docker_image,
            "docker_args": cfg.clearml.docker_args,
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
            inputs={name: str(run.params.get(name, "")) for name in STEP_INPUTS[step]},
            reporter=run.reporter,
            register_model=partial(register_model, run),
        )
        output = STEP_FUNCTIONS[step](ctx)
        artifacts = run.publish(output.files)
        run.reporter.artifact("step_result", json.loads(json.dumps(output.values, default=str)))
        return StepResult(step, run.task.id, dict(artifacts), output.values, run.session_folder)


@dataclass
class PipelineRun:
    """What an offline pipeline run produced, step by step."""

    steps: dict[str, StepResult] = field(default_factory=dict)

    @property
    def sessions(self) -> dict[str, str | None]:
        return {name: result.session_folder for name, result in self.steps.items()}

    def to_dict(self) -> dict[str, Any]:
        return {name: asdict(result) for name, result in self.steps.items()}


def run_offline(config: str, overrides: list[str]) -> PipelineRun:
    """Run every step in order, here, with no server: each step leaves an offline ClearML session.

    Step outputs are handed on exactly as the PipelineController hands them on: the next step's
    input parameter is the previous step's artifact URL (a path inside its offline session).
    """
    result = PipelineRun()
    for step in STEPS:
        inputs = {name: result.steps[src].artifacts[art] for name, (src, art) in STEP_INPUTS[step].items()}
        log.info("=== step %s ===", step)
        result.steps[step] = run_step(step, step_parameters(step, config, overrides, inputs), mode="offline")
    return result


def _step_task_factory(step: str, cfg: ExperimentConfig, node: Any) -> Any:
    """Create the step's template task from tasks/<step>.py (called by the controller at launch)."""
    from clearml import Task

    task: Any = Task.create(
        project_name=cfg.clearml.project,
        task_name=step,
        task_type="training" if step == "train" else "custom",
        script=f"tasks/{step}.py",
        working_directory=".",
        docker=cfg.clearml.docker_image,
        docker_args=cfg.clearml.docker_args or None,
        add_task_init_call=False,
    )
    # Declare the step's parameters so the controller's General/ overrides have slots to fill.
    task.set_parameters({f"General/{key}": value for key, value in step_parameters(step, "", []).items()})
    return task


def build_controller(config: str, overrides: list[str], cfg: ExperimentConfig | None = None) -> Any:
    """The ClearML PipelineController for ``local`` and ``remote`` modes (buildable offline).

    Pipeline parameters (visible and editable in the UI): the dataset URI, config path,
    overrides, docker image and one queue per step. Each step's ``General/`` parameters are
    wired to them, and its inputs to the artifact URLs of the step that produces them.
    """
    from clearml import PipelineController

    cfg = cfg or load_config(config, overrides)
    pipe = PipelineController(
        name=f"{cfg.name} pipeline",
        project=cfg.clearml.project,
        version="1.0.0",
        add_pipeline_tags=True,
    )
    pipe.add_parameter("dataset_uri", cfg.data.source, "s3://host:port/bucket/prefix or a path on the agent")
    pipe.add_parameter("config", config, "experiment config, relative to the repository root")
    pipe.add_parameter("overrides", join_overrides(overrides), "extra key=value overrides, space separated")
    pipe.add_parameter("docker_image", cfg.clearml.docker_image, "the detectron2 image every step runs in")
    for step in STEPS:
        pipe.add_parameter(f"queue_{step}", getattr(cfg.clearml.queues, step), f"queue of the {step} step")
    for step in STEPS:
        parents = sorted({src for src, _ in STEP_INPUTS[step].values()}, key=STEPS.index)
        if step != "download" and not parents:
            parents = [STEPS[STEPS.index(step) - 1]]
        override = {
            "General/config": "${pipeline.config}",
            "General/overrides": "${pipeline.overrides} data.source=${pipeline.dataset_uri}",
        }
        for name, (src, art) in STEP_INPUTS[step].items():
            override[f"General/{name}"] = f"${{{src}.artifacts.{art}.url}}"
        pipe.add_step(
            name=step,
            base_task_factory=partial(_step_task_factory, step, cfg),
            parents=parents or None,
            execution_queue=f"${{pipeline.queue_{step}}}",
            parameter_override=override,
            task_overrides={"container.image": "${pipeline.docker_image}"},
            cache_executed_step=step == "download",
        )
    return pipe


def start_controller(pipe: Any, mode: Mode, controller_queue: str) -> None:
    """``local``: controller and steps here; ``remote``: controller on ``controller_queue``."""
    if mode == "local":
        pipe.start_locally(run_pipeline_steps_locally=True)
    else:
        pipe.start(queue=controller_queue)
