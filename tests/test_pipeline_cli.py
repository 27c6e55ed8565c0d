"""pipelines/run_pipeline.py --offline as a user runs it: a local dataset folder, a failing gate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_offline_pipeline_script_with_a_failing_quality_gate(tmp_path: Path) -> None:
    from d2ops.datasets import generate_shapes_dataset

    data = generate_shapes_dataset(tmp_path / "data", counts={"train": 8, "valid": 4, "test": 4})
    env = {k: v for k, v in os.environ.items() if k not in {"CLEARML_PROC_MASTER_ID", "TRAINS_PROC_MASTER_ID"}}
    env["CLEARML_CACHE_DIR"] = str(tmp_path / "clearml")
    proc = subprocess.run(
        [
            sys.executable, "pipelines/run_pipeline.py", "--offline",
            "--config", "configs/smoke.yaml",
            "--dataset-uri", str(data),
            "--set", "solver.max_iter=4",
            "--set", "solver.eval_period=0",
            "--set", f"runtime.output_dir={tmp_path / 'run'}",
            "--set", "registry.quality_gate={metric: bbox.AP50, min_value: 99.5}",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    sessions = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert list(sessions) == ["download", "train", "evaluate", "infer", "register"]
    register = Path(sessions["register"])
    record = json.loads(next(register.glob("data/**/artifacts/model_registration/*.json")).read_text())
    assert record["publish_requested"] is False and record["published"] is False
    task = json.loads((register / "task.json").read_text())
    assert "quality gate failed" in task["offline_output_models"][0]["init"]["comment"]
    # The overrides reached every step's connected parameters (and so the ClearML UI).
    train_params = json.loads((Path(sessions["train"]) / "task.json").read_text())["hyperparams"]["General"]
    assert "solver.max_iter=4" in train_params["overrides"]["value"]
    assert str(data) in train_params["overrides"]["value"]


def test_bad_config_key_fails_before_any_session(tmp_path: Path) -> None:
    env = {**os.environ, "CLEARML_CACHE_DIR": str(tmp_path / "clearml")}
    proc = subprocess.run(
        [sys.executable, "pipelines/run_pipeline.py", "--offline", "--set", "solver.max_iters=5"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "solver.max_iters: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "clearml" / "offline").exists()
