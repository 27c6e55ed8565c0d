"""The ClearML session of this process: offline mode, agent detection, and the task it runs in.

Every other module of :mod:`d2ops.clearml` asks here whether it runs on an agent, offline or
against a server, and which task (and pipeline run) it belongs to.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from clearml import Task
from clearml.config import get_remote_task_id, running_remotely

__all__ = [
    "PIPELINE_STEP_TAG",
    "TASK_TYPES",
    "enable_offline",
    "launch_multi_node",
    "live_task",
    "mark_pipeline_step",
    "on_agent",
    "pipeline_run_id",
    "remote_task_parameters",
    "step_lineage",
    "step_run_key",
    "task_output_uri",
]

#: System tag prefix the pipeline controller puts on each step task it creates, followed by that task's own
#: id (:func:`mark_pipeline_step`). A clone copies system tags but gets a new id, so its tag does not match.
PIPELINE_STEP_TAG = "d2ops:pipeline-step:"

#: The ClearML task type of each step (how the UI files and filters them).
TASK_TYPES = {
    "download": "data_processing",
    "train": "training",
    "evaluate": "testing",
    "infer": "inference",
    "register": "custom",
}


def on_agent() -> bool:
    """True when this process was started by a clearml-agent (or a pipeline) for an existing task."""
    return bool(running_remotely())


def enable_offline(cache_dir: Path | None = None) -> None:
    """Switch ClearML to offline mode (optionally moving its cache, where sessions are stored).

    Also turns off ClearML's reporter subprocess (the ``sdk.development.report_use_subprocess``
    setting): in offline mode its shutdown handshake makes every ``Task.close`` wait 10 s, and
    a second session in the same process wait minutes. Reports are then written by a thread.
    """
    if cache_dir is not None:
        os.environ["CLEARML_CACHE_DIR"] = str(Path(cache_dir).resolve())
    Task.set_offline(True)
    # clearml 2.1.12: the class attribute behind report_use_subprocess, read when a task starts reporting.
    Task._report_subprocess_enabled = False  # type: ignore[assignment]


def remote_task_parameters() -> dict[str, str]:
    """On an agent: the parameters of the task this process was started for, read before any
    ``Task.init`` (so a script can rebuild itself from what the launcher or the UI recorded)."""
    task_id = get_remote_task_id()
    if not task_id:
        return {}
    params: dict[str, Any] = Task.get_task(task_id=task_id).get_parameters() or {}
    return {str(k): str(v) for k, v in params.items()}


def live_task() -> Any:
    """The ClearML task this process runs in, when one is open and connected to a server (else ``None``)."""
    task: Any = Task.current_task()
    if task is None or Task.is_offline():
        return None
    return task


def mark_pipeline_step(task: Any) -> None:
    """Mark ``task`` as the step task a pipeline controller created (see :data:`PIPELINE_STEP_TAG`)."""
    task.set_system_tags([*(task.get_system_tags() or []), f"{PIPELINE_STEP_TAG}{task.id}"])


def _is_pipeline_step(task: Any) -> bool:
    """True for the very task a pipeline controller created and marked; False for a clone of it (new id)."""
    return f"{PIPELINE_STEP_TAG}{task.id}" in (task.get_system_tags() or [])


def _first_machine(machine_rank: int) -> Any:
    """This step's task, or for the extra machines of a multi-machine run (clones whose parent is the
    first machine's task) the first machine's task; None offline or outside ClearML."""
    task = live_task()
    if task is not None and machine_rank > 0 and task.parent:
        task = Task.get_task(task_id=task.parent)
    return task


def pipeline_run_id(machine_rank: int = 0) -> str | None:
    """The ClearML pipeline run (controller task) of this step; None offline, outside one, or for a clone.

    It is the task's parent, but only for the step task the controller created (:func:`mark_pipeline_step`):
    ClearML keeps ``parent`` on a clone (the original's controller), and a clone is not part of that run.
    """
    task = _first_machine(machine_rank)
    if task is None or not task.parent or not _is_pipeline_step(task):
        return None
    return str(task.parent)


def step_run_key(machine_rank: int = 0) -> str | None:
    """Which run this step's training is (the run key of :mod:`d2ops.engine.checkpoints`); None outside ClearML
    or for a task with no parent (the standalone rule applies).

    - the step task a pipeline controller created: the pipeline run, so a retried step resumes it;
    - any other task with a parent (a clone of a pipeline step, which keeps the original's controller as
      parent, or of a standalone task, whose parent is then the original): its own task id, so a clone is a
      new run and a rerun of that very clone resumes it. Continuing another run needs ``runtime.resume_from``.
    """
    task = _first_machine(machine_rank)
    if task is None or not task.parent:
        return None
    return str(task.parent) if _is_pipeline_step(task) else str(task.id)


def task_output_uri() -> str | None:
    """The output URI of this process's ClearML task (an agent's ``default_output_uri``); None offline."""
    task = live_task()
    if task is None:
        return None
    uri = task.output_uri
    return str(uri) if uri else None


def step_lineage() -> dict[str, str | None]:
    """Which ClearML run produced this: the step task and its pipeline (the controller, the step's parent).

    Offline sessions have no pipeline controller (``pipeline_run`` is ``None``); outside ClearML both are ``None``.
    """
    task: Any = Task.current_task()
    if task is None:
        return {"step_task": None, "pipeline_run": None}
    return {"step_task": str(task.id), "pipeline_run": pipeline_run_id()}


def launch_multi_node(num_machines: int, num_gpus: int, port: int) -> dict[str, Any] | None:
    """ClearML's multi-node launch (rank, master address and port) when training spans machines.

    On the first machine this enqueues the other machines' tasks and waits for them to start.
    None with one machine, or where there is no agent to start the others on.
    """
    task: Any = Task.current_task() if num_machines > 1 else None
    if task is None or not on_agent():
        return None
    return dict(task.launch_multi_node(num_machines, port=port, wait=True, devices=num_gpus))
