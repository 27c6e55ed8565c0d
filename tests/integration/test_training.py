"""Real (tiny) detectron2 training runs: metrics through the writer, divergence, a retried step resuming from S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from d2ops.config import load_config
from d2ops.reporting import RecordingReporter

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "configs" / "smoke.yaml")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from d2ops.data.synthetic import generate_shapes_dataset

    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), counts={"train": 8, "valid": 4, "test": 4})


def _cfg(dataset: Path, *overrides: str):  # type: ignore[no-untyped-def]
    return load_config(SMOKE, [f"data.source={dataset}", "solver.eval_period=0", *overrides])


@pytest.mark.slow
def test_diverged_run_fails_with_advice(dataset: Path, tmp_path: Path) -> None:
    from d2ops.data.registration import register_splits
    from d2ops.engine.trainer import TrainingDiverged, train

    cfg = _cfg(dataset, "solver.base_lr=1000", "solver.warmup_iters=0", "solver.max_iter=40")
    with pytest.raises(TrainingDiverged, match=r"NaN/inf at iteration \d+\. Lower solver.base_lr"):
        train(cfg, register_splits(dataset, cfg.data), tmp_path / "out", resume=False)
    assert not (tmp_path / "out" / "model_final.pth").exists()


class _Preempted(RuntimeError):
    pass


@pytest.mark.slow
def test_a_retried_pipeline_step_resumes_its_own_checkpoints_from_s3(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Attempt 1 of a pipeline's train step dies after its checkpoint at iteration 2 reached S3; the retry
    (same pipeline run, so the same run key; another machine, so another local folder) continues it."""
    import logging

    from detectron2.engine import HookBase

    from d2ops.data.registration import register_splits
    from d2ops.engine.checkpoints import new_run_record
    from d2ops.engine.trainer import Trainer, train
    from d2ops.storage.local_s3 import local_s3_endpoint

    class DieAtIteration4(HookBase):
        def after_step(self) -> None:
            if self.trainer.iter == 4:
                raise _Preempted("the spot instance went away")

    real_hooks = Trainer.build_hooks
    monkeypatch.setattr(Trainer, "build_hooks", lambda self: [*real_hooks(self), DieAtIteration4()])
    with local_s3_endpoint() as s3:
        import boto3

        boto3.client("s3", endpoint_url=s3.endpoint_url).create_bucket(Bucket="ckpt")
        cfg = _cfg(dataset, "solver.max_iter=6", "solver.checkpoint_period=3")
        run = new_run_record(cfg, "data-v1", run_key="pipeline-run-7")  # what run_train passes inside a pipeline
        uri = s3.uri("ckpt", f"d2ops/smoke/smoke/checkpoints/{run.run_key}")
        reporter = RecordingReporter()
        with pytest.raises(_Preempted):
            train(
                cfg, register_splits(dataset, cfg.data), tmp_path / "a", reporter=reporter, checkpoint_uri=uri, run=run
            )
        series = {s for _, s, _, _ in reporter.scalars}
        assert {"total_loss", "loss_cls", "lr", "time", "data_time"} <= series
        assert "detectron2" in reporter.configurations

        monkeypatch.setattr(Trainer, "build_hooks", real_hooks)
        with caplog.at_level(logging.INFO, logger="d2ops"):
            retry = train(cfg, register_splits(dataset, cfg.data), tmp_path / "b", checkpoint_uri=uri, run=run)
        assert (retry.start_iter, retry.iterations, retry.resumed_checkpoint) == (3, 3, "model_0000002.pth")
        assert retry.resumed_from is None and retry.reused is False  # its own run: nothing for the lineage
        assert (tmp_path / "b" / "model_final.pth").is_file()
        assert "resuming this run's own checkpoint" in caplog.text
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "resum" in r.getMessage()]


def _fresh_process_env(**extra: str) -> dict[str, str]:
    """This process's environment without ClearML's master-process marker, which earlier in-process
    sessions leave behind and which would make the child's Task.init return a stub."""
    env = {k: v for k, v in os.environ.items() if k not in {"CLEARML_PROC_MASTER_ID", "TRAINS_PROC_MASTER_ID"}}
    return {**env, **extra}


@pytest.mark.slow  # 5 s or more on 2 cores: `make test` runs it, `make test-fast` does not
def test_bad_data_stops_the_download_step_with_a_report(dataset: Path, tmp_path: Path) -> None:
    """tasks/download.py, offline, on a dataset with a box outside its image: exit 2, a readable report."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    ann_file = broken / "train" / "_annotations.coco.json"
    coco = json.loads(ann_file.read_text())
    coco["annotations"][0]["bbox"] = [100, 100, 90, 90]
    ann_file.write_text(json.dumps(coco))
    proc = subprocess.run(
        [
            sys.executable,
            "tasks/download.py",
            "--config",
            SMOKE,
            "--offline",
            "--dataset-uri",
            str(broken),
            "--set",
            f"runtime.output_dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=_fresh_process_env(CLEARML_CACHE_DIR=str(tmp_path / "clearml")),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Dataset validation failed" in proc.stderr
    assert f"annotation id {coco['annotations'][0]['id']}" in proc.stderr
    assert "fix:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "dataset_manifest.json").exists()
