"""Multi-GPU / multi-machine wiring: the launch plan, ClearML's multi-node dict, real DDP training.

detectron2's ``launch`` spawns one process per GPU. Without a GPU it runs the same workers over
gloo on the CPU (``runtime.device: cpu``), which is how the DDP path is trained for real here;
the ``gpu`` test does the same on two CUDA devices where there are some.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from d2ops.engine.distributed import LaunchPlan, check_gpus, launch_plan

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "configs" / "smoke.yaml")


def test_one_gpu_trains_in_this_process() -> None:
    plan = launch_plan(1, 1, device="auto", visible_gpus=0)
    assert plan == LaunchPlan(1, 1, 0, None) and plan.world_size == 1 and plan.is_master


def test_several_gpus_on_one_machine_use_a_local_rendezvous() -> None:
    plan = launch_plan(4, 1, device="cuda", visible_gpus=8)
    assert (plan.num_gpus_per_machine, plan.world_size, plan.dist_url) == (4, 4, "auto")


def test_more_gpus_than_the_machine_sees_fail_early_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"runtime.num_gpus is 4 but this machine sees 2 CUDA device\(s\)"):
        check_gpus(4, device="auto", visible_gpus=2)
    with pytest.raises(ValueError, match=r"runtime\.device=cpu"):
        launch_plan(2, 1, device="cuda", visible_gpus=0)
    # CPU processes (gloo) need no GPU.
    assert launch_plan(2, 1, device="cpu", visible_gpus=0).world_size == 2


def test_multi_machine_plan_from_clearml_launch_multi_node() -> None:
    node = {"master_addr": "10.0.0.5", "master_port": 29511, "node_rank": 2, "total_num_nodes": 3, "wait": True}
    plan = launch_plan(2, 3, device="cuda", visible_gpus=2, multi_node=node)
    assert plan == LaunchPlan(2, 3, 2, "tcp://10.0.0.5:29511")
    assert plan.world_size == 6 and not plan.is_master


def test_multi_machine_plan_errors() -> None:
    with pytest.raises(ValueError, match="must run on clearml-agents"):
        launch_plan(1, 2, device="cpu", visible_gpus=0)
    node = {"master_addr": "10.0.0.5", "master_port": 29500, "node_rank": 0, "total_num_nodes": 4}
    with pytest.raises(ValueError, match=r"ClearML started 4 nodes .* runtime\.num_machines is 2"):
        launch_plan(1, 2, device="cpu", visible_gpus=0, multi_node=node)
    with pytest.raises(ValueError, match="no master address"):
        launch_plan(1, 2, device="cpu", visible_gpus=0, multi_node={**node, "total_num_nodes": 2, "master_addr": ""})


def test_clearml_launch_multi_node_dict_feeds_the_plan(tmp_path: Path) -> None:
    """The dict a real (offline) ClearML task returns from launch_multi_node, on the first machine."""
    from clearml import Task

    from d2ops.clearml.session import enable_offline

    enable_offline(tmp_path / "clearml")
    task = Task.init(project_name="d2ops-tests", task_name="multi-node", reuse_last_task_id=False)
    try:
        node = task.launch_multi_node(2, port=29533, devices=2)
    finally:
        task.close()
    plan = launch_plan(2, 2, device="cpu", visible_gpus=0, multi_node=node)
    assert plan.machine_rank == 0 and plan.is_master and plan.world_size == 4
    assert plan.dist_url is not None and plan.dist_url.startswith("tcp://") and plan.dist_url.endswith(":29533")


def test_the_train_step_refuses_several_machines_outside_an_agent(tmp_path: Path) -> None:
    from d2ops.config import load_config
    from d2ops.data.synthetic import generate_shapes_dataset
    from d2ops.pipeline.steps import StepContext, run_train

    data = generate_shapes_dataset(tmp_path / "data", counts={"train": 2, "valid": 1, "test": 1})
    cfg = load_config(SMOKE, [f"data.source={data}", "runtime.num_machines=2", "runtime.device=cpu"])
    with pytest.raises(ValueError, match=r"runtime\.num_machines is 2: the train step must run on clearml-agents"):
        run_train(StepContext(cfg=cfg, workdir=tmp_path / "run"))
    assert not (tmp_path / "run" / "train").exists()


def _ddp_run(tmp_path: Path, device: str) -> None:
    from d2ops.config import load_config
    from d2ops.data.registration import register_splits
    from d2ops.data.synthetic import generate_shapes_dataset
    from d2ops.engine.trainer import train
    from d2ops.reporting import RecordingReporter

    data = generate_shapes_dataset(tmp_path / "data", counts={"train": 8, "valid": 2, "test": 2})
    overrides = ["solver.max_iter=2", "solver.eval_period=0", f"runtime.device={device}", "runtime.num_gpus=2"]
    cfg = load_config(SMOKE, [f"data.source={data}", *overrides])
    reporter = RecordingReporter()
    result = train(cfg, register_splits(data, cfg.data), tmp_path / "out", reporter=reporter, data_root=data)
    assert result.world_size == 2 and result.iterations == 2 and result.start_iter == 0
    assert Path(result.weights).is_file() and (tmp_path / "out" / "d2ops_run.json").is_file()
    # Rank 0's scalars reached this process's reporter through the relay, once each.
    series = [(title, name, it) for title, name, _, it in reporter.scalars]
    assert ("train", "total_loss", 1) in series and len(series) == len(set(series))
    assert "bbox/AP50" in result.eval_metrics


@pytest.mark.slow
def test_ddp_training_in_two_cpu_processes(tmp_path: Path) -> None:
    """Real detectron2 DDP (gloo) through detectron2's launch: spawned workers register the dataset."""
    _ddp_run(tmp_path, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_ddp_training_on_two_gpus(tmp_path: Path) -> None:
    _ddp_run(tmp_path, "cuda")
