"""The remote PipelineController, built offline with the real ClearML SDK and inspected.

Everything a cluster run depends on is read back from the built controller: queues, images,
docker arguments, cache flags and the cache key, retries, polling, monitors, and the flat
experiment the controller and every step carry. What ClearML's own runtime code does with
them (the daemon loop, job polling, clones) is in tests/clearml_runtime/.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from d2ops.clearml.controller import (
    build_controller,
    dataset_identity_for,
    download_cache_key,
    monitor_metrics,
)
from d2ops.clearml.hyperparams import experiment_from_parameters
from d2ops.clearml.session import enable_offline
from d2ops.config import load_config
from d2ops.pipeline.steps import STEP_INPUTS, STEPS

CONFIG = "configs/demo.yaml"
OVERRIDES = [
    "solver.max_iter=500",
    "clearml.queues.train=gpu-a100",
    "clearml.steps.evaluate.docker_image=d2ops/eval:1.2",
    "clearml.steps.train.retries=3",
    "clearml.steps.train.time_limit_min=90",
]


def _close_controller_task() -> None:
    from clearml import Task

    controller_task = Task.current_task()
    if controller_task is not None:
        controller_task.close()


@pytest.fixture(scope="module")
def dag(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    enable_offline(tmp_path_factory.mktemp("clearml"))
    cfg = load_config(CONFIG, OVERRIDES)
    pipe = build_controller(cfg, CONFIG)
    yield {"pipe": pipe, "nodes": pipe.get_pipeline_dag(), "cfg": cfg}
    # The controller owns this process's main task; close it so later sessions can start.
    _close_controller_task()


def _resolved(pipe: Any, node: Any) -> dict[str, str]:
    """The step's parameters exactly as the controller resolves them at launch
    (upstream artifact references need finished upstream jobs, so they are left out here)."""
    return {key: pipe._parse_step_ref(value) for key, value in node.parameters.items() if "artifacts" not in value}


def test_every_step_is_a_node_with_the_right_parents(dag: dict[str, Any]) -> None:
    nodes = dag["nodes"]
    assert list(nodes) == list(STEPS)
    assert not nodes["download"].parents
    assert nodes["train"].parents == ["download"]
    assert nodes["evaluate"].parents == ["train"]
    assert nodes["infer"].parents == ["train"]
    assert set(nodes["register"].parents) == {"download", "train", "evaluate"}


def test_gpu_steps_go_to_gpu_queues_and_the_rest_to_cpu(dag: dict[str, Any]) -> None:
    nodes, cfg = dag["nodes"], dag["cfg"]
    queues = {step: nodes[step].queue for step in STEPS}
    assert queues == {"download": "cpu", "train": "gpu-a100", "evaluate": "gpu", "infer": "gpu", "register": "cpu"}
    assert cfg.clearml.queues.controller == "services"


def test_each_step_image_and_docker_arguments_come_from_config(dag: dict[str, Any]) -> None:
    nodes, cfg = dag["nodes"], dag["cfg"]
    for step in STEPS:
        image = nodes[step].task_overrides["container.image"]
        assert image == ("d2ops/eval:1.2" if step == "evaluate" else cfg.clearml.docker_image)
        args = shlex.split(nodes[step].task_overrides["container.arguments"])
        assert "--ipc=host" in args
        # The agent runs the image's own Python: no venv, no reinstall of torch / detectron2.
        assert args[args.index("CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL=1") - 1] == "-e"


def test_the_controller_task_runs_in_the_configured_image(dag: dict[str, Any]) -> None:
    """Defect: the controller relied on the services agent's default image (which lacks d2ops)."""
    container = dag["pipe"].task.get_base_docker()
    assert container.startswith(dag["cfg"].clearml.docker_image)
    assert "CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL=1" in container


def test_pipeline_parameters_are_the_whole_experiment_flat_and_typed(dag: dict[str, Any]) -> None:
    """The controller's Args/ hold every config key, one per hyperparameter, so runs compare and clone."""
    params = dag["pipe"].get_parameters()
    assert params["solver/max_iter"] == "500"
    assert params["solver/base_lr"] == str(dag["cfg"].solver.base_lr)
    assert params["data/source"] == dag["cfg"].data.source
    assert params["clearml/steps/train/retries"] == "3"
    assert experiment_from_parameters(params) == dag["cfg"]
    assert dag["pipe"]._pipeline_args_type["solver/base_lr"] == "float"


def test_step_parameters_carry_the_experiment_and_upstream_artifacts(dag: dict[str, Any]) -> None:
    nodes, cfg = dag["nodes"], dag["cfg"]
    for step in STEPS:
        override = nodes[step].parameters
        assert experiment_from_parameters(_resolved(dag["pipe"], nodes[step])) == cfg
        assert override["General/config"] == CONFIG  # where the values came from; not read again
        for name, (src, artifact) in STEP_INPUTS[step].items():
            assert override[f"General/{name}"] == f"${{{src}.artifacts.{artifact}.url}}"
    assert nodes["evaluate"].parameters["General/weights"] == "${train.artifacts.weights.url}"


def test_only_the_download_step_is_cached_and_keyed_on_the_dataset(dag: dict[str, Any]) -> None:
    pipe, nodes = dag["pipe"], dag["nodes"]
    cached = {name for name, node in nodes.items() if node.cache_executed_step}
    assert cached == {"download"}
    assert pipe._pre_step_callbacks == {"download": download_cache_key}


def test_gpu_steps_retry_and_no_step_has_a_clearml_time_limit(dag: dict[str, Any]) -> None:
    """ClearML's own node time_limit crashes clearml 2.1.12's controller while the step is queued
    (clearml/clearml#1640); each step enforces its own limit instead (d2ops.clearml.step)."""
    pipe, nodes = dag["pipe"], dag["nodes"]
    retries = {step: pipe._retries_callbacks[step].keywords["max_retries"] for step in STEPS}
    assert retries == {"download": 0, "train": 3, "evaluate": 2, "infer": 2, "register": 0}
    assert all(not nodes[step].timeout for step in STEPS)
    assert set(pipe._status_change_callbacks) == set(STEPS)


def test_the_pipeline_page_monitors_headline_metrics_and_the_model(dag: dict[str, Any]) -> None:
    nodes = dag["nodes"]
    assert [pair[0] for pair in nodes["evaluate"].monitor_metrics] == [
        ("headline", "bbox/AP"),
        ("headline", "bbox/AP50"),
        ("headline", "f2"),
    ]
    assert nodes["evaluate"].monitor_metrics == monitor_metrics(dag["cfg"])["evaluate"]
    assert nodes["register"].monitor_models == [dag["cfg"].registry.model_name]
    assert nodes["train"].monitor_metrics == [] and nodes["train"].monitor_models == []
    # F-beta follows eval.f_beta: the evaluation reports f0.5 when beta is 0.5.
    half = monitor_metrics(load_config(CONFIG, ["eval.f_beta=0.5"]))["evaluate"][2]
    assert half == (("headline", "f0.5"), ("evaluate", "F0.5"))


def test_controller_polls_every_two_seconds_by_default(dag: dict[str, Any], tmp_path: Path) -> None:
    assert dag["pipe"]._pool_frequency == pytest.approx(2.0)  # seconds; ClearML's default is 12
    assert load_config(CONFIG).clearml.pool_frequency_s <= 2.0


def test_no_credentials_in_pipeline_parameters(dag: dict[str, Any]) -> None:
    nodes = {name: (node.parameters, node.task_overrides) for name, node in dag["nodes"].items()}
    text = repr(dag["pipe"].get_parameters()) + repr(nodes)
    for word in ("AWS_SECRET", "secret_key", "aws_access_key_id", "d2ops-local-secret"):
        assert word.lower() not in text.lower()


def test_cache_key_follows_the_data_not_the_run(dag: dict[str, Any], tmp_path: Path) -> None:
    """New objects change the download step's ClearML cache hash; unchanged data keeps it."""
    from clearml.automation.job import ClearmlJob

    from d2ops.storage import s3 as storage
    from d2ops.storage.local_s3 import local_s3_endpoint

    pipe, node = dag["pipe"], dag["nodes"]["download"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("one")
    with local_s3_endpoint() as s3:
        uri = s3.uri("cache-key", "shapes/")
        storage.upload(tmp_path / "data", uri, create_bucket=True, progress=False)

        def launch_hash() -> tuple[str, str]:
            params = {**_resolved(pipe, node), "data/source": uri}
            assert download_cache_key(pipe, node, params) is True
            return params["General/dataset_identity"], ClearmlJob._create_task_hash(pipe._task, params_override=params)

        first, again = launch_hash(), launch_hash()
        (tmp_path / "data" / "b.txt").write_text("two")
        storage.upload(tmp_path / "data", uri, progress=False)
        changed = launch_hash()
    assert first == again
    assert changed[0] != first[0] and changed[1] != first[1]
    # A ClearML dataset version is its own identity: no listing needed.
    assert dataset_identity_for(load_config(CONFIG, ["data.dataset_id=abc123"])) == "clearml-dataset:abc123"


def test_step_task_records_the_image_packages_and_entry_point(dag: dict[str, Any]) -> None:
    """The template task each step launches from, as ClearML would create it (dry run)."""
    from clearml.backend_interface.task.populate import CreateAndPopulate

    from d2ops.clearml.cluster import DETECTRON2_REQUIREMENT, IMAGE_TORCH, IMAGE_TORCHVISION, step_task_spec

    spec = step_task_spec("evaluate", dag["cfg"])
    task = CreateAndPopulate(**spec, raise_on_missing_entries=True).create_task(dry_run=True)
    assert task["script"]["entry_point"] == "tasks/evaluate.py"
    assert task["script"]["working_dir"] == "."
    packages = task["script"]["requirements"]["pip"].splitlines()
    assert f"torch=={IMAGE_TORCH}" in packages and f"torchvision=={IMAGE_TORCHVISION}" in packages
    assert DETECTRON2_REQUIREMENT in packages
    assert any(p.startswith("clearml") for p in packages) and any(p.startswith("boto3") for p in packages)
    assert not any(p.startswith("moto") for p in packages)
    assert task["container"]["image"] == "d2ops/eval:1.2"
    assert "CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL=1" in task["container"]["arguments"]
    assert task["type"] == "testing"


def test_image_pins_match_the_dockerfile() -> None:
    """The packages tasks record are the ones docker/Dockerfile really installs."""
    from d2ops.clearml.cluster import DETECTRON2_COMMIT, IMAGE_TORCH, IMAGE_TORCHVISION

    dockerfile = (Path(__file__).resolve().parents[2] / "docker" / "Dockerfile").read_text()
    assert f"ARG DETECTRON2_COMMIT={DETECTRON2_COMMIT}" in dockerfile
    assert f"pytorch/pytorch:{IMAGE_TORCH}-" in dockerfile
    # torchvision is the release paired with that torch (2.5 -> 0.20).
    minor = int(IMAGE_TORCH.split(".")[1])
    assert IMAGE_TORCHVISION.startswith(f"0.{minor + 15}.")
