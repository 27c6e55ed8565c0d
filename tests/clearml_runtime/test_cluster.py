"""Cluster preflight: queues without workers, the MinIO traps, and step time limits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from d2ops.clearml.cluster import queue_warnings, step_docker_args, storage_warnings
from d2ops.config import load_config
from d2ops.pipeline.runner import StepTimeLimitExceeded, step_time_limit
from d2ops.storage import s3 as storage
from d2ops.utils.offline_session import session_file

REPO = Path(__file__).resolve().parents[2]
WANTED = {"controller": "services", "download": "cpu", "train": "gpu", "evaluate": "gpu", "register": "cpu"}
QUEUES = [{"id": "q1", "name": "services"}, {"id": "q2", "name": "cpu"}, {"id": "q3", "name": "gpu"}]


def test_all_queues_served_gives_no_warning() -> None:
    workers = [{"id": "w-gpu", "queues": ["q3"]}, {"id": "w-cpu", "queues": [{"id": "q2"}, {"id": "q1"}]}]
    assert queue_warnings(WANTED, QUEUES, workers) == []


def test_a_queue_without_a_worker_is_named_with_the_steps_that_would_hang() -> None:
    workers = [{"id": "w-cpu", "queues": ["q2", "q1"]}]
    [problem] = queue_warnings(WANTED, QUEUES, workers)
    assert "no clearml-agent serves queue 'gpu' (evaluate, train)" in problem
    assert "Pending" in problem and "clearml-agent daemon --queue gpu --docker" in problem


def test_a_missing_queue_and_an_unserved_services_queue() -> None:
    problems = queue_warnings(WANTED, QUEUES[1:], [{"id": "w", "queues": ["q2", "q3"]}])
    assert problems == [
        "queue 'services' (controller) does not exist on the ClearML server: create it "
        "(scripts/cluster-setup.sh does) or point clearml.queues at an existing queue"
    ]
    problems = queue_warnings(WANTED, QUEUES, [{"id": "w", "queues": ["q2", "q3"]}])
    assert len(problems) == 1 and "--services-mode" in problems[0]


def test_minio_host_without_a_port_and_secure_mismatch_are_reported() -> None:
    cfg = load_config(
        "configs/demo.yaml",
        ["data.source=s3://minio.example.com/datasets/shapes/", "clearml.output_uri=s3://10.0.0.5:9000/models"],
    )
    entries = [
        {"host": "minio.example.com:9000", "key": "k", "secret": "s", "secure": False},
        {"host": "https://10.0.0.5", "key": "k", "secret": "s", "secure": False},
    ]
    problems = "\n".join(storage_warnings(cfg, entries))
    assert "'minio.example.com' has no port, so it is read as an AWS bucket" in problems
    assert "s3://minio.example.com:9000/..." in problems
    assert "host 'https://10.0.0.5' has no port" in problems
    assert "says https but secure: false" in problems
    assert "k" not in {word.strip("'\",:") for word in problems.split()}  # keys never echoed


def test_a_well_formed_minio_setup_has_no_storage_warning() -> None:
    cfg = load_config("configs/demo.yaml", ["data.source=s3://minio:9000/datasets/shapes/"])
    assert storage_warnings(cfg, [{"host": "minio:9000", "key": "k", "secret": "s", "secure": False}]) == []


def test_https_against_a_plain_http_endpoint_fails_fast_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from d2ops.storage.local_s3 import local_s3_endpoint

    (tmp_path / "a.txt").write_text("x")
    with local_s3_endpoint() as s3:
        uri = s3.uri("tls-check", "data/")
        storage.upload(tmp_path, uri, create_bucket=True, progress=False)
        monkeypatch.setenv("D2OPS_S3_SECURE", "1")  # as `secure: true` in clearml.conf would
        tic = time.perf_counter()
        with pytest.raises(storage.StorageError) as err:
            storage.download(uri, tmp_path / "out", progress=False)
        elapsed = time.perf_counter() - tic
    message = str(err.value)
    assert "TLS handshake with https://127.0.0.1" in message and "speaks plain http" in message
    assert "secure: false" in message
    assert elapsed < 10  # not retried: a scheme mismatch does not heal
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_docker_args_keep_the_users_and_add_the_agent_environment() -> None:
    cfg = load_config("configs/demo.yaml", ["clearml.steps.train.docker_args=--shm-size=8g"])
    assert step_docker_args(cfg, "train") == "--shm-size=8g -e CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL=1"
    assert step_docker_args(cfg, "download") == "--ipc=host -e CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL=1"


def test_credentials_in_step_docker_args_are_rejected() -> None:
    from d2ops.config import ConfigError

    with pytest.raises(ConfigError, match="docker_args: docker arguments must not carry credentials") as err:
        load_config("configs/demo.yaml", ["clearml.steps.train.docker_args=-e AWS_SECRET_ACCESS_KEY=abc"])
    assert "abc" not in str(err.value)


def test_step_time_limit_interrupts_the_step() -> None:
    tic = time.perf_counter()
    expected = r"train ran past its time limit of 0\.005 min"
    with pytest.raises(StepTimeLimitExceeded, match=expected), step_time_limit("train", 0.005):
        while time.perf_counter() - tic < 10:
            sum(range(1000))
    assert time.perf_counter() - tic < 2
    with step_time_limit("train", 0.005):  # a step that finishes in time is untouched
        pass
    time.sleep(0.5)  # and the timer is gone afterwards


@pytest.mark.slow
def test_a_step_past_its_time_limit_fails_with_the_reason(tmp_path: Path) -> None:
    from d2ops.data.synthetic import generate_shapes_dataset

    data = generate_shapes_dataset(tmp_path / "data", counts={"train": 4, "valid": 2, "test": 2})
    env = {k: v for k, v in os.environ.items() if k not in {"CLEARML_PROC_MASTER_ID", "TRAINS_PROC_MASTER_ID"}}
    env["CLEARML_CACHE_DIR"] = str(tmp_path / "clearml")
    proc = subprocess.run(
        [
            sys.executable, "tasks/train.py", "--offline", "--config", "configs/smoke.yaml",
            "--set", f"data.source={data}",
            "--set", f"runtime.output_dir={tmp_path / 'run'}",
            "--set", "solver.max_iter=100000",
            "--set", "clearml.steps.train.time_limit_min=0.1",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train ran past its time limit of 0.1 min" in proc.stderr
    assert "Traceback" not in proc.stderr.split("error:")[-1]
    [session] = list((tmp_path / "clearml" / "offline").glob("*.zip"))  # the session d2ops keeps: its zip
    task = json.loads(session_file(session, "task.json") or b"{}")
    assert not (tmp_path / "run" / "train" / "model_final.pth").exists()
    assert task.get("name") == "train"


def test_a_retrying_train_step_without_output_uri_is_warned_about() -> None:
    from d2ops.clearml.cluster import resume_warnings

    [warning] = resume_warnings(load_config("configs/demo.yaml"))
    assert "clearml.output_uri is not set" in warning and "default_output_uri" in warning
    assert resume_warnings(load_config("configs/demo.yaml", ["clearml.output_uri=s3://minio:9000/models"])) == []
    assert resume_warnings(load_config("configs/demo.yaml", ["clearml.steps.train.retries=0"])) == []


def test_download_says_when_the_data_changed_since_the_cache_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The controller keyed the cached step on the data it listed at launch; newer data is used and said."""
    import logging

    from d2ops.data.synthetic import generate_shapes_dataset
    from d2ops.pipeline.steps import StepContext, run_download

    data = generate_shapes_dataset(tmp_path / "data", counts={"train": 2, "valid": 1, "test": 1})
    cfg = load_config("configs/smoke.yaml", [f"data.source={data}"])
    identity = storage.remote_identity(str(data))
    with caplog.at_level(logging.WARNING, logger="d2ops.pipeline.steps"):
        out = run_download(StepContext(cfg=cfg, workdir=tmp_path / "run", inputs={"dataset_identity": identity}))
        assert not [r for r in caplog.records if "changed between launch and download" in r.message]
        out = run_download(StepContext(cfg=cfg, workdir=tmp_path / "run", inputs={"dataset_identity": "0" * 64}))
    assert [r for r in caplog.records if "changed between launch and download" in r.message]
    assert out.values["identity"] == identity  # the data actually downloaded is what is recorded
