"""pipelines/run_pipeline.py --offline as a user runs it: a local dataset folder, a failing gate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


#: Stand-in credentials: any of them appearing in a file the run leaves behind is a leak.
SENTINELS = {
    "AWS_ACCESS_KEY_ID": "D2OPSSENTINELKEY7F3A",
    "AWS_SECRET_ACCESS_KEY": "d2ops-sentinel-secret-9c1e5b",
    "CLEARML_API_ACCESS_KEY": "D2OPSSENTINELCLEARMLKEY",
    "CLEARML_API_SECRET_KEY": "d2ops-sentinel-clearml-secret-41d2",
    "D2OPS_SERVE_TOKEN": "d2ops-sentinel-token-77aa",
}


def _leaks(root: Path) -> list[str]:
    """Every file (and zip member) under ``root`` that contains a sentinel value."""
    hits = []
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        blobs = [(str(path), path.read_bytes())]
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                blobs += [(f"{path}!{name}", archive.read(name)) for name in archive.namelist()]
        for where, blob in blobs:
            hits += [f"{name} in {where}" for name, value in SENTINELS.items() if value.encode() in blob]
    return hits


def test_offline_pipeline_from_s3_with_a_failing_gate_leaks_no_credentials(tmp_path: Path) -> None:
    """The offline pipeline script as a user runs it, with sentinel credentials in its environment:
    data and checkpoints on a real local S3 endpoint, a quality gate that fails. Afterwards no
    session file, zip, log, artifact, output or uploaded object contains any of them."""
    import boto3

    from d2ops import storage
    from d2ops.datasets import generate_shapes_dataset
    from d2ops.s3server import local_s3_endpoint

    data = generate_shapes_dataset(tmp_path / "data", counts={"train": 8, "valid": 4, "test": 4})
    env = {k: v for k, v in os.environ.items() if k not in {"CLEARML_PROC_MASTER_ID", "TRAINS_PROC_MASTER_ID"}}
    env.update(SENTINELS, CLEARML_CACHE_DIR=str(tmp_path / "clearml"))
    with local_s3_endpoint() as s3:
        uri = s3.uri("sentinel", "datasets/shapes/")
        storage.upload(data, uri, create_bucket=True, progress=False)
        proc = subprocess.run(
            [
                sys.executable, "pipelines/run_pipeline.py", "--offline",
                "--config", "configs/smoke.yaml",
                "--dataset-uri", uri,
                "--set", "solver.max_iter=4",
                "--set", "solver.checkpoint_period=2",
                "--set", "solver.eval_period=0",
                "--set", f"runtime.output_dir={tmp_path / 'run'}",
                "--set", f"data.cache_dir={tmp_path / 'cache'}",
                "--set", f"clearml.output_uri={s3.uri('sentinel', 'runs')}",
                "--set", "registry.quality_gate={metric: bbox.AP50, min_value: 99.5}",
            ],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        client = boto3.client("s3", endpoint_url=s3.endpoint_url)
        uploaded = [o["Key"] for o in client.list_objects_v2(Bucket="sentinel", Prefix="runs/").get("Contents", [])]
        for key in uploaded:
            body = client.get_object(Bucket="sentinel", Key=key)["Body"].read()
            assert not [n for n, v in SENTINELS.items() if v.encode() in body], f"credential in s3 object {key}"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(key.endswith("last_checkpoint") for key in uploaded), uploaded  # checkpoints went to S3

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
    assert uri in train_params["overrides"]["value"]

    # The secrets scan: sessions, their zips and logs, outputs, the download cache, the console.
    assert (tmp_path / "clearml" / "offline").is_dir() and len(list((tmp_path / "clearml").rglob("*"))) > 20
    leaks = _leaks(tmp_path / "clearml") + _leaks(tmp_path / "run") + _leaks(tmp_path / "cache")
    leaks += [f"{n} on the console" for n, v in SENTINELS.items() if v in proc.stdout + proc.stderr]
    assert leaks == []


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
