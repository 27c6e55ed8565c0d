"""The remote PipelineController, built offline with the real ClearML SDK and inspected."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from d2ops.clearml_adapter import enable_offline
from d2ops.config import load_config
from d2ops.pipeline import build_controller, parse_overrides
from d2ops.steps import STEP_INPUTS, STEPS

CONFIG = "configs/demo.yaml"


@pytest.fixture(scope="module")
def dag(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    enable_offline(tmp_path_factory.mktemp("clearml"))
    overrides = ["solver.max_iter=500", "clearml.queues.train=gpu-a100"]
    pipe = build_controller(CONFIG, overrides)
    yield {"pipe": pipe, "nodes": pipe.get_pipeline_dag(), "cfg": load_config(CONFIG, overrides)}
    # The controller owns this process's main task; close it so later sessions can start.
    from clearml import Task

    controller_task = Task.current_task()
    if controller_task is not None:
        controller_task.close()


def test_every_step_is_a_node_with_the_right_parents(dag: dict[str, Any]) -> None:
    nodes = dag["nodes"]
    assert list(nodes) == list(STEPS)
    assert not nodes["download"].parents
    assert nodes["train"].parents == ["download"]
    assert nodes["evaluate"].parents == ["train"]
    assert nodes["infer"].parents == ["train"]
    assert set(nodes["register"].parents) == {"download", "train", "evaluate"}


def test_each_step_goes_to_its_queue_parameter(dag: dict[str, Any]) -> None:
    pipe, nodes, cfg = dag["pipe"], dag["nodes"], dag["cfg"]
    params = pipe.get_parameters()
    for step in STEPS:
        assert nodes[step].queue == f"${{pipeline.queue_{step}}}"
        assert params[f"queue_{step}"] == getattr(cfg.clearml.queues, step)
    assert params["queue_train"] == "gpu-a100"
    assert params["queue_download"] == "cpu"


def test_pipeline_parameters_cover_dataset_config_queues_and_image(dag: dict[str, Any]) -> None:
    params = dag["pipe"].get_parameters()
    assert params["dataset_uri"] == dag["cfg"].data.source
    assert params["config"] == CONFIG
    assert parse_overrides(params["overrides"]) == ["solver.max_iter=500", "clearml.queues.train=gpu-a100"]
    assert params["docker_image"] == dag["cfg"].clearml.docker_image
    for node in dag["nodes"].values():
        assert node.task_overrides == {"container.image": "${pipeline.docker_image}"}


def test_step_parameters_are_wired_to_pipeline_and_upstream_artifacts(dag: dict[str, Any]) -> None:
    nodes = dag["nodes"]
    for step in STEPS:
        override = nodes[step].parameters
        assert override["General/config"] == "${pipeline.config}"
        assert "${pipeline.dataset_uri}" in override["General/overrides"]
        for name, (src, artifact) in STEP_INPUTS[step].items():
            assert override[f"General/{name}"] == f"${{{src}.artifacts.{artifact}.url}}"
    assert nodes["evaluate"].parameters["General/weights"] == "${train.artifacts.weights.url}"


def test_only_the_download_step_is_cached(dag: dict[str, Any]) -> None:
    cached = {name for name, node in dag["nodes"].items() if node.cache_executed_step}
    assert cached == {"download"}


def test_no_credentials_in_pipeline_parameters(dag: dict[str, Any]) -> None:
    text = repr(dag["pipe"].get_parameters()) + repr({n: v.parameters for n, v in dag["nodes"].items()})
    for word in ("AWS_SECRET", "secret_key", "aws_access_key_id"):
        assert word.lower() not in text.lower()
