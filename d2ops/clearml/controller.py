"""The ClearML PipelineController for ``local`` and ``remote`` runs, and what keeps it alive.

One function builds the controller from a validated experiment (:func:`build_controller`);
the experiment reaches it from the laptop's ``--config``/``--set``, or, on the services agent
(where the script starts with no arguments), from the controller task's own ``Args/``
hyperparameters (:func:`controller_experiment`). The laptop records the experiment there before
handing the controller over, so both build exactly the same pipeline, and a clone edited in the
UI builds what its edited values say.

Every step's experiment is the pipeline's, passed as the step's flat hyperparameters
(``solver/base_lr``...), its inputs are the artifact URLs of the steps that produce them, and
its queue, image, docker arguments and retries come from ``clearml.queues`` and ``clearml.steps``.

Three traps of clearml 2.1.12's controller, and what d2ops does about each:

- ``PipelineController._daemon`` reads ``node.job.task.data.started`` of every step that has a
  ``time_limit`` and is not yet stopped; for a queued step it is ``None`` and the controller
  thread dies with ``AttributeError: 'NoneType' object has no attribute 'tzinfo'``
  (clearml/clearml#1640). d2ops never sets ClearML's ``time_limit``: each step enforces its own
  limit, with a watchdog behind it (:mod:`d2ops.clearml.step`).
- When the controller thread dies of anything, ``stop()`` marks the pipeline *completed* and
  launches nothing more. :class:`D2opsPipelineController` catches the error, logs it and marks
  the pipeline *failed* with it as the status reason.
- A ``pre_execute_callback`` that raises kills the controller the same way. The download step's
  cache-key callback (:func:`download_cache_key`) never raises: it warns and takes a cache miss.
- ClearML's argparse binding records the launching command line (``--config``, ``--set``,
  ``--dataset-uri``, ``--offline``, ``--local``) as ``Args/`` parameters of the controller task, and
  on the services agent writes their defaults back. None of them is read there: the experiment is
  the ``Args/<section>/<key>`` values, so an edit of one in the UI was silently ignored. They are
  deleted (:func:`forget_command_line`): the UI shows only what the controller honours. The launch
  config's name, which every step records as ``General/config``, is kept as the controller's user
  property ``launch_config`` (metadata, like ClearML's own ``version`` there).
- Past ``set_pipeline_execution_time_limit``, the control loop stops and aborts the running steps,
  but its end of loop marks only nodes whose ``executed is False`` as failed: an aborted step's is
  ``None``, and the pipeline ends *completed*. :class:`D2opsPipelineController` marks it *failed*,
  the time limit and the unfinished steps as its reason, and :func:`start_controller` raises, so
  the controller's process exits non-zero.
"""

from __future__ import annotations

import logging
import time
import uuid
from functools import partial
from typing import Any

from clearml import PipelineController, Task

from d2ops.clearml.cluster import agent_requirements, step_docker_args, step_task_spec, with_agent_env
from d2ops.clearml.hyperparams import experiment_from_parameters, experiment_parameters, is_experiment_name
from d2ops.clearml.secrets import scrub_recorded_diff
from d2ops.clearml.session import mark_pipeline_step, remote_task_parameters
from d2ops.clearml.step import STOPPED_TAG, TIME_LIMIT_TAG, ClearMLReporter, record_experiment
from d2ops.config import ExperimentConfig
from d2ops.pipeline.runner import step_parameters
from d2ops.pipeline.steps import STEP_INPUTS, STEPS
from d2ops.storage import s3 as storage

__all__ = [
    "ARGS_PREFIX",
    "LAUNCH_CONFIG_PROPERTY",
    "D2opsPipelineController",
    "build_controller",
    "controller_experiment",
    "download_cache_key",
    "forget_command_line",
    "monitor_metrics",
    "recorded_launch_config",
    "report_step_failure",
    "retry_unless_timed_out",
    "start_controller",
]

log = logging.getLogger(__name__)

#: Where ClearML keeps a PipelineController's parameters (``PipelineController._args_section``).
ARGS_PREFIX = "Args/"
#: The controller task's user property naming the config file the pipeline was launched from.
LAUNCH_CONFIG_PROPERTY = "launch_config"


class D2opsPipelineController(PipelineController):
    """ClearML's PipelineController, failing visibly when its control loop dies or runs out of time.

    clearml 2.1.12 runs :meth:`_daemon` on a thread; an exception there ends the thread, and
    ``stop()`` then marks the pipeline completed (or failed with a generic "Pipeline step
    failed" only when a step failed). Here the error is kept, logged with its traceback, and
    the pipeline task is marked failed with it as the status reason.

    The loop also ends, without an error, when the pipeline runs past its time limit; it aborts
    the running steps and skips the rest, and ClearML marks the pipeline completed. Here that
    is a failure too (:attr:`failure`), whose reason names the limit and the unfinished steps.
    """

    controller_error: BaseException | None = None
    #: Why the pipeline ran out of time (``None`` when it did not).
    time_limit_error: str | None = None
    _time_limit_min: float | None = None

    def set_pipeline_execution_time_limit(self, max_execution_minutes: float | None) -> None:
        super().set_pipeline_execution_time_limit(max_execution_minutes)
        self._time_limit_min = max_execution_minutes or None

    def _daemon(self) -> None:
        # clearml 2.1.12: PipelineController._daemon is the control loop, run on the controller thread,
        # started right after the pipeline's own start time is taken (_prepare_pipeline).
        started = time.monotonic()
        try:
            super()._daemon()
        except BaseException as err:
            self.controller_error = err
            # clearml 2.1.12: what stop() reads to fail the pipeline.
            self._pipeline_task_status_failed = True  # type: ignore[assignment]
            log.exception("the pipeline controller stopped on an error; no further steps are launched")
            return
        limit = self._time_limit_min
        if not limit or time.monotonic() - started < limit * 60.0:
            return
        unfinished = [name for name, node in self.get_pipeline_dag().items() if not node.executed]
        if not unfinished:
            return
        self.time_limit_error = (
            f"the pipeline ran past its time limit (clearml.pipeline_time_limit_min={limit:g}); "
            f"steps not finished: {', '.join(unfinished)}"
        )
        self._pipeline_task_status_failed = True  # type: ignore[assignment]
        log.error("%s; the running steps were aborted and the rest skipped", self.time_limit_error)

    @property
    def failure(self) -> str | None:
        """Why the pipeline failed in its controller (an error of the control loop, or its time limit), or ``None``."""
        if self.controller_error is not None:
            return f"controller error: {type(self.controller_error).__name__}: {self.controller_error}"
        return self.time_limit_error

    def stop(self, timeout: float | None = None, mark_failed: bool = False, mark_aborted: bool = False) -> None:
        super().stop(timeout=timeout, mark_failed=mark_failed, mark_aborted=mark_aborted)
        reason = self.failure
        if reason is not None and self._task is not None:
            self._task.mark_failed(status_reason=reason[:250], status_message=reason[:250], force=True)

    @property
    def task(self) -> Any:
        """The controller's own ClearML task (``None`` only if ClearML could not create one)."""
        # clearml 2.1.12 keeps it in a private attribute; there is no public accessor.
        return self._task


def controller_experiment(launched: ExperimentConfig | None = None) -> ExperimentConfig:
    """The experiment to build the controller from.

    Launched from the laptop, ``launched`` (validated from ``--config``/``--set``). On the services
    agent the controller script starts with no arguments: the experiment is the controller task's
    ``Args/`` hyperparameters, as the laptop recorded them or a UI clone edited them.
    """
    params = remote_task_parameters()
    if params:
        return experiment_from_parameters(params, prefix=ARGS_PREFIX, source="pipeline controller task")
    if launched is None:
        raise ValueError("no experiment: pass --config (and --set) when launching the pipeline")
    return launched


def recorded_launch_config() -> str:
    """On the services agent: the launch config's name the laptop recorded on the controller task ("" if none)."""
    return remote_task_parameters().get(f"properties/{LAUNCH_CONFIG_PROPERTY}", "")


def forget_command_line(task: Any) -> None:
    """Delete the ``Args/`` parameters ClearML's argparse binding recorded from the command line.

    They are not the experiment (``Args/<section>/<key>``) and the controller never reads them on
    the agent, so showing them in the UI would invite edits that change nothing. Called after the
    controller's ``Task.init``: on the laptop it recorded the parsed arguments, on the agent their defaults.
    """
    for key in task.get_parameters() or {}:
        if key.startswith(ARGS_PREFIX) and not is_experiment_name(key[len(ARGS_PREFIX) :]):
            task.delete_parameter(key, force=True)


def _step_task_factory(step: str, cfg: ExperimentConfig, config_path: str, node: Any) -> Any:
    """Create the step's template task from tasks/<step>.py (called by the controller at launch)."""
    task: Any = Task.create(**step_task_spec(step, cfg))
    scrub_recorded_diff(task)  # Task.create records the launching checkout's uncommitted diff too
    mark_pipeline_step(task)  # this very task is the pipeline's step; a clone of it is a new run
    record_experiment(task, cfg)
    # Declare the step's inputs so the controller's General/ overrides have slots to fill (no General/overrides:
    # the --set overrides are already in the experiment values, and an agent never reads them).
    general = {k: v for k, v in step_parameters(step, config_path, []).items() if k != "overrides"}
    task.update_parameters({f"General/{key}": value for key, value in general.items()})
    return task


def monitor_metrics(cfg: ExperimentConfig) -> dict[str, list[tuple[tuple[str, str], tuple[str, str]]]]:
    """Headline metrics the pipeline page shows: (step title, series) -> (pipeline title, series).

    ClearML's monitor reads the steps' scalar histograms, which leave single values out, so it
    reads the copies the step reporter writes under ``headline`` (:class:`ClearMLReporter`).
    """
    title = ClearMLReporter.HEADLINE_TITLE
    beta = f"{cfg.eval.f_beta:g}"
    return {
        "evaluate": [
            ((title, "bbox/AP"), ("evaluate", "bbox AP")),
            ((title, "bbox/AP50"), ("evaluate", "bbox AP50")),
            ((title, f"f{beta}"), ("evaluate", f"F{beta}")),
        ],
        "register": [
            ((title, "quality_gate_passed"), ("register", "quality gate passed")),
            ((title, "gate/promoted"), ("register", "promoted to production")),
        ],
    }


def download_cache_key(pipe: Any, node: Any, parameters: dict[str, Any]) -> bool:
    """``pre_execute_callback`` of the download step: put the dataset identity into its parameters.

    ClearML reuses a cached step when the step's script, parameters and configuration hash the
    same. The identity (one S3 listing of keys, ETags and sizes, or the ClearML dataset version)
    is one of those parameters, so new data misses the cache and unchanged data hits it.

    It never raises: an exception here kills ClearML's controller thread. When the identity
    cannot be computed on the controller (MinIO unreachable from the services agent, no
    credentials there, a ``data.source`` that is a path on the workers only), it warns and
    takes a cache miss; the download step, on its worker, then succeeds or reports the real error.
    """
    try:
        identity = dataset_identity_for(experiment_from_parameters(parameters, source="download step parameters"))
        log.info("download step cache key: dataset identity %s", identity)
    except Exception as err:
        identity = f"unknown:{uuid.uuid4().hex}"
        log.warning(
            "could not compute the dataset identity on the controller (%s: %s); the download step runs "
            "without its cache and reports any real problem from its worker",
            type(err).__name__,
            err,
        )
    parameters["General/dataset_identity"] = identity
    return True


def dataset_identity_for(cfg: ExperimentConfig) -> str:
    """The identity of the data a config points at: a ClearML dataset version, or a listing of S3/files."""
    if cfg.data.dataset_id:
        return f"clearml-dataset:{cfg.data.dataset_id}"
    return storage.remote_identity(cfg.data.source)


def _ended_by(node: Any) -> tuple[set[str], str]:
    """A finished step's d2ops tags and status reason, reloaded from the server.

    The controller's copy of the step's task is a snapshot from when it was launched; the
    status reason in it is stale, and the agent may overwrite the reason with its own exit-code
    message. The tags the step wrote (:data:`TIME_LIMIT_TAG`, :data:`STOPPED_TAG`) survive both.
    """
    job = getattr(node, "job", None)
    if job is None:
        return set(), ""
    try:
        job.task.reload()
    except Exception:  # the verdict falls back to the snapshot; logged for the operator
        log.warning("could not reload step %s from the server", node.name, exc_info=True)
    tags = {str(tag) for tag in (job.task.get_tags() or [])}
    return tags, str(getattr(job.task.data, "status_reason", "") or "")


def retry_unless_timed_out(pipe: Any, node: Any, retries: int, *, max_retries: int) -> bool:
    """``retry_on_failure``: re-run a failed step (a pre-empted or lost worker) up to ``max_retries``
    times, but not one that ran past its time limit: a retry would only spend that time again."""
    tags, reason = _ended_by(node)
    if TIME_LIMIT_TAG in tags:
        log.error("step %s ran past its time limit; not retried (%s)", node.name, reason or TIME_LIMIT_TAG)
        return False
    if retries < max_retries:
        why = "it was stopped by SIGTERM" if STOPPED_TAG in tags else reason or "see the step's console log"
        log.warning("step %s failed (%s); retry %d of %d", node.name, why, retries + 1, max_retries)
        return True
    return False


def report_step_failure(pipe: Any, node: Any, previous_status: str) -> None:
    """``status_change_callback``: a failed step's reason goes into the pipeline's own log."""
    job = getattr(node, "job", None)
    if job is None or not job.is_failed():
        return
    tags, reason = _ended_by(node)
    why = reason or "see the step's console log"
    if TIME_LIMIT_TAG in tags:
        why = f"ran past its time limit ({why})"
    log.error("pipeline step %s failed (task %s): %s", node.name, job.task_id(), why)


def build_controller(cfg: ExperimentConfig, config_path: str = "") -> D2opsPipelineController:
    """The PipelineController of ``cfg`` (buildable offline; ``config_path`` is only recorded).

    The experiment is recorded as the controller's ``Args/`` hyperparameters (``Args/solver/base_lr``),
    editable in the UI: a clone runs what its edited values say, because the agent rebuilds the
    controller from them (:func:`controller_experiment`). Per step, from ``cfg``: queue, docker
    image and arguments, retries; the download step is cached on the dataset identity.
    """
    execution = cfg.clearml
    pipe = D2opsPipelineController(
        name=f"{cfg.name} pipeline",
        project=execution.project,
        version="1.0.0",
        add_pipeline_tags=True,
        pool_frequency=execution.pool_frequency_s / 60.0,
        docker=execution.docker_image,
        docker_args=with_agent_env(cfg.clearml.docker_args),  # the image's own Python, like every step
        packages=agent_requirements(),
    )
    if pipe.task is not None:
        scrub_recorded_diff(pipe.task)
        forget_command_line(pipe.task)
        if config_path and pipe.task.running_locally():
            description = "the config file the pipeline was launched from (each step's General/config); a record"
            pipe.task.set_user_properties(
                **{LAUNCH_CONFIG_PROPERTY: {"value": config_path, "description": description, "type": "str"}}
            )
    if execution.pipeline_time_limit_min:
        pipe.set_pipeline_execution_time_limit(execution.pipeline_time_limit_min)
    values, types = experiment_parameters(cfg)
    for name, text in values.items():
        pipe.add_parameter(name, text, param_type=types[name])
    for step in STEPS:
        _add_step(pipe, step, cfg, config_path, values)
    return pipe


def _add_step(
    pipe: D2opsPipelineController, step: str, cfg: ExperimentConfig, config_path: str, experiment: dict[str, str]
) -> None:
    parents = sorted({src for src, _ in STEP_INPUTS[step].values()}, key=STEPS.index)
    if step != "download" and not parents:
        parents = [STEPS[STEPS.index(step) - 1]]
    override = {**experiment, "General/config": config_path}
    for name, (src, art) in STEP_INPUTS[step].items():
        override[f"General/{name}"] = f"${{{src}.artifacts.{art}.url}}"
    execution = cfg.clearml.step(step)
    pipe.add_step(
        name=step,
        base_task_factory=partial(_step_task_factory, step, cfg, config_path),
        parents=parents or None,
        execution_queue=getattr(cfg.clearml.queues, step),
        parameter_override=override,
        task_overrides={"container.image": execution.docker_image, "container.arguments": step_docker_args(cfg, step)},
        cache_executed_step=step == "download",
        pre_execute_callback=download_cache_key if step == "download" else None,
        status_change_callback=report_step_failure,
        retry_on_failure=partial(retry_unless_timed_out, max_retries=execution.retries),
        # No ClearML time_limit (clearml/clearml#1640): the step enforces its own (d2ops.clearml.step).
        monitor_metrics=monitor_metrics(cfg).get(step),  # type: ignore[arg-type]  # SDK's hint is narrower
        monitor_models=[cfg.registry.model_name] if step == "register" else None,
    )


def start_controller(pipe: D2opsPipelineController, mode: str, controller_queue: str) -> None:
    """``local``: controller and steps here; ``remote``: controller on ``controller_queue``.

    Raises when the controller ended on an error or past its time limit (the pipeline task is
    already marked failed with the reason), so the controller's process exits non-zero.
    """
    if mode == "local":
        pipe.start_locally(run_pipeline_steps_locally=True)
    else:
        pipe.start(queue=controller_queue)
    if pipe.failure is not None:
        raise RuntimeError(f"the pipeline failed: {pipe.failure}") from pipe.controller_error
