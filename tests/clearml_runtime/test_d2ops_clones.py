"""Clones: what a UI edit, a schedule or a dataset trigger changes is what the clone then runs.

ClearML's own clone-and-override code (``ClearmlJob`` as the schedulers call it, ``Task.clone``
and ``set_parameters`` as the UI does) runs against the stand-in server of ``fake_server.py``;
d2ops then reads the clone the way its agent-side start does. A real server could still differ in
the UI itself (how it shows and validates the typed values), which cannot be run here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from d2ops.clearml.controller import ARGS_PREFIX, build_controller
from d2ops.clearml.hyperparams import experiment_from_parameters
from d2ops.config import load_config

from .fake_server import FakeClearmlServer

REPO = Path(__file__).resolve().parents[2]
SMOKE = "configs/smoke.yaml"


def _template_pipeline(server: FakeClearmlServer) -> str:
    """A pipeline run's controller task as the laptop leaves it (ClearML's own serialization, as a draft)."""
    for queue in ("services", "cpu", "gpu"):
        server.create_queue(queue)
    cfg = load_config(REPO / SMOKE, ["solver.max_iter=30", "data.source=s3://minio:9000/datasets/shapes/"])
    pipe = build_controller(cfg, SMOKE)
    pipe.create_draft()
    return str(pipe.task.id)


def _clone_experiment(server: FakeClearmlServer, clone_id: str) -> Any:
    """What the clone's controller is rebuilt from on the services agent (controller_experiment)."""
    from clearml import Task

    return experiment_from_parameters(Task.get_task(task_id=clone_id).get_parameters(), prefix=ARGS_PREFIX)


@pytest.mark.timeout(180)
def test_a_cron_schedule_clone_runs_the_schedules_config_and_overrides(clearml_server: FakeClearmlServer) -> None:
    """Defect 3: the schedule's --config and --set reach the clone's experiment (Args/, not Pipeline/)."""
    from d2ops.clearml.schedules import build_cron_scheduler, cron_to_schedule, pipeline_task_parameters

    template = _template_pipeline(clearml_server)
    params = pipeline_task_parameters(SMOKE, ["solver.max_iter=55", "eval.score_threshold=0.3"])
    scheduler = build_cron_scheduler(template, cron_to_schedule("0 3 * * 1"), task_parameters=params)
    (job,) = scheduler.get_scheduled_tasks()
    scheduler._launch_job(job)  # clearml 2.1.12: TaskScheduler's own firing (ClearmlJob clone + override)

    (clone_id,) = clearml_server.queued_task_ids("services")
    assert clone_id != template
    cfg = _clone_experiment(clearml_server, clone_id)
    assert cfg.solver.max_iter == 55 and cfg.eval.score_threshold == 0.3
    assert cfg.data.source == load_config(REPO / SMOKE).data.source  # the schedule's config, whole
    # Single instance: while that clone is queued, the next firing launches nothing.
    scheduler._launch_job(job)
    assert clearml_server.queued_task_ids("services") == [clone_id]


@pytest.mark.timeout(180)
def test_a_dataset_trigger_clone_trains_on_the_new_version(
    clearml_server: FakeClearmlServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 3: ClearML's trigger replaces ``${dataset.id}`` and the clone's experiment reads it."""
    from clearml import Task

    from d2ops.clearml.schedules import build_dataset_trigger, pipeline_task_parameters

    template = _template_pipeline(clearml_server)
    # The stand-in has no regex project search: answer ClearML's lookup of '<project>/.datasets/...'.
    monkeypatch.setattr(Task, "get_projects", staticmethod(lambda **query: [SimpleNamespace(id="proj-shapes")]))
    params = pipeline_task_parameters(None, ["solver.max_iter=12"])
    scheduler = build_dataset_trigger(template, "d2ops/data", dataset_name="shapes", tags=["approved", "clean"],
                                      task_parameters=params)  # fmt: skip
    (trigger,) = scheduler.get_triggers()
    scheduler._launch_job(trigger, "ds-0077")  # clearml 2.1.12: TriggerScheduler's own firing

    (clone_id,) = clearml_server.queued_task_ids("services")
    cfg = _clone_experiment(clearml_server, clone_id)
    assert cfg.data.dataset_id == "ds-0077"
    assert cfg.solver.max_iter == 12
    assert cfg.data.source == "s3://minio:9000/datasets/shapes/"  # the rest stays the template's
    # Defect 7: both tags are required; clearml-server ORs a plain list.
    from datetime import datetime, timezone

    query = trigger.build_query(datetime(2026, 1, 1, tzinfo=timezone.utc))
    assert query["tags"] == ["__$all", "approved", "clean"]


def _env(server: FakeClearmlServer, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
    env.update(server.env())
    env.update(CLEARML_CONFIG_FILE=str(tmp_path / "clearml.conf"), CLEARML_CACHE_DIR=str(tmp_path / "cache"), **extra)
    return env


@pytest.mark.slow  # 5 s or more on 2 cores: `make test` runs it, `make test-fast` does not
@pytest.mark.timeout(400)
def test_a_step_clone_edited_in_the_ui_runs_the_edited_values(
    clearml_server: FakeClearmlServer, tmp_path: Path
) -> None:
    """Section 2: flat, typed hyperparameters; a UI edit of ``eval/score_threshold`` on a clone changes
    what the step runs, and a bad edit fails the step naming the key."""
    from clearml import Task

    from d2ops.data.synthetic import generate_shapes_dataset

    (tmp_path / "clearml.conf").write_text("")
    dataset = generate_shapes_dataset(tmp_path / "shapes", counts={"train": 4, "valid": 2, "test": 2})
    clearml_server.create_queue("cpu")
    # The step's template task, made exactly as the pipeline controller makes it (Task.create + the experiment).
    from d2ops.clearml.controller import _step_task_factory

    cfg = load_config(REPO / SMOKE, [f"data.source={dataset}", f"runtime.output_dir={tmp_path / 'run'}"])
    Task.enqueue(_step_task_factory("download", cfg, SMOKE, None), queue_name="cpu")
    (original,) = clearml_server.queued_task_ids("cpu")
    recorded = clearml_server.hyperparams(original)
    assert recorded["eval"]["score_threshold"] == "0.5" and recorded["solver"]["base_lr"] == "0.005"
    types = {
        item["name"]: item.get("type") for item in clearml_server.tasks[original]["hyperparams"]["solver"].values()
    }
    assert types["base_lr"] == "float" and types["max_iter"] == "int"

    def clone_with(edits: dict[str, str]) -> str:
        clone = Task.clone(source_task=original, name="download (edited)")
        clone.set_parameters({**clone.get_parameters(), **edits})  # what the UI's edit does
        Task.enqueue(clone, queue_name="cpu")
        clearml_server.start_task(clone.id)
        return str(clone.id)

    def agent_runs(task_id: str) -> subprocess.CompletedProcess[str]:
        script = clearml_server.tasks[task_id]["script"]
        return subprocess.run(
            [sys.executable, "-u", script["entry_point"]],
            cwd=REPO / (script.get("working_dir") or "."),
            env=_env(clearml_server, tmp_path, CLEARML_TASK_ID=task_id, CLEARML_LOG_TASK_TO_BACKEND="0",
                     PYTHONPATH=str(REPO)),
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip

    edited = clone_with({"eval/score_threshold": "0.25"})
    run = agent_runs(edited)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    shown = clearml_server.tasks[edited]["configuration"]["experiment"]["value"]
    assert "score_threshold: 0.25" in shown  # the step ran on the edited value
    assert json.loads(run.stdout[run.stdout.index('{\n  "step"') :])["step"] == "download"

    bad = clone_with({"solver/base_lr": "fast"})
    run = agent_runs(bad)
    assert run.returncode == 2
    assert "solver.base_lr" in run.stderr and "Traceback" not in run.stderr

    # Part 3: a key the step does not know was ignored (agent exit 0); it fails, one line naming it.
    typo = clone_with({"solvr/max_iter": "5000"})
    run = agent_runs(typo)
    assert run.returncode == 2, run.stderr[-3000:]
    (line,) = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert "hyperparameter solvr/max_iter is not part of the d2ops experiment" in line, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert clearml_server.tasks[typo]["status"] == "failed"


def _run_as_agent(server: FakeClearmlServer, tmp_path: Path, task_id: str) -> subprocess.CompletedProcess[str]:
    """The task's script, started as clearml-agent 3.0.3 starts it (Worker.execute: no arguments)."""
    server.start_task(task_id)
    script = server.tasks[task_id]["script"]
    return subprocess.run(
        [sys.executable, "-u", script["entry_point"]],
        cwd=REPO / (script.get("working_dir") or "."),
        env=_env(server, tmp_path, CLEARML_TASK_ID=task_id, CLEARML_LOG_TASK_TO_BACKEND="0", PYTHONPATH=str(REPO)),
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip


@pytest.mark.slow  # 5 s or more on 2 cores: `make test` runs it, `make test-fast` does not
@pytest.mark.timeout(900)
def test_a_clone_of_a_pipeline_train_step_is_a_new_run(clearml_server: FakeClearmlServer, tmp_path: Path) -> None:
    """Part 3: ClearML keeps ``parent`` (the original's controller) on a clone, and the clone took the
    original's run key: with checkpoints mirrored, an edited ``eval/score_threshold`` reused the original's
    finished model without training, and an edited ``solver/base_lr`` failed with CheckpointConflict.
    A clone is a new run; only ``runtime.resume_from`` continues another run."""
    from clearml import Task
    from clearml.automation.job import ClearmlJob

    from d2ops.clearml.controller import _step_task_factory
    from d2ops.data.synthetic import generate_shapes_dataset

    (tmp_path / "clearml.conf").write_text("")
    clearml_server.create_queue("gpu")
    dataset = generate_shapes_dataset(tmp_path / "shapes", counts={"train": 4, "valid": 2, "test": 2})
    mirror = tmp_path / "mirror"
    sets = [
        f"data.source={dataset}",
        f"runtime.output_dir={tmp_path / 'run'}",
        f"clearml.output_uri={mirror}",
        "solver.max_iter=2",
        "solver.checkpoint_period=1",
        "solver.eval_period=0",
        "solver.ims_per_batch=1",
    ]
    cfg = load_config(REPO / SMOKE, sets)
    controller: Any = Task.create(project_name="d2ops/smoke", task_name="smoke pipeline")
    # What PipelineController._launch_node does with the step's base_task_factory (clearml 2.1.12).
    job = ClearmlJob(
        base_task_id=_step_task_factory("train", cfg, SMOKE, None).id,
        parameter_override={"General/dataset_manifest": ""},
        parent=controller.id,
        disable_clone_task=True,
    )
    job.launch(queue_name="gpu")
    original = job.task_id()
    run = _run_as_agent(clearml_server, tmp_path, original)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    runs = mirror / "d2ops" / "smoke" / "smoke" / "checkpoints"
    assert json.loads((runs / controller.id / "d2ops_run.json").read_text())["max_iter"] == 2  # the pipeline's run

    def clone_with(edits: dict[str, str]) -> str:
        clone: Any = Task.clone(source_task=original, name="train (edited)")
        assert clone.parent == controller.id  # what ClearML keeps on a clone
        clone.set_parameters({**clone.get_parameters(), **edits})  # what the UI's edit does
        Task.enqueue(clone, queue_name="gpu")
        return str(clone.id)

    threshold = clone_with({"eval/score_threshold": "0.25"})
    run = _run_as_agent(clearml_server, tmp_path, threshold)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "reusing" not in run.stdout + run.stderr  # it trained, as a new run
    record = json.loads((runs / threshold / "d2ops_run.json").read_text())
    assert record["run_key"] == threshold and record["resumed_from"] is None
    # An edited solver/base_lr (CheckpointConflict) or solver/max_iter (resumed the original at its end) took
    # the same run key; a third training here would add ~40 s on 2 cores for the same check.


def _refusal(read: Any) -> str:
    from d2ops.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        read()
    message = str(caught.value)
    assert "\n" not in message, message  # one line, as the step scripts print it
    return message


def _clone(source: str, edit: Any) -> str:
    """A clone of ``source`` whose hyperparameters the UI edited (``edit`` maps the whole dict to the new one)."""
    from clearml import Task

    clone: Any = Task.clone(source_task=source, name="edited")
    clone.set_parameters(edit(clone.get_parameters()))  # replaces them all, as the UI's edit of a section does
    return str(clone.id)


@pytest.mark.timeout(180)
def test_an_unknown_or_missing_controller_parameter_fails_naming_the_key(
    clearml_server: FakeClearmlServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Part 3: ``Args/solvr/max_iter`` was ignored, and a deleted ``Args/solver/max_iter`` became the schema's
    default (1000) instead of the recorded value; the agent-side start reads the clone (controller_experiment)."""
    import d2ops.clearml.session as session
    from d2ops.clearml.controller import controller_experiment

    template = _template_pipeline(clearml_server)

    def agent_reads(task_id: str) -> Any:
        monkeypatch.setattr(session, "get_remote_task_id", lambda: task_id)
        return controller_experiment()

    assert agent_reads(_clone(template, dict)).solver.max_iter == 30
    typo = _clone(template, lambda params: {**params, "Args/solvr/max_iter": "5000"})
    message = _refusal(lambda: agent_reads(typo))
    assert "hyperparameter Args/solvr/max_iter is not part of the d2ops experiment" in message
    deleted = _clone(template, lambda params: {k: v for k, v in params.items() if k != "Args/solver/max_iter"})
    message = _refusal(lambda: agent_reads(deleted))
    assert "hyperparameter Args/solver/max_iter is missing" in message and "add it back" in message


@pytest.mark.timeout(180)
def test_an_unknown_or_missing_step_parameter_fails_naming_the_key(clearml_server: FakeClearmlServer) -> None:
    """Part 3: the same on a step, whose experiment is in its own sections (solver/..., data/...)."""
    from clearml import Task

    from d2ops.clearml.controller import _step_task_factory
    from d2ops.clearml.step import read_experiment

    cfg = load_config(REPO / SMOKE, ["solver.max_iter=123"])
    template = str(_step_task_factory("train", cfg, SMOKE, None).id)

    def step_reads(task_id: str) -> Any:
        return read_experiment(Task.get_task(task_id=task_id))

    assert step_reads(_clone(template, dict)).solver.max_iter == 123
    typo = _clone(template, lambda params: {**params, "solvr/max_iter": "5000"})
    assert "hyperparameter solvr/max_iter is not part of the d2ops experiment" in _refusal(lambda: step_reads(typo))
    deleted = _clone(template, lambda params: {k: v for k, v in params.items() if k != "solver/max_iter"})
    assert "hyperparameter solver/max_iter is missing" in _refusal(lambda: step_reads(deleted))


@pytest.mark.timeout(180)
def test_the_controller_shows_no_command_line_argument_it_would_ignore(clearml_server: FakeClearmlServer) -> None:
    """Part 3: ClearML's argparse binding recorded ``Args/config``, ``Args/overrides``, ``Args/dataset_uri``,
    ``Args/offline`` and ``Args/local`` on the controller; edits to them changed nothing. Only the experiment
    is shown; the launch config's name is kept as a user property (part 3: steps keep it as General/config)."""
    import argparse

    from clearml import Task

    from d2ops.clearml.hyperparams import EXPERIMENT_SECTIONS

    for queue in ("services", "cpu", "gpu"):
        clearml_server.create_queue(queue)
    # pipelines/run_pipeline.py's arguments, parsed with ClearML imported (its argparse binding is active)
    parser = argparse.ArgumentParser(prog="pipelines/run_pipeline.py")
    for flag in ("--config", "--set", "--dataset-uri"):
        parser.add_argument(flag)
    parser.add_argument("--offline", action="store_true")
    parser.add_argument("--local", action="store_true")
    parser.parse_args(["--config", SMOKE, "--set", "solver.max_iter=30", "--dataset-uri", "s3://h:9000/b/p/"])
    pipe = build_controller(load_config(REPO / SMOKE, ["solver.max_iter=30"]), SMOKE)
    pipe.create_draft()
    params = Task.get_task(task_id=pipe.task.id).get_parameters()
    shown = [key for key in params if key.startswith("Args/") and key.split("/")[1] not in EXPERIMENT_SECTIONS]
    assert shown == []
    assert params["Args/solver/max_iter"] == "30"
    assert params["properties/launch_config"] == SMOKE
