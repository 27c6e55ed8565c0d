"""At launch every input is checked before any transfer, against a real S3 endpoint (moto's server on
127.0.0.1; boto3 is not mocked), and every problem comes in the one message with the config's other errors."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import d2ops.clearml.step as step_module  # before no_clearml_conf: importing d2ops.clearml installs its reader
from d2ops.config import ConfigError, load_config
from d2ops.pipeline.preflight import input_problems, launch_config
from d2ops.storage import credentials as s3_credentials
from d2ops.storage import s3 as storage
from d2ops.storage.local_s3 import LocalS3, local_s3_endpoint

ZOO = "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"


@pytest.fixture(scope="module")
def s3() -> Iterator[LocalS3]:
    with local_s3_endpoint() as endpoint:
        client = storage.make_s3_client(storage.parse_s3_uri(endpoint.uri("data", "")))
        for bucket in ("data", "models", "clearml"):
            client.create_bucket(Bucket=bucket)
        for split in ("train", "valid", "test"):
            client.put_object(Bucket="data", Key=f"shapes/{split}/_annotations.coco.json", Body=b"{}")
        for split in ("train", "validation", "test"):  # a Roboflow export whose val folder is named otherwise
            client.put_object(Bucket="data", Key=f"cells/{split}/_annotations.coco.json", Body=b"{}")
        client.put_object(Bucket="models", Key="init/model_final.pkl", Body=b"weights")
        client.put_object(Bucket="models", Key="configs/custom.yaml", Body=b"MODEL: {}\n")
        yield endpoint


@pytest.fixture(autouse=True)
def no_clearml_conf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the endpoint's environment credentials, never a clearml.conf of the machine."""
    monkeypatch.setattr(s3_credentials, "clearml_credentials", lambda: ())
    monkeypatch.delenv("D2OPS_S3_SECURE", raising=False)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _good(s3: LocalS3) -> dict[str, Any]:
    return {
        "data": {"source": s3.uri("data", "shapes/")},
        "model": {"zoo_config": ZOO, "weights": s3.uri("models", "init/model_final.pkl")},
        "clearml": {"output_uri": s3.uri("clearml", "")},
    }


def test_inputs_that_are_there_pass(s3: LocalS3, tmp_path: Path) -> None:
    cfg = launch_config(_config(tmp_path, _good(s3)))
    assert cfg.model.weights == s3.uri("models", "init/model_final.pkl")
    custom = {**_good(s3), "model": {"config_file": s3.uri("models", "configs/custom.yaml")}}
    assert input_problems(custom) == []
    for split in ("train", "valid", "test"):
        (tmp_path / "data" / split).mkdir(parents=True)
    local = {**_good(s3), "data": {"source": str(tmp_path / "data")}, "inference": {"source": str(tmp_path / "data")}}
    assert input_problems(local) == []


def test_every_missing_input_is_named_in_one_message_with_the_other_errors(s3: LocalS3, tmp_path: Path) -> None:
    raw = {
        "data": {"source": s3.uri("data", "no-such-dataset/")},
        "model": {"zoo_config": ZOO, "weights": s3.uri("models", "init/model_fnal.pkl")},
        "inference": {"source": str(tmp_path / "no-images")},
        "clearml": {"output_uri": s3.uri("no-such-bucket", "clearml")},
        "solver": {"max_iter": 0},
    }
    overrides = ["model.overrides.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAG=256"]
    with pytest.raises(ConfigError) as info:
        launch_config(_config(tmp_path, raw), overrides)
    message = str(info.value)
    assert f"data.source: no objects under {s3.uri('data', 'no-such-dataset/')}" in message
    assert f"model.weights: no object at {s3.uri('models', 'init/model_fnal.pkl')}" in message
    assert f"inference.source: folder {tmp_path / 'no-images'} does not exist" in message
    assert "clearml.output_uri: bucket 'no-such-bucket' does not exist" in message
    assert "solver.max_iter: " in message and "did you mean MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE" in message
    assert message.count("\n  - ") == 6
    missing_file = {"model": {"config_file": str(tmp_path / "missing.yaml")}}
    assert input_problems(missing_file) == [f"model.config_file: file {tmp_path / 'missing.yaml'} does not exist"]


def test_an_unreachable_output_uri_is_named_as_clearml_output_uri(s3: LocalS3, tmp_path: Path) -> None:
    raw = {**_good(s3), "clearml": {"output_uri": f"s3://127.0.0.1:{_closed_port()}/clearml/"}}
    tic = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        launch_config(_config(tmp_path, raw))
    lines = [line for line in str(info.value).splitlines() if line.startswith("  - ")]
    assert len(lines) == 1 and lines[0].startswith("  - clearml.output_uri: cannot reach http://127.0.0.1:")
    assert time.perf_counter() - tic < 30, "a refused connection must not hold the launch"


def test_remote_launch_checks_s3_but_not_the_workers_paths(s3: LocalS3, tmp_path: Path) -> None:
    raw = {**_good(s3), "model": {"zoo_config": ZOO, "weights": "/models/on/the/worker.pkl"}}
    assert launch_config(_config(tmp_path, raw), inputs="s3").model.weights == "/models/on/the/worker.pkl"
    with pytest.raises(ConfigError, match=r"model\.weights: file /models/on/the/worker\.pkl does not exist"):
        launch_config(_config(tmp_path, raw), inputs="all")


def test_a_clearml_dataset_replaces_data_source(s3: LocalS3) -> None:
    raw = {**_good(s3), "data": {"source": s3.uri("data", "gone/"), "dataset_id": "abc123"}}
    assert input_problems(raw) == []


def test_the_pipeline_cli_fails_before_any_step_on_a_missing_input(
    s3: LocalS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from d2ops.cli.pipeline import pipeline_main

    started: list[Any] = []
    monkeypatch.setattr(step_module, "run_offline", lambda *a, **k: started.append(a))
    raw = {**_good(s3), "model": {"zoo_config": ZOO, "weights": s3.uri("models", "nope.pkl")}}
    assert pipeline_main(["--config", str(_config(tmp_path, raw)), "--offline"]) == 2
    assert f"model.weights: no object at {s3.uri('models', 'nope.pkl')}" in capsys.readouterr().err
    assert not started


def test_a_missing_split_is_found_at_launch_with_the_set_lines(s3: LocalS3, tmp_path: Path) -> None:
    """Before any download: one listing of data.source's folders names each split it lacks, the URI
    (not a cache folder) and the exact --set lines; for a local folder the same."""
    cells = s3.uri("data", "cells/")
    raw = {**_good(s3), "data": {"source": cells}}
    with pytest.raises(ConfigError) as info:
        launch_config(_config(tmp_path, raw), ["solver.max_iter=0"])
    lines = [line for line in str(info.value).splitlines() if line.startswith("  - ")]
    assert len(lines) == 2 and lines[0].startswith("  - solver.max_iter: "), "with the config's other errors"
    assert lines[1] == (
        f"  - data.splits.val: the val split folder 'valid' is not in {cells}; fix: add the folder 'valid' to "
        f"{cells} (it has 'test', 'train', 'validation'), or map the split to one of them: "
        "--set data.splits.val=validation, or carve a seeded validation split from train: --set data.val_fraction=0.1"
    )
    for fix in ("data.splits.val=validation", "data.val_fraction=0.1"):
        assert launch_config(_config(tmp_path, raw), [fix]).data.source == cells
    local = tmp_path / "export"
    (local / "train").mkdir(parents=True)
    with pytest.raises(ConfigError) as info:
        launch_config(_config(tmp_path, {**_good(s3), "data": {"source": str(local)}}))
    message = str(info.value)
    assert f"data.splits.val: the val split folder 'valid' is not in {local}; fix: add the folder 'valid'" in message
    assert f"data.splits.test: the test split folder 'test' is not in {local}" in message
    assert "data.val_fraction" not in message.split("data.splits.test")[1], "carving is offered for val only"
    (local / "images" / "train").mkdir(parents=True)
    nested = {"source": f"file://{local}", "splits": {"train": "images/train", "val": "./train", "test": "."}}
    assert launch_config(_config(tmp_path, {**_good(s3), "data": nested})).data.splits["test"] == "."
    nested["splits"]["val"] = "images/val"
    with pytest.raises(ConfigError, match=r"data\.splits\.val: the val split folder 'images/val' is not in file://"):
        launch_config(_config(tmp_path, {**_good(s3), "data": nested}))


def test_a_remote_launch_checks_s3_inputs_on_the_laptop_before_any_task(
    s3: LocalS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``run_pipeline.py --config C`` (remote: controller on services, steps on queues) runs the same launch
    check before the preflight and before any ClearML task: a missing weights object and a missing split
    are named in the one message, and nothing is built or enqueued."""
    import d2ops.clearml.cluster as cluster_module
    import d2ops.clearml.controller as controller_module
    from d2ops.cli.pipeline import pipeline_main

    reached: list[str] = []
    monkeypatch.setattr(cluster_module, "preflight", lambda *a, **k: reached.append("preflight"))
    monkeypatch.setattr(controller_module, "build_controller", lambda *a, **k: reached.append("controller"))
    raw = {**_good(s3), "data": {"source": s3.uri("data", "cells/")}}
    raw["model"] = {"zoo_config": ZOO, "weights": s3.uri("models", "nope.pkl")}
    assert pipeline_main(["--config", str(_config(tmp_path, raw))]) == 2
    err = capsys.readouterr().err
    assert f"model.weights: no object at {s3.uri('models', 'nope.pkl')}" in err
    assert "data.splits.val: the val split folder 'valid' is not in" in err
    assert not reached, "nothing launched"


def test_an_unreachable_checkpoint_mirror_fails_the_train_step_first_naming_clearml_output_uri(
    s3: LocalS3, tmp_path: Path
) -> None:
    """The train step on an agent (launched from a UI clone or a schedule, which skip the laptop's check)
    checks clearml.output_uri before the dataset moves, and names it, not detectron2's first checkpoint."""
    from d2ops.pipeline.steps import StepContext, run_train

    smoke = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
    closed = f"s3://127.0.0.1:{_closed_port()}/clearml"
    cfg = load_config(
        smoke,
        [
            f"data.source={s3.uri('data', 'shapes/')}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"clearml.output_uri={closed}",
        ],
    )
    with pytest.raises(storage.StorageError) as info:
        run_train(StepContext(cfg=cfg, workdir=tmp_path / "train"))
    message = str(info.value)
    assert message.startswith(f"clearml.output_uri ({closed}), where checkpoints are mirrored: cannot reach "), message
    assert "--set clearml.output_uri=s3://host:port/bucket" in message
    assert not (tmp_path / "cache").exists(), "nothing was downloaded"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA device")
def test_a_gpu_config_launched_to_run_here_names_the_device(s3: LocalS3, tmp_path: Path) -> None:
    """The shipped cluster configs say runtime.device: cuda. Launched --offline on a laptop, that is named in
    the one message (not found by the train step after the download); for a remote launch it is the workers'."""
    raw = {**_good(s3), "runtime": {"device": "cuda"}}
    with pytest.raises(ConfigError) as info:
        launch_config(_config(tmp_path, raw), inputs="all")
    lines = [line for line in str(info.value).splitlines() if line.startswith("  - ")]
    assert lines == [
        "  - runtime.device: cuda, but this machine sees no CUDA device and the steps run here: "
        "--set runtime.device=cpu (or auto)"
    ]
    assert launch_config(_config(tmp_path, raw), inputs="s3").runtime.device == "cuda"
    many = {**_good(s3), "runtime": {"device": "auto", "num_gpus": 4}}
    with pytest.raises(ConfigError, match=r"runtime\.num_gpus: 4, but this machine sees no CUDA device"):
        launch_config(_config(tmp_path, many))
