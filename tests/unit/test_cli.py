"""The task scripts' argument handling, including how they start on a clearml-agent."""

from __future__ import annotations

from typing import Any

import pytest

from d2ops.cli import main
from d2ops.cli.steps import step_main


def _capture_run_step(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    import d2ops.cli.steps as step_module  # where step_main finds run_step
    import d2ops.pipeline.runner as pipeline

    seen: dict[str, Any] = {}

    def record(step: str, params: dict[str, Any], *, mode: str, queue: str | None = None) -> Any:
        seen.update(step=step, params=params, mode=mode, queue=queue)
        return pipeline.StepResult(step, "task-id", {}, {})

    monkeypatch.setattr(step_module, "run_step", record)
    return seen


def test_on_an_agent_the_script_starts_without_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """clearml-agent runs tasks/<step>.py bare; the experiment and inputs then come from the task."""
    import d2ops.cli.steps as step_module

    monkeypatch.setattr(step_module, "on_agent", lambda: True)
    seen = _capture_run_step(monkeypatch)
    assert step_main("evaluate", []) == 0
    assert seen["params"] == {"config": "", "overrides": "", "weights": "", "d2_config": ""}
    assert seen["mode"] == "local"


def test_locally_the_config_is_required_and_checked_first(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = _capture_run_step(monkeypatch)
    with pytest.raises(SystemExit):
        step_main("train", [])
    assert step_main("train", ["--config", "configs/smoke.yaml", "--set", "solver.nope=1"]) == 2
    assert "solver.nope: unknown key" in capsys.readouterr().err
    assert not seen, "no ClearML task may be created for a bad config"


def test_remote_flags_and_inputs_reach_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    import d2ops.pipeline.preflight as preflight

    monkeypatch.setattr(preflight, "input_problems", lambda raw, local_paths: [])  # minio:9000 is not here
    monkeypatch.setattr(preflight, "split_problems", lambda data, local_paths: [])
    seen = _capture_run_step(monkeypatch)
    argv = [
        "--config", "configs/smoke.yaml", "--remote", "--queue", "gpu-a100",
        "--weights", "s3://minio:9000/models/model_final.pth", "--d2-config", "/tmp/config.yaml",
        "--dataset-uri", "s3://minio:9000/data/shapes/", "--set", "solver.max_iter=10",
    ]  # fmt: skip
    assert step_main("infer", argv) == 0
    assert seen["mode"] == "remote" and seen["queue"] == "gpu-a100"
    assert seen["params"]["weights"] == "s3://minio:9000/models/model_final.pth"
    assert seen["params"]["overrides"] == "solver.max_iter=10 data.source=s3://minio:9000/data/shapes/"


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "usage: d2ops" in capsys.readouterr().err


def test_a_detectron2_key_typo_fails_the_step_launch_with_the_closest_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = _capture_run_step(monkeypatch)
    argv = ["--config", "configs/smoke.yaml", "--set", "model.overrides.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAG=256"]
    assert step_main("download", argv) == 2
    assert "did you mean MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE" in capsys.readouterr().err
    assert not seen, "no ClearML task may be created for a bad config"


def test_the_pipeline_reports_every_config_mistake_before_anything_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import d2ops.cli.pipeline as step_module  # where pipeline_main finds run_offline
    from d2ops.cli.pipeline import pipeline_main

    started: list[Any] = []
    monkeypatch.setattr(step_module, "run_offline", lambda *a, **k: started.append(a))
    argv = [
        "--config", "configs/smoke.yaml", "--offline", "--set", "model.overrides.SOLVER.BASE_LRR=0.1",
        "--set", "solver.max_iter=2", "--set", "solver.steps=[5]", "--set", "model.weights=None",
    ]  # fmt: skip
    assert pipeline_main(argv) == 2
    err = capsys.readouterr().err
    assert "did you mean SOLVER.BASE_LR" in err and "--set solver.steps=[]" in err
    assert not started


#: Run in a fresh interpreter, so that what importing each command prints (third-party warnings) is seen: every
#: command's --help, and each sub-command's its usage line offers (`{a,b,...}` right after the options).
_WALK = r"""
import contextlib, io, json, re, sys
from d2ops.cli import COMMANDS, main

todo, seen = [[c.name] for c in COMMANDS], []
while todo:
    argv = todo.pop(0)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([*argv, "--help"])
        except SystemExit as exit:
            code = exit.code
    usage = out.getvalue().split("\n\n")[0]
    sub = re.search(r"\]\s+\{([\w,-]+)\}", usage)
    todo += [[*argv, name] for name in (sub.group(1).split(",") if sub else [])]
    seen.append({"argv": argv, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(seen))
"""


@pytest.mark.slow  # imports every command's code (torch, detectron2, ClearML) in a fresh interpreter
def test_every_commands_help_exits_0_names_its_program_and_prints_no_warning() -> None:
    import json
    import subprocess
    import sys

    from d2ops.cli import COMMANDS, STEP_NAMES
    from d2ops.cli.export import RUNTIME_TARGETS

    walked = json.loads(
        subprocess.run([sys.executable, "-c", _WALK], capture_output=True, text=True, check=True).stdout
    )
    helped = {" ".join(entry["argv"]): entry for entry in walked}
    expected = {
        *(c.name for c in COMMANDS),
        *(f"step {s}" for s in STEP_NAMES),
        *(f"export {t}" for t in (*RUNTIME_TARGETS, "triton", "nuclio")),
        "schedule cron",
        "schedule on-data",
        "serving register",
    }
    assert expected <= set(helped), f"help not reached for {sorted(expected - set(helped))}"
    for command, entry in helped.items():
        assert entry["code"] == 0, (command, entry["stderr"])
        assert entry["stdout"].startswith(f"usage: d2ops {command} "), (command, entry["stdout"][:200])
        assert entry["stderr"] == "", (command, entry["stderr"])
    top = subprocess.run([sys.executable, "-m", "d2ops", "--help"], capture_output=True, text=True, check=True).stdout
    assert all(f"    {c.name} " in top for c in COMMANDS), top
